"""MixtureOfExperts: a mixture whose experts are arbitrary Keras layers."""

import math

import keras
from keras import ops

from keras_moe.layers import _pruning
from keras_moe.layers._integration import integrate
from keras_moe.layers._multitask import stats_to_numpy
from keras_moe.layers._stats import record, statistic
from keras_moe.layers.expert_bank import quantized_dtype_config
from keras_moe.layers.routers import default_router_initializer
from keras_moe.ops import balancing, pipeline, planning, selection
from keras_moe.utils import validation as check

INTEGRATIONS = ("weighted_sum", "max", "attention")
STATISTICS = ("expert_load", "dropped_fraction", "load_balance_loss", "router_entropy")


def _revive(obj):
    """A layer, or the layer a serialized config (from `get_config`) holds."""
    if isinstance(obj, dict):
        return keras.saving.deserialize_keras_object(obj)
    return obj


def _prod(values):
    return int(math.prod(values))


def _sublayer_policy(layer, default):
    """The dtype policy of a sublayer that `layer` creates in `__init__` with
    the policy `default`: `default`, or, for a layer revived from a config
    that `quantized_dtype_config` wrote (a `DTypePolicyMap` of its quantised
    sublayers), that map with `default` as its default, so that a quantised
    sublayer is rebuilt quantised."""
    policy = layer.dtype_policy
    if not isinstance(policy, keras.dtype_policies.DTypePolicyMap):
        return default
    return keras.dtype_policies.DTypePolicyMap(
        default_policy=default, policy_map={key: policy[key] for key in policy}
    )


