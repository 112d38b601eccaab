"""Run as a script (fresh process): expert parallelism on 8 simulated CPU
devices with JAX. Exits non-zero with a message if a check fails; prints
`OK` at the end.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 KERAS_BACKEND=jax \
        python tests/distributed/expert_parallel_check.py
"""

import os

os.environ["KERAS_BACKEND"] = "jax"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_moe.distribution import expert_parallel  # noqa: E402
from keras_moe.layers import MultiGateMoE, SparseMoE  # noqa: E402

TOL = 1e-5


def build():
    inputs = keras.Input((16, 8))
    h = SparseMoE(8, 32, k=2, num_shared_experts=1, name="moe")(inputs)
    h = keras.layers.GlobalAveragePooling1D()(h)
    a, b = MultiGateMoE(num_tasks=2, num_experts=4, hidden_dim=16, k=2, name="mmoe")(h)
    model = keras.Model(
        inputs,
        {"a": keras.layers.Dense(1, name="a")(a), "b": keras.layers.Dense(1, name="b")(b)},
    )
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    return model


def max_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(a, b))


def check(condition, message):
    if not condition:
        raise SystemExit(f"FAILED: {message}")


def main():
    check(len(jax.devices()) == 8, f"expected 8 devices, got {jax.devices()}")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 16, 8)).astype("float32")
    y = {t: rng.normal(size=(32, 1)).astype("float32") for t in "ab"}

    keras.utils.set_random_seed(0)
    reference = build()
    initial = [np.asarray(v) for v in reference.weights]
    expected = reference.predict(x, verbose=0)
    reference.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)

    devices = keras.distribution.list_devices()
    # Experts per device of each bank, per mesh; None: replicated (4 MMoE
    # experts do not divide over 8 devices; the one shared expert never does).
    meshes = (
        ((2, 4), ("batch", "expert"), {"moe/experts": 2, "mmoe/experts": 1}),
        ((8,), ("expert",), {"moe/experts": 1, "mmoe/experts": None}),
    )
    for shape, axes, per_device in meshes:
        mesh = keras.distribution.DeviceMesh(shape, axes, devices)
        with expert_parallel(mesh).scope():
            model = build()
            model.set_weights(initial)
            sharded = 0
            for v in model.weights:
                shard = tuple(v.value.addressable_shards[0].data.shape)
                bank = v.path.rsplit("/", 1)[0]
                want = tuple(v.shape)
                if per_device.get(bank) is not None:
                    want = (per_device[bank],) + want[1:]
                    sharded += 1
                check(shard == want, f"mesh {shape}: {v.path} shard {shard}, expected {want}")
            check(sharded >= 4, f"mesh {shape}: only {sharded} sharded variables")
            # The expert buffers carry the expert sharding into the program.
            moe = model.get_layer("moe")
            lowered = (
                jax.jit(moe.stateless_call)
                .lower(
                    [v.value for v in moe.trainable_variables],
                    [v.value for v in moe.non_trainable_variables],
                    x[:4],
                )
                .as_text()
            )
            check(
                'sharding_constraint' in lowered and '"expert"' in lowered,
                "no expert sharding constraint in the lowered SparseMoE",
            )

            got = model.predict(x, verbose=0)
            diff = max(float(np.max(np.abs(got[t] - expected[t]))) for t in "ab")
            check(diff <= TOL, f"mesh {shape}: outputs differ by {diff}")
            model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
            diff = max_diff(model.weights, reference.weights)
            check(diff <= TOL, f"mesh {shape}: weights after one step differ by {diff}")
            print(f"mesh {shape} {axes}: outputs and one training step match")
    print("OK")


if __name__ == "__main__":
    main()
