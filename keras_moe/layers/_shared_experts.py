"""Shared experts of a `SparseMoE` (DeepSeekMoE, Qwen-MoE): experts that
every token uses, optionally each behind its own sigmoid gate."""

from keras import ops

from keras_moe.utils import validation as check

SHARED_EXPERT_GATES = ("sigmoid",)


def init_shared_options(layer, num_shared_experts, shared_hidden_dim,
                        shared_expert_gate):
    """Validates a `SparseMoE`'s shared-expert options, sets them on `layer`."""
    layer.num_shared_experts = check.non_negative_int(
        "num_shared_experts", num_shared_experts, check.MAX_EXPERTS
    )
    layer.shared_hidden_dim = (
        None
        if shared_hidden_dim is None
        else check.positive_int(
            "shared_hidden_dim", shared_hidden_dim, check.MAX_WIDTH
        )
    )
    layer.shared_expert_gate = (
        None
        if shared_expert_gate is None
        else check.one_of(
            "shared_expert_gate", shared_expert_gate, SHARED_EXPERT_GATES
        )
    )
    if not layer.num_shared_experts and (
        layer.shared_hidden_dim is not None or layer.shared_expert_gate is not None
    ):
        raise ValueError(
            "shared_hidden_dim and shared_expert_gate configure shared "
            "experts and need num_shared_experts >= 1. Received: "
            f"num_shared_experts={num_shared_experts!r}, "
            f"shared_hidden_dim={shared_hidden_dim!r}, "
            f"shared_expert_gate={shared_expert_gate!r}"
        )


def shared_outputs(layer, tokens):
    """The shared experts' `(N, o)` sum, each gated if so configured."""
    shared_in = ops.broadcast_to(
        tokens[None], (layer.num_shared_experts,) + tuple(ops.shape(tokens))
    )
    shared = layer.shared_experts(shared_in)  # (S, N, o)
    if layer.shared_gate_kernel is not None:
        gates = ops.sigmoid(ops.matmul(tokens, layer.shared_gate_kernel))
        shared = shared * ops.transpose(gates)[:, :, None]
    return ops.sum(shared, axis=0)