@keras.saving.register_keras_serializable(package="keras_moe")
class MixtureOfExperts(keras.layers.Layer):
    """Mixture of arbitrary Keras experts (layers or models, e.g. small CNNs)
    with a learned gate, dense or top-k sparse, and three ways to integrate
    the experts' outputs.

    For an example `x` (any shape `(...)`, e.g. an image), experts
    `f_1..f_E` that all map `x` to outputs `y_e = f_e(x)` of one shape, and
    gate probabilities `p = softmax(g(x))` (`g`: by default a linear layer on
    the flattened `x`), the layer mixes the outputs of a set `S` of experts
    with weights `w`:

    - `k=None` (dense mixture, Jacobs et al. 1991): every expert runs on
      every example, `S = {1..E}`, `w_e = p_e`.
    - `k` given (sparse, Shazeer et al. 2017): `S = top_k(p)`;
      `w_e = p_e / sum_{j in S} p_j` for `k > 1` and `w_e = p_e` for `k = 1`
      (Switch: a weight renormalised over one expert would be 1, and the
      task loss would not reach the gate). Only the selected experts run on
      an example: the `B` examples of a batch are flattened to `(B, D)`,
      dispatched into static-shape `(E, C, D)` buffers with
      `C = ceil(k B / E * capacity_factor)` (`keras_moe.ops.dispatch`),
      buffer `e` is reshaped to `(C, ...)` and expert `e` is called on those
      `C` examples only (so the expert compute is `~k * capacity_factor / E`
      of the dense mixture's), and the outputs are gathered back. An example
      that finds its expert's buffer full is dropped from that expert (the
      pair contributes nothing); first choices are placed before second
      choices, earlier examples first. `capacity_factor` applies in
      training, `eval_capacity_factor` in inference; `None` is dropless
      (`C = B`), so that a prediction never depends on the rest of its
      batch.

    Integration strategies (`integration=`), over the kept pairs of `S`:

    - `"weighted_sum"`: `y = sum_{e in S} w_e y_e`.
    - `"max"`: `y = max_{e in S} (w_e y_e)`, elementwise. Each output
      element comes from one expert, scaled by its gate weight, so the task
      loss trains the gate through the winning expert's weight
      (`dy/dw_e = y_e` where `e` wins). A straight `max_e y_e` would give
      the gate no gradient at all (only the balancing loss would move it,
      and a dense mixture would not use the gate); the scaled max trains
      the gate like the weighted sum does.
    - `"attention"`: a query `q = W_q flat(x) + b_q` and keys
      `K_e = W_k flat(y_e)` of width `a = attention_dim`, scores
      `s_e = q . K_e / sqrt(a) + log w_e`, attention `alpha = softmax_{e in
      S}(s)`, and `y = m * sum_{e in S} alpha_e y_e` with
      `m = sum_{e in S} w_e` (1, except for `k = 1`, where `m = p_e`).
      The attention looks at what the experts actually produced for this
      input; the gate's log-weights are a prior on it, so the task loss
      trains the gate here as well (without that term a dense mixture
      would not use its gate, and a sparse one would move it only through
      the balancing loss).

    With `k = 1` there is one output per example, so the three strategies
    coincide (`y = p_e y_e`); they differ for `k > 1` and dense mixtures.

    In training (sparse or dense), `load_balance_weight * L` is added with
    `add_loss`, where `L = E sum_e f_e P_e` is the Switch load-balancing loss
    (`keras_moe.ops.load_balancing_loss`), `f_e` the share of the
    (example, choice) pairs routed to expert `e` (for a dense mixture: of the
    examples whose largest gate weight is `e`) and `P_e` the mean gate
    probability; it is 1 for uniform routing and keeps the gate from
    collapsing onto one expert. Routing statistics of the last call are kept
    in non-trainable variables (`expert_load`: the share `f` of pairs per
    expert, before the capacity cut; `dropped_fraction`;
    `load_balance_loss`; `router_entropy`); read them with
    `routing_stats()`, or log them during `fit` with
    `keras_moe.callbacks.RoutingMetrics`.

    Experts see zero-filled rows in the unused capacity slots of their
    buffers, so layers that mix examples (`BatchNormalization` in training)
    would count them; prefer per-example normalisation inside experts.

    Args:
        experts: a list of at least 2 Keras layers or models, each mapping a
            batch `(B, ...)` of inputs to a batch `(B, ...out)` of outputs of
            the same shape for every expert. They may be built or not.
        integration: `"weighted_sum"` (default), `"max"` or `"attention"`.
        k: `None` (default) for a dense mixture, or the number of experts
            per example, `1 <= k <= E`, for sparse routing.
        gate: `None` for a linear gate on the flattened input (a `Dense(E)`
            layer with Switch's small initialisation, run in float32), or a
            Keras layer mapping the input `(B, ...)` to `(B, E)` logits.
        capacity_factor: training capacity factor (> 0) or `None`
            (dropless); only with `k`. Default 1.25.
        eval_capacity_factor: inference capacity factor (> 0) or `None`
            (default: dropless); only with `k`.
        load_balance_weight: weight of the load-balancing loss (default
            0.01; 0 turns it off).
        attention_dim: width `a` of the attention query and keys (default
            32); used by `integration="attention"` only (and not for
            `k = 1`, where the layer has no query and key weights).
        **kwargs: base `Layer` arguments.

    Call arguments:
        inputs: `(B, ...)` with every non-batch dimension known.
        training: training mode (capacity factor, balancing loss).
        return_routing: also return a dict with `expert_index` `(B, |S|)`
            int32 (the selected experts; every expert for a dense mixture),
            `gate_weights` `(B, |S|)` (`w`), `probs` `(B, E)` (`p`), `keep`
            `(B, |S|)` bool, `capacity`, `expert_load`, `dropped_fraction`,
            `load_balance_loss` and, for attention, `attention_weights`
            `(B, |S|)` (`m * alpha`).

    Returns:
        `(B, ...out)`, the experts' output shape, or `(outputs, routing)`
        with `return_routing=True`.

    Example:

    >>> import numpy as np
    >>> experts = [keras.layers.Dense(3) for _ in range(4)]
    >>> moe = MixtureOfExperts(experts, integration="attention", k=2)
    >>> tuple(moe(np.random.rand(8, 5).astype("float32")).shape)
    (8, 3)

    References:
        Jacobs, Jordan, Nowlan, Hinton. Adaptive Mixtures of Local Experts
        (Neural Computation, 1991).
        Shazeer et al. Outrageously Large Neural Networks: The
        Sparsely-Gated Mixture-of-Experts Layer (2017).
        Fedus, Zoph, Shazeer. Switch Transformers (2021).
    """

    def __init__(
        self,
        experts,
        integration="weighted_sum",
        k=None,
        gate=None,
        capacity_factor=1.25,
        eval_capacity_factor=None,
        load_balance_weight=0.01,
        attention_dim=32,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if isinstance(experts, (list, tuple)):
            experts = [_revive(expert) for expert in experts]
        self.experts = check.layer_list("experts", experts, 2)
        self.num_experts = len(self.experts)
        self.integration = check.one_of("integration", integration, INTEGRATIONS)
        self.k = None if k is None else check.k_for_experts(k, self.num_experts)
        self.capacity_factor = check.capacity_factor("capacity_factor", capacity_factor)
        self.eval_capacity_factor = check.capacity_factor(
            "eval_capacity_factor", eval_capacity_factor
        )
        self.load_balance_weight = check.non_negative_float(
            "load_balance_weight", load_balance_weight
        )
        self.attention_dim = check.positive_int(
            "attention_dim", attention_dim, maximum=check.MAX_WIDTH
        )
        gate = _revive(gate)
        self.custom_gate = gate is not None
        if gate is None:
            gate = keras.layers.Dense(
                self.num_experts,
                kernel_initializer=default_router_initializer(),
                dtype=_sublayer_policy(self, "float32"),
                name="gate",
            )
        elif not isinstance(gate, keras.layers.Layer):
            raise ValueError(
                "gate must be None or a Keras layer mapping the inputs to "
                f"(batch, num_experts) logits. Received: gate={gate!r}"
            )
        self.gate = gate
        # With k = 1, attention over one output is 1: no query and keys.
        if self.integration == "attention" and self.k != 1:
            self.attention_query = keras.layers.Dense(
                self.attention_dim, dtype=self.dtype_policy, name="attention_query"
            )
            self.attention_key = keras.layers.Dense(
                self.attention_dim,
                use_bias=False,
                dtype=self.dtype_policy,
                name="attention_key",
            )
        else:
            self.attention_query = self.attention_key = None

    # ------------------------------------------------------------------ build

    def _check_input_shape(self, input_shape):
        input_shape = tuple(input_shape)
        if len(input_shape) < 2 or any(d is None or d == 0 for d in input_shape[1:]):
            raise ValueError(
                f"{type(self).__name__} expects inputs (batch, ...) with every "
                "non-batch dimension known and nonzero. Received: "
                f"input_shape={input_shape}"
            )
        return input_shape

    def _expert_output_shape(self, input_shape):
        """Calls every expert symbolically; checks that their outputs agree.
        Returns the common per-example output shape."""
        spec = keras.KerasTensor((None,) + tuple(input_shape[1:]), dtype=self.compute_dtype)
        shapes = []
        for expert in self.experts:
            out = expert(spec)
            if not isinstance(out, keras.KerasTensor):
                raise ValueError(
                    "Each expert must return a single tensor. Received: "
                    f"expert {expert.name!r} returns {out!r}"
                )
            shapes.append(tuple(out.shape))
        inner = {shape[1:] for shape in shapes}
        if len(inner) > 1:
            raise ValueError(
                "All experts must produce outputs of one shape. Received: "
                "output shapes "
                + ", ".join(
                    f"{e.name}: {s}" for e, s in zip(self.experts, shapes)
                )
                + f" for input shape {tuple(input_shape)}"
            )
        shape = shapes[0]
        if shape[0] is not None or any(d is None for d in shape[1:]) or len(shape) < 2:
            raise ValueError(
                "Each expert must map a batch (B, ...) to outputs (B, ...) "
                "with known non-batch dimensions. Received: output shape "
                f"{shape} for input shape {(None,) + tuple(input_shape[1:])}"
            )
        return shape[1:]

    def build(self, input_shape):
        input_shape = self._check_input_shape(input_shape)
        self._input_inner = input_shape[1:]
        self._input_dim = _prod(self._input_inner)
        self._output_inner = self._expert_output_shape(input_shape)
        self._output_dim = _prod(self._output_inner)
        if self.custom_gate:
            logits = self.gate(
                keras.KerasTensor((None,) + self._input_inner, dtype=self.compute_dtype)
            )
            shape = tuple(getattr(logits, "shape", ()))
            if len(shape) != 2 or shape[-1] != self.num_experts:
                raise ValueError(
                    "gate must map the inputs to (batch, num_experts) logits. "
                    f"Received: gate output shape {shape}, "
                    f"num_experts={self.num_experts}"
                )
        elif not self.gate.built:
            self.gate.build((None, self._input_dim))
        if self.attention_query is not None:
            self.attention_query.build((None, self._input_dim))
            self.attention_key.build((None, None, self._output_dim))

        for name in STATISTICS:
            shape = (self.num_experts,) if name == "expert_load" else ()
            setattr(self, name, statistic(self, name, shape))

    # ------------------------------------------------------------------- call

    def _gate_probs(self, inputs, flat):
        logits = self.gate(inputs if self.custom_gate else flat)
        return ops.softmax(ops.cast(logits, "float32"), axis=-1)

    def _dense_experts(self, inputs, probs):
        """Every expert on every example: `(B, E, O)` outputs."""
        outputs = [
            ops.reshape(expert(inputs), (-1, self._output_dim))
            for expert in self.experts
        ]
        gathered = ops.stack(outputs, axis=1)
        keep = ops.ones_like(probs, dtype="bool")
        index = ops.broadcast_to(
            ops.arange(0, self.num_experts, dtype="int32")[None], ops.shape(probs)
        )
        top1 = ops.cast(ops.argmax(probs, axis=-1), "int32")[:, None]
        routed = ops.sum(ops.one_hot(top1, self.num_experts, dtype="float32"), axis=(0, 1))
        stats = {
            "expert_load": routed / ops.maximum(ops.sum(routed), 1.0),
            "dropped_fraction": ops.zeros((), "float32"),
        }
        return gathered, probs, keep, index, top1, stats, None

    def _run_experts(self, buffers):
        """The bank of the routed pipeline: expert `e` on its `(C, D)`
        buffer (reshaped to its input shape), `(E, C, D)` -> `(E, C, O)`."""
        outputs = []
        for e, expert in enumerate(self.experts):
            examples = ops.reshape(buffers[e], (-1,) + self._input_inner)
            outputs.append(ops.reshape(expert(examples), (-1, self._output_dim)))
        return ops.stack(outputs, axis=0)

    def _sparse_experts(self, flat, probs, num_examples, training):
        """Each expert on its `C` dispatched examples only (the routed
        pipeline's capacity path), mixed (`weighted_sum`) or gathered back
        to `(B, k, O)` (zeros for dropped pairs) for the other
        integrations."""
        capacity = planning.choose_capacity(
            num_examples,
            self.num_experts,
            self.k,
            planning.capacity_factor_for(
                training, self.capacity_factor, self.eval_capacity_factor
            ),
        )
        top, index = selection.top_k_routing(probs, self.k)
        plan, _ = planning.plan_dispatch(
            {"expert_index": index}, self.num_experts, capacity
        )
        mix = self.integration == "weighted_sum"
        outputs = pipeline.run_plan(
            flat, plan, top, self._run_experts, training, mix=mix
        )
        mixed, gathered = (outputs, None) if mix else (None, outputs)
        stats = pipeline.routing_statistics(plan)
        return gathered, top, plan["keep"], plan["expert_index"], index, stats, (
            mixed,
            plan["capacity"],
        )

    def call(self, inputs, training=None, return_routing=False):
        shape = tuple(inputs.shape)
        if shape[1:] != tuple(self._input_inner):
            raise ValueError(
                f"{self.name}: the input shape must be (batch,) + "
                f"{tuple(self._input_inner)}, as when the layer was built. "
                f"Received: input shape {shape}"
            )
        num_examples = ops.shape(inputs)[0]
        flat = ops.reshape(inputs, (-1, self._input_dim))
        probs = self._gate_probs(inputs, flat)
        if self.k is None:
            gathered, weights, keep, expert_index, balance_index, stats, _ = (
                self._dense_experts(inputs, probs)
            )
            mixed, capacity = None, num_examples
        else:
            gathered, weights, keep, expert_index, balance_index, stats, extra = (
                self._sparse_experts(flat, probs, num_examples, training)
            )
            mixed, capacity = extra
        attention = None
        if mixed is None:
            mixed, attention = integrate(self, flat, gathered, weights, keep)
        outputs = ops.reshape(mixed, (-1,) + tuple(self._output_inner))

        balance = balancing.load_balancing_loss(probs, balance_index, self.num_experts)
        if training and self.load_balance_weight:
            self.add_loss(self.load_balance_weight * balance)
        expert_load = stats["expert_load"]
        dropped_fraction = stats["dropped_fraction"]
        record(
            self,
            expert_load=expert_load,
            dropped_fraction=dropped_fraction,
            load_balance_loss=balance,
            router_entropy=balancing.mean_entropy(probs),
        )
        if not return_routing:
            return outputs
        routing = {
            "expert_index": expert_index,
            "gate_weights": weights,
            "probs": probs,
            "keep": keep,
            "capacity": ops.cast(capacity, "int32"),
            "expert_load": expert_load,
            "dropped_fraction": dropped_fraction,
            "load_balance_loss": balance,
        }
        if self.integration == "attention":
            routing["attention_weights"] = attention
        return outputs, routing

    def routing_stats(self):
        """The routing statistics of the last call, as NumPy values."""
        return stats_to_numpy(self, STATISTICS)

    # ----------------------------------------------------------------- shapes

    def compute_output_shape(self, input_shape):
        input_shape = self._check_input_shape(input_shape)
        if self.built and tuple(input_shape[1:]) == tuple(self._input_inner):
            inner = self._output_inner
        else:
            inner = self._expert_output_shape(input_shape)
        return (input_shape[0],) + tuple(inner)

    def compute_output_spec(self, inputs, training=None, return_routing=False):
        if return_routing:
            # Trace `call` itself for the nested routing structure.
            return super(keras.layers.Layer, self).compute_output_spec(
                inputs, training=training, return_routing=True
            )
        # The outputs are the experts' outputs mixed in their dtype, which
        # need not be this layer's compute dtype (e.g. float32 experts in a
        # mixed-precision layer).
        spec = keras.KerasTensor((None,) + tuple(inputs.shape[1:]), dtype=inputs.dtype)
        dtype = keras.backend.result_type(
            *(expert(spec).dtype for expert in self.experts)
        )
        return keras.KerasTensor(
            self.compute_output_shape(inputs.shape), dtype=dtype
        )

    def pruned_config(self, kept):
        """This layer's config with the experts `kept` only (a sorted list
        of old indices), for `keras_moe.compression.prune_experts`: the kept
        experts' configs and `k = min(k, len(kept))`. Needs the default
        gate (a custom gate is a layer whose outputs this layer cannot
        slice) and at least two kept experts."""
        if self.custom_gate:
            raise ValueError(
                f"MixtureOfExperts {self.name!r} has a custom gate "
                f"({type(self.gate).__name__}), whose logits it cannot slice; "
                "only the default gate can be pruned"
            )
        if len(kept) < 2:
            raise ValueError(
                f"MixtureOfExperts {self.name!r} needs at least 2 experts. "
                f"Received: kept={list(kept)!r}"
            )
        config = self.get_config()
        config["experts"] = [config["experts"][i] for i in kept]
        if self.k is not None:
            config["k"] = min(self.k, len(kept))
        return config

    def copy_pruned_weights(self, source, kept):
        """Copies the weights of `source` (the unpruned layer): the kept
        experts whole, the gate's kernel and bias columns of the kept
        experts, the attention layers and the statistics."""
        for new, index in zip(self.experts, kept):
            new.set_weights(source.experts[index].get_weights())
        _pruning.copy_sliced(
            self, source, {source.num_experts: list(kept)}, exclude=("experts",)
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            experts=[
                keras.saving.serialize_keras_object(expert) for expert in self.experts
            ],
            integration=self.integration,
            k=self.k,
            gate=(
                keras.saving.serialize_keras_object(self.gate)
                if self.custom_gate
                else None
            ),
            capacity_factor=self.capacity_factor,
            eval_capacity_factor=self.eval_capacity_factor,
            load_balance_weight=self.load_balance_weight,
            attention_dim=self.attention_dim,
        )
        # The gate and attention layers are rebuilt from this config: keep
        # their int8 policies after `quantize`.
        return quantized_dtype_config(self, config)
