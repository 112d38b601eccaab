"""What expert parallelism sends per device and step: the communication
model of docs/distribution.md, checked against the collectives in the
compiled JAX program.

    python benchmarks/distributed/communication.py              # P = 2 and 8
    python benchmarks/distributed/communication.py --devices 2,4,8 \\
        --tokens 512 --dim 64 --experts 8 --k 2 --capacity-factor 1.25
    python benchmarks/distributed/communication.py --show-hlo   # every collective

It simulates `max(--devices)` CPU devices in this process
(`--xla_force_host_platform_device_count`), and for every device count `P`
builds one `SparseMoE` layer under `keras_moe.distribution.expert_parallel`
on a `(P,)` mesh whose one axis, `expert`, shards both the experts and the
tokens (GShard's layout: `N / P` tokens and `E / P` experts a device),
compiles the training step (forward, the layer's balancing loss, the
gradients of every weight) with `jax.jit`, reads every collective of the
optimised HLO (`all-gather`, `all-reduce`, `reduce-scatter`, `all-to-all`,
`collective-permute`, synchronous or `-start`) with its shape and group
size, and counts the bytes each device receives with the usual ring or
pairwise algorithms (for a collective over a group of `g` devices of a
result of `S` bytes: all-gather `S (g-1)/g`, all-reduce `2 S (g-1)/g`,
reduce-scatter `S (g-1)`, all-to-all `S (g-1)/g`, collective-permute `S`).
A device sends what it receives in all of these, so "bytes per device" is
either.

It prints one `RESULT` line per configuration, with `--show-hlo` the
collectives found and the model's terms, and a Markdown table comparing
the compiled program's bytes with `model_bytes` (below) and with an
all-to-all dispatch (`all_to_all_bytes`). `--check` exits non-zero if the
compiled program's bytes differ from the model's by more than 1%
(tests/test_distribution.py runs it at 2 and 8 devices).
"""

import argparse
import os
import re
import sys

DEFAULT_DEVICES = "2,8"


def _set_device_count(argv):
    """The device count must be set before JAX starts."""
    devices = DEFAULT_DEVICES
    for i, arg in enumerate(argv):
        if arg == "--devices" and i + 1 < len(argv):
            devices = argv[i + 1]
        elif arg.startswith("--devices="):
            devices = arg.split("=", 1)[1]
    count = max(int(v) for v in devices.split(",") if v)
    os.environ["KERAS_BACKEND"] = "jax"
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + f" --xla_force_host_platform_device_count={count}"
    )


if __name__ == "__main__":
    _set_device_count(sys.argv[1:])
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

FLOAT_BYTES = 4

# ---------------------------------------------------------------------------
# The model


def model_bytes(tokens, dim, experts, k, devices, router_params):
    """Bytes each device receives (= sends) in one training step of one
    `SparseMoE` layer inside a model (the gradient of its input is needed)
    under `expert_parallel` on a `(P,)` `expert` mesh that shards tokens and
    experts, float32 and int32 (4 bytes), as XLA's SPMD partitioner builds
    it (jax 0.10), with `N` the global batch's tokens, `d`, `E`, `k`, `P`,
    `R` the router's parameters and `s = (P-1)/P`:

    - dispatch: an all-gather of the token matrix `(N, d)`, of the routing
      (the pairs' experts `kN`, the choice `(k, N)`, or for top-1 the
      `(N, E)` one-hot, the buffer positions `3 kN`) and of the pair
      weights `kN`: every device then has every token and places those of
      its own experts in its `(E/P, C, d)` buffers;
    - combine: an all-reduce of the `(kN, d)` pair outputs (each device
      contributes its experts' pairs, zeros elsewhere) and of the `E`
      routing statistics of the balancing loss;
    - backward: an all-gather of the `(N, d)` output cotangent and an
      all-reduce of the `(kN, d)` pair input gradients together with the
      router's gradient (`R` values); the experts' gradients stay on their
      device (no collective);
    - a collective-permute of `P-1` int32 (the shard offsets).

    Summed:
    `B = 4 s (2 N d + 5 k N + I) + 8 s (E + R + 2 k N d) + 4 (P-1)`,
    `I = N E` for top-1, `k N` otherwise. The dominant term is
    `8 s (2 k N d + ... ) + 4 s (2 N d)`: about `16 s k N d + 8 s N d`,
    which does not fall with `P`. Capacity does not enter: the buffers
    are filled and read on the device that holds them.

    Returns the terms as a dict, with their sum under `"total"`."""
    s = (devices - 1) / devices
    n, d = tokens, dim
    selection = n * experts if k == 1 else k * n
    terms = {
        "dispatch: tokens (all-gather)": 4 * s * n * d,
        "dispatch: routing and pair weights (all-gather)": 4 * s * (5 * k * n + selection),
        "combine: pair outputs + statistics (all-reduce)": 8 * s * (k * n * d + experts),
        "backward: output cotangent (all-gather)": 4 * s * n * d,
        "backward: pair input gradients + router (all-reduce)": 8 * s * (k * n * d + router_params),
        "shard offsets (collective-permute)": 4 * (devices - 1),
    }
    terms["total"] = sum(terms.values())
    return terms


