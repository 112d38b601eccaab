"""The router contract: the `Router` base class and its `RoutingResult`.

A router decides which experts see each token. Every MoE layer of keras_moe
(`SparseMoE(router=...)`, `MultiGateMoE(routers=[...])`) takes any subclass
of `Router`, so that token-choice, expert-choice, hashing,
balanced-assignment, task or your own routers plug into the same dispatch.
The page "Write your own router" of the documentation walks through one.
"""

import inspect

import keras
from keras import ops

from keras_moe.layers import _pruning
from keras_moe.layers import _routing_ids
from keras_moe.utils import validation as check
from keras_moe.ops import balancing, selection
from keras_moe.ops.planning import accepts_mask  # noqa: F401 (re-exported)
from keras_moe.utils import keras_internals
from keras_moe.utils.tensors import flat_mask, softmax

_ROUTING_DTYPES = {"expert_index": "int32", "position": "int32", "keep": "bool"}

# The trailing shape of each standard per-token field of a routing result:
# "choices" is the router's `num_choices` (k'), "experts" its `num_experts`.
# A field whose name ends in "_loss" is a scalar.
_TOKEN_FIELDS = {
    "expert_index": ("choices",),
    "combine_weights": ("choices",),
    "position": ("choices",),
    "keep": ("choices",),
    "probs": ("experts",),
    "logits": ("experts",),
    "priority": (),
}


def default_router_initializer():
    """Switch Transformer's router init: truncated normal, 0.1 x LeCun scale."""
    return keras.initializers.VarianceScaling(
        scale=0.1, mode="fan_in", distribution="truncated_normal"
    )


class RoutingResult(dict):
    """What a router returns: a `dict` of tensors whose keys are also
    attributes (`routing.expert_index is routing["expert_index"]`).

    For `N` tokens (any leading shape `...` in place of `N`), `E` experts and
    `k'` choices per token (the router's `num_choices`: `k` for token-choice
    routers, `E` for expert choice):

    - `expert_index` `(N, k')` int32: the experts of each token's choices.
    - `combine_weights` `(N, k')`: the weight of each choice in the output
      `y_n = sum_j combine_weights[n, j] * FFN_{expert_index[n, j]}(x_n)`.
    - `probs` `(N, E)`: the router's distribution over the experts (rows
      sum to 1), used by the statistics and the balancing losses.

    Optional fields (present when the router declares them):

    - `logits` `(N, E)`: the scores before normalisation.
    - `priority` `(N,)`: tokens with a higher priority take an overflowing
      expert's capacity first (batch-prioritized routing).
    - `position` `(N, k')` int32 and `keep` `(N, k')` bool: routers with
      `assigns_positions = True` place the pairs themselves: `position` is
      the pair's row in its expert's buffer, `keep` whether it was chosen.
    - scalar losses, e.g. `load_balance_loss` or `z_loss`, unweighted (the
      router adds its weighted losses itself with `add_loss` in training).

    It is a `dict` (code written for dicts indexes it by key) and a node of
    Keras' nested structures (`keras.tree`), so a functional model may
    output it.

    Example:

    >>> import numpy as np
    >>> routing = RoutingResult(expert_index=np.zeros((3, 2), "int32"))
    >>> routing.expert_index.shape, routing["expert_index"].shape
    ((3, 2), (3, 2))
    """

    __slots__ = ()

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(
                f"This routing has no field {name!r}; it has {sorted(self)}"
            ) from None

    # Nested-structure protocols: the values in sorted key order, as Keras,
    # optree and tf.nest order a dict's, so that a `RoutingResult` and a
    # plain dict with the same keys flatten alike.
    def _sorted_items(self):
        keys = tuple(sorted(self))  # hashable: JAX and optree compare it
        return [self[key] for key in keys], keys

    def tree_flatten(self):  # optree (Keras on TensorFlow and JAX)
        values, keys = self._sorted_items()
        return values, keys, keys

    @classmethod
    def tree_unflatten(cls, keys, values):
        return cls(zip(keys, values))

    def torchtree_flatten(self):  # torch's pytree (Keras on torch)
        return self._sorted_items()

    @classmethod
    def torchtree_unflatten(cls, values, keys):
        return cls(zip(keys, values))

    def torchtree_flatten_with_keys(self):
        from torch.utils import _pytree

        values, keys = self._sorted_items()
        return [(_pytree.MappingKey(k), v) for k, v in zip(keys, values)], keys


