"""`KerasHubMoEBlock`: a keras_moe layer in the place of a keras-hub MoE block.

`keras_moe.interop.replace_moe_blocks` puts one in each decoder layer of a
keras-hub backbone, around the `SparseMoE` that `from_keras_hub` ports
(re-exported by `keras_moe.interop`).
"""

import keras
import numpy as np
from keras import ops

from keras_moe.layers.sparse_moe import SparseMoE


@keras.saving.register_keras_serializable(package="keras_moe")
class KerasHubMoEBlock(keras.layers.Layer):
    """A keras_moe layer in the place of a keras-hub MoE block.

    keras-hub's decoder layers call their MoE block as
    `block(x, attention_mask=..., training=...)` and unpack
    `(outputs, router_logits)`. This wraps a `SparseMoE` (e.g. from
    `from_keras_hub`) to take that call and return that pair:
    `outputs = moe(x)` and the router's logits `(B T, E)` (or, with
    `second_output="scores"`, the `(B T, E)` matrix of combine weights,
    which is what GPT-OSS's block returns). `attention_mask` is accepted
    and not used (the outputs of the blocks do not depend on it; keras-hub
    uses it only to leave padded tokens out of the load-balancing loss).

    Args:
        moe: the `SparseMoE`.
        second_output: `"logits"` (default) or `"scores"`.
        **kwargs: base `Layer` arguments.

    Example:

    >>> import numpy as np
    >>> from keras_moe.layers import SparseMoE
    >>> wrapped = KerasHubMoEBlock(SparseMoE(num_experts=4, hidden_dim=8))
    >>> outputs, logits = wrapped(np.zeros((2, 3, 6), "float32"))
    >>> tuple(outputs.shape), tuple(logits.shape)
    ((2, 3, 6), (6, 4))
    """

    def __init__(self, moe, second_output="logits", **kwargs):
        super().__init__(**kwargs)
        if isinstance(moe, dict):
            moe = keras.saving.deserialize_keras_object(moe)
        if not isinstance(moe, SparseMoE):
            raise ValueError(
                f"moe must be a SparseMoE. Received: moe={moe!r}"
            )
        if second_output not in ("logits", "scores"):
            raise ValueError(
                "second_output must be 'logits' or 'scores'. Received: "
                f"second_output={second_output!r}"
            )
        self.moe = moe
        self.second_output = second_output

    def build(self, input_shape):
        if not self.moe.built:
            self.moe.build(input_shape)

    def call(self, hidden_states, attention_mask=None, training=None):
        outputs, routing = self.moe(
            hidden_states, training=training, return_routing=True
        )
        if self.second_output == "scores":
            one_hot = ops.one_hot(
                routing["expert_index"], self.moe.num_experts, dtype=outputs.dtype
            )
            weights = ops.cast(routing["combine_weights"], outputs.dtype)
            return outputs, ops.sum(one_hot * weights[..., None], axis=1)
        tokens = ops.reshape(hidden_states, (-1, ops.shape(hidden_states)[-1]))
        logits = self.moe.router.compute_logits(tokens)[0]
        return outputs, ops.cast(logits, outputs.dtype)

    def compute_output_shape(self, input_shape):
        input_shape = tuple(input_shape)
        tokens = None
        if all(dim is not None for dim in input_shape[:-1]):
            tokens = int(np.prod(input_shape[:-1]))
        return (
            self.moe.compute_output_shape(input_shape),
            (tokens, self.moe.num_experts),
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            moe=keras.saving.serialize_keras_object(self.moe),
            second_output=self.second_output,
        )
        return config