def all_to_all_bytes(tokens, dim, k, devices):
    """What an all-to-all dispatch would send per device: a device's `kN/P`
    pairs, the `(P-1)/P` of them whose expert is elsewhere, `d` floats each,
    four times a step (dispatch and combine, forward and backward):
    `16 s k N d / P` bytes. XLA's program above sends about `P (1 + 1/(2k))`
    times that."""
    s = (devices - 1) / devices
    return 16 * s * k * tokens * dim / devices


# ---------------------------------------------------------------------------
# Reading the compiled program

_DTYPE_BYTES = {"f32": 4, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "pred": 1,
                "s8": 1, "u8": 1, "f64": 8, "s64": 8, "u64": 8}
_OPS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all",
        "collective-permute")
_LINE = re.compile(
    r"=\s*(?P<shape>\(?[^=]*?\)?)\s+(?P<op>" + "|".join(_OPS) + r")(?P<start>-start)?\("
)
_ARRAY = re.compile(r"(?P<dtype>[a-z]+[0-9]*)\[(?P<dims>[0-9,]*)\]")


def _shape_bytes(text):
    total = 0
    for match in _ARRAY.finditer(text):
        dims = [int(v) for v in match.group("dims").split(",") if v]
        total += _DTYPE_BYTES.get(match.group("dtype"), 4) * int(np.prod(dims or [1]))
    return total


def _group_size(line, devices):
    match = re.search(r"replica_groups=\{\{([0-9,]*)\}", line)
    if match:
        return len([v for v in match.group(1).split(",") if v])
    match = re.search(r"replica_groups=\[(\d+),(\d+)\]", line)  # iota form
    if match:
        return int(match.group(2))
    return devices


def collectives(hlo_text, devices):
    """Every collective of an optimised HLO module: `(op, shape text,
    group size, bytes received per device)`. `-start` ops of async pairs
    are counted once (their `-done` carries no new data); for an async
    all-gather the result is the last array of the start's tuple."""
    found = []
    for line in hlo_text.splitlines():
        match = _LINE.search(line)
        if not match or "-done" in line.split("=", 1)[-1].split("(", 1)[0]:
            continue
        op, shape = match.group("op"), match.group("shape").strip()
        arrays = list(_ARRAY.finditer(shape))
        if match.group("start") and op in ("all-gather", "collective-permute") and arrays:
            shape = arrays[-1].group(0)  # (operand, result) tuple: the result
        size = _shape_bytes(shape)
        g = _group_size(line, devices)
        if g <= 1:
            continue
        if op == "all-gather":
            received = size * (g - 1) / g
        elif op == "all-reduce":
            received = 2 * size * (g - 1) / g
        elif op == "reduce-scatter":
            received = size * (g - 1)
        elif op == "all-to-all":
            received = size * (g - 1) / g
        else:
            received = size
        found.append((op, shape, g, received))
    return found


# ---------------------------------------------------------------------------
# The layer, compiled