def _register_routing_result():
    """Makes `RoutingResult` a node of Keras' nested structures (not a leaf,
    as an unknown dict subclass would be), and of JAX's pytrees on JAX, so
    that layers may return it in symbolic calls, functional models and
    compiled steps. `keras.tree` has no public registration function (Keras
    3.15); this is the one Keras uses for its own tracked dicts."""
    keras_internals.register_tree_node_class(RoutingResult)
    if keras.backend.backend() == "jax":
        import jax

        try:
            jax.tree_util.register_pytree_node(
                RoutingResult,
                lambda r: r._sorted_items(),
                lambda keys, values: RoutingResult(zip(keys, values)),
            )
        except ValueError:
            pass


_register_routing_result()


def routing_output_spec(shapes, float_dtype):
    """A `RoutingResult` of `KerasTensor`s for the field `shapes`: int32
    indices and positions, a bool `keep`, everything else `float_dtype`."""
    return RoutingResult(
        (name, keras.KerasTensor(shape, dtype=_ROUTING_DTYPES.get(name, float_dtype)))
        for name, shape in shapes.items()
    )


class Router(keras.layers.Layer):
    """Base class of the routers: the contract every MoE layer relies on.

    A router maps `N` tokens `x_n` (`(N, d)`, or any `(..., d)`) to a
    `RoutingResult`: for each token, `k'` choices `expert_index[n, j]`
    with weights `combine_weights[n, j]`, and its distribution over the
    `E` experts, `probs[n]`. The MoE layer then computes

    `y_n = sum_j combine_weights[n, j] * FFN_{expert_index[n, j]}(x_n)`

    over the choices that fit in the experts' capacity. What the base class
    gives a subclass:

    - the shared arguments `num_experts` and `k`, validated (a `ValueError`
      names the bad value), in `get_config`;
    - the output spec and shape of the routing result from the declared
      fields (`routing_fields`, `assigns_positions`), so a router works in
      functional models;
    - a default `call` for top-k routers: top-`k` of `softmax(logits)` on
      the logits of `expert_logits`, weights renormalised for `k > 1`, and
      the unweighted `load_balance_loss` and `z_loss`;
    - the expert-pruning hooks `pruned_config` / `copy_pruned_weights`
      (keep the kept experts' slices of every weight with an expert axis),
      used by `keras_moe.compression.prune_experts`.

    A subclass implements `expert_logits(tokens, training=None)` (and keeps
    the default `call`), or `call` itself.

    Class attributes a subclass declares:

    - `assigns_positions` (False): the router places the pairs itself and
      returns `position` and `keep`; its `call` takes `capacity=` (the MoE
      layer passes its capacity `C`).
    - `needs_routing_inputs` (False): the router routes on ids; its `call`
      takes `routing_inputs=`, one integer id per token (the MoE layer
      passes on its own `routing_inputs=`).
    - `token_independent` (True): a token's routing depends on that token
      alone (False for routers that choose among all the tokens of a call,
      e.g. expert choice or balanced assignment; `SparseMoE(causal=True)`
      refuses those).
    - `routing_fields`: the optional fields its `call` returns (see
      `RoutingResult`); the default `call` returns `logits`,
      `load_balance_loss` and `z_loss`. A field that is not one of the
      standard ones needs `routing_shapes` overridden.

    Call contract: `call(inputs, training=None, mask=None)` (plus
    `routing_inputs=` and `capacity=` as declared); `mask`, `(...)` bool
    (True: the token counts), leaves padding out of the router's losses,
    statistics and, for routers that place tokens, its choices. In training
    the router adds its weighted losses with `add_loss`
    (`add_weighted_losses`). Routers run in float32 whatever the global
    dtype policy (pass `dtype=` to override): a softmax over bfloat16 logits
    routes badly.

    Args:
        num_experts: `E`, a positive int.
        k: choices per token, `1 <= k <= E` (for routers that choose their
            own assignment, the average number of experts per token, which
            sizes the capacity).
        **kwargs: base `Layer` arguments; `dtype` defaults to `"float32"`.

    Example:

    >>> import keras
    >>> import numpy as np
    >>> class DotRouter(Router):
    ...     def build(self, input_shape):
    ...         self.add_router_kernel(input_shape[-1], "glorot_uniform")
    ...     def expert_logits(self, tokens, training=None):
    ...         return self.linear_logits(tokens)
    >>> routing = DotRouter(num_experts=4, k=2)(np.ones((3, 8), "float32"))
    >>> tuple(routing.expert_index.shape), tuple(routing.probs.shape)
    ((3, 2), (3, 4))

    References:
        Shazeer et al. Outrageously Large Neural Networks: The
        Sparsely-Gated Mixture-of-Experts Layer (2017) for top-k routing;
        Fedus, Zoph, Shazeer. Switch Transformers (2021) for the
        load-balancing loss; Zoph et al. ST-MoE (2022) for the z-loss.
    """

    assigns_positions = False
    needs_routing_inputs = False
    token_independent = True
    routing_fields = ("logits", "load_balance_loss", "z_loss")

    def __init__(self, num_experts, k=1, **kwargs):
        cls = type(self)
        if cls.call is Router.call and cls.expert_logits is Router.expert_logits:
            raise TypeError(
                f"{cls.__name__} is an abstract router: implement "
                "expert_logits(tokens, training=None), returning the (N, E) "
                "logits that the default call routes on top-k, or call(inputs, "
                "training=None, mask=None) returning a RoutingResult."
            )
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.supports_masking = True
        self.num_experts = check.positive_int(
            "num_experts", num_experts, maximum=check.MAX_EXPERTS
        )
        self.k = check.k_for_experts(k, self.num_experts)

    @property
    def num_choices(self):
        """`k'`, the choices per token in the routing result (`k` unless the
        router says otherwise; `E` for expert choice)."""
        return self.k

    # ------------------------------------------------------------ weights

    def add_router_kernel(self, input_dim, initializer, regularizer=None,
                          use_bias=False):
        """Adds the weights of linear logits `x W (+ b)`: `kernel` `(d, E)`
        and, with `use_bias`, `bias` `(E,)` (zeros; else `bias` is None)."""
        self.kernel = self.add_weight(
            name="kernel",
            shape=(input_dim, self.num_experts),
            initializer=initializer,
            regularizer=regularizer,
        )
        self.bias = (
            self.add_weight(name="bias", shape=(self.num_experts,), initializer="zeros")
            if use_bias
            else None
        )

    def linear_logits(self, tokens):
        """`x W (+ b)` with the weights of `add_router_kernel`, in the
        router's dtype."""
        logits = ops.matmul(ops.cast(tokens, self.compute_dtype), self.kernel)
        return logits if self.bias is None else logits + self.bias

    # ------------------------------------------------------------ routing

    def expert_logits(self, tokens, training=None):
        """The `(..., E)` logits of `(..., d)` tokens, for the default
        top-k `call`. A subclass implements this or `call`."""
        raise NotImplementedError(
            f"{type(self).__name__} implements neither expert_logits nor call"
        )

    def call(self, inputs, training=None, mask=None):
        return self.top_k_routing(
            self.expert_logits(inputs, training=training), mask=mask
        )

    def top_k_routing(self, logits, mask=None):
        """Token-choice routing on `(..., E)` logits: `p = softmax(l)`,
        `I = top_k(p)`, `w_j = p_{I_j} / sum_{i in I} p_i` (no
        renormalisation for `k = 1`, so that the task loss trains the
        router, as in Switch). Returns a `RoutingResult` with
        `expert_index`, `combine_weights`, `probs`, `logits` and the
        unweighted `load_balance_loss` (Switch) and `z_loss` (ST-MoE) over
        the tokens of `mask` (all by default)."""
        logits = ops.cast(logits, self.compute_dtype)
        probs = softmax(logits, axis=-1)
        weights, expert_index = selection.top_k_routing(probs, self.k)
        e = self.num_experts
        mask = flat_mask(mask)
        return RoutingResult(
            expert_index=expert_index,
            combine_weights=weights,
            probs=probs,
            logits=logits,
            load_balance_loss=balancing.load_balancing_loss(
                ops.reshape(probs, (-1, e)),
                ops.reshape(expert_index, (-1, self.k)),
                e,
                mask=mask,
            ),
            z_loss=balancing.router_z_loss(ops.reshape(logits, (-1, e)), mask=mask),
        )

    def add_weighted_losses(self, routing, training, weights):
        """In training, `add_loss(weight * routing[name])` for every
        `name: weight` of `weights` with a nonzero weight and a value."""
        if not training:
            return
        for name, weight in weights.items():
            if weight and name in routing:
                self.add_loss(weight * routing[name])

    # ------------------------------------------------------------ shapes

    def routing_shapes(self, lead, training=None):
        """The shape of every field of the routing of tokens with leading
        shape `lead`: the required fields, `position` and `keep` if the
        router assigns positions, and its `routing_fields`."""
        names = ["expert_index", "combine_weights", "probs"]
        if self.assigns_positions:
            names += ["position", "keep"]
        names += [n for n in self.routing_fields if n not in names]
        sizes = {"choices": self.num_choices, "experts": self.num_experts}
        shapes = {}
        for name in names:
            if name.endswith("_loss"):
                shapes[name] = ()
            elif name in _TOKEN_FIELDS:
                shapes[name] = tuple(lead) + tuple(
                    sizes[axis] for axis in _TOKEN_FIELDS[name]
                )
            else:
                raise ValueError(
                    f"{type(self).__name__} declares the routing field "
                    f"{name!r}, which is not a standard one "
                    f"({sorted(_TOKEN_FIELDS)} or a scalar '*_loss'): "
                    "override routing_shapes to give its shape."
                )
        return shapes

    def compute_output_shape(self, input_shape):
        input_shape = check.token_input_shape(type(self).__name__, input_shape)
        return self.routing_shapes(input_shape[:-1])

    def compute_output_spec(self, inputs, *args, **kwargs):
        arguments = inspect.signature(self.call).bind(inputs, *args, **kwargs)
        arguments = arguments.arguments
        if self.needs_routing_inputs:
            _routing_ids.require_ids(self, inputs, arguments.get("routing_inputs"))
        shape = check.token_input_shape(type(self).__name__, inputs.shape)
        shapes = self.routing_shapes(shape[:-1], training=arguments.get("training"))
        return routing_output_spec(shapes, self.compute_dtype)

    def compute_mask(self, inputs, previous_mask=None):
        return None  # the routing carries no Keras mask

    # ------------------------------------------------------------ pruning

    def pruned_config(self, kept):
        """This router's config for the experts `kept` only (a sorted list of
        old indices): `num_experts = len(kept)`, `k = min(k, len(kept))`."""
        return _pruning.router_config(self, kept)

    def copy_pruned_weights(self, source, kept):
        """Copies `source`'s weights into this pruned router, keeping along
        every expert axis (an axis of size `E`) the `kept` experts (see
        `keras_moe.compression.prune_experts`)."""
        _pruning.copy_sliced(self, source, {source.num_experts: list(kept)})

    def get_config(self):
        config = super().get_config()
        config.update(num_experts=self.num_experts, k=self.k)
        return config