def compiled_step(devices, tokens, dim, hidden, experts, k, capacity_factor, seq=8):
    """The optimised HLO text of one training step of a `SparseMoE` under
    `expert_parallel` on the first `devices` devices, and the router's
    parameter count."""
    import jax
    import keras

    from keras_moe.distribution import expert_parallel
    from keras_moe.layers import SparseMoE

    mesh = keras.distribution.DeviceMesh(
        (devices,), ("expert",), keras.distribution.list_devices()[:devices]
    )
    distribution = expert_parallel(mesh)
    with distribution.scope():
        keras.utils.set_random_seed(0)
        layer = SparseMoE(
            experts, hidden, k=k, capacity_factor=capacity_factor,
            eval_capacity_factor=capacity_factor, name="moe",
        )
        layer.build((tokens // seq, seq, dim))
        trainable = [v.value for v in layer.trainable_variables]
        non_trainable = [v.value for v in layer.non_trainable_variables]
        router = sum(int(np.prod(v.shape)) for v in layer.trainable_variables
                     if "experts" not in v.path)
        x = jax.device_put(
            np.random.default_rng(0).normal(size=(tokens // seq, seq, dim)).astype("float32"),
            distribution.get_data_layout((tokens // seq, seq, dim)).backend_layout,
        )

        def loss(trainable, non_trainable, x):
            out, _, losses = layer.stateless_call(
                trainable, non_trainable, x, training=True, return_losses=True
            )
            return keras.ops.mean(keras.ops.square(out)) + sum(losses)

        step = jax.jit(jax.grad(loss, argnums=(0, 2)))  # weights and input
        text = step.lower(trainable, non_trainable, x).compile().as_text()
    return text, router


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", default=DEFAULT_DEVICES)
    p.add_argument("--tokens", type=int, default=1024, help="N, the global batch's tokens")
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--k", default="2", help="k, or several: 1,2")
    p.add_argument("--capacity-factor", type=float, default=None,
                   help="default: dropless (the inference default)")
    p.add_argument("--show-hlo", action="store_true", help="print every collective")
    p.add_argument("--check", action="store_true",
                   help="exit 1 if the compiled bytes differ from the model by > 1%%")
    args = p.parse_args(argv)
    rows, failed = [], False
    for k in [int(v) for v in args.k.split(",") if v]:
        for devices in [int(v) for v in args.devices.split(",") if v]:
            text, router = compiled_step(devices, args.tokens, args.dim, args.hidden,
                                         args.experts, k, args.capacity_factor)
            found = collectives(text, devices)
            measured = sum(r for *_, r in found)
            model = model_bytes(args.tokens, args.dim, args.experts, k, devices, router)
            ideal = all_to_all_bytes(args.tokens, args.dim, k, devices)
            if args.show_hlo:
                print(f"k={k} P={devices}: {len(found)} collectives")
                for op, shape, g, received in found:
                    print(f"  {op:<20} {shape:<40} group {g}  {received:,.0f} B")
                for term, value in model.items():
                    print(f"  model: {term:<55} {value:,.0f} B")
            ratio = measured / model["total"]
            failed |= abs(ratio - 1) > 0.01
            print(f"RESULT devices={devices} tokens={args.tokens} dim={args.dim} "
                  f"experts={args.experts} k={k} capacity_factor={args.capacity_factor} "
                  f"measured_bytes={measured:.0f} model_bytes={model['total']:.0f} "
                  f"all_to_all_bytes={ideal:.0f} ratio={ratio:.4f}")
            rows.append((k, devices, len(found), measured, model["total"], ideal))
    print()
    print("| k | P | collectives | bytes/device, compiled | model | compiled / model "
          "| ideal all-to-all | compiled / ideal |")
    print("|---|---|---|---|---|---|---|---|")
    for k, devices, count, measured, model, ideal in rows:
        print(f"| {k} | {devices} | {count} | {measured:,.0f} | {model:,.0f} | "
              f"{measured / model:.3f} | {ideal:,.0f} | {measured / ideal:.2f} |")
    if args.check and failed:
        raise SystemExit("the compiled program's bytes differ from the model's")


if __name__ == "__main__":
    main()
