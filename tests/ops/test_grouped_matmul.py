"""grouped_matmul: every kernel of the running backend equals the portable
reference (outputs and gradients), the facade falls back to the reference
where no kernel can run or the kernels are switched off, and one row's NaN
stays in that row.

Gradients are read off one eager SGD(1) step of a model whose loss is
`sum(out * cotangent)` (no backend's gradient API is needed)."""

import types

import keras
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from keras_moe import ops as moe_ops
from keras_moe.ops import grouped

KERNELS = sorted(grouped.backend_kernels())
BACKEND = keras.backend.backend()
# The backends without a kernel (numpy, openvino) have nothing to compare.
KERNEL_NAMES = KERNELS or [
    pytest.param(None, marks=pytest.mark.skip(reason=f"{BACKEND} has no kernel"))
]


def numpy_grouped_matmul(rows, weights, sizes, bias=None):
    out = np.zeros((rows.shape[0], weights.shape[-1]), "float64")
    start = 0
    for g, size in enumerate(sizes):
        out[start : start + size] = rows[start : start + size] @ weights[g]
        if bias is not None:
            out[start : start + size] += bias[g]
        start += size
    return out


def make_case(sizes, padding, k, n, seed, use_bias=True):
    rng = np.random.default_rng(seed)
    sizes = np.asarray(sizes, "int32")
    m = int(sizes.sum()) + padding
    return dict(
        rows=rng.normal(size=(m, k)).astype("float32"),
        weights=rng.normal(size=(len(sizes), k, n)).astype("float32"),
        group_sizes=sizes,
        bias=rng.normal(size=(len(sizes), n)).astype("float32") if use_bias else None,
    )


class _TwoProducts(keras.layers.Layer):
    """`sum(c * f(rows, weights, sizes, bias))` for two functions `f`, each
    on its own copy of the variables, as a `(1, 1)` output."""

    def __init__(self, functions, case, cotangent, **kwargs):
        super().__init__(**kwargs)
        self.functions, self.cotangent = functions, cotangent
        self.group_sizes = case["group_sizes"]
        self.copies = []
        for i in range(len(functions)):
            copy = {}
            for name in ("rows", "weights", "bias"):
                if case[name] is not None:
                    copy[name] = self.add_weight(
                        shape=case[name].shape,
                        initializer=keras.initializers.Constant(case[name]),
                        name=f"{name}_{i}",
                    )
            self.copies.append(copy)

    def call(self, x):
        total = keras.ops.zeros_like(x)
        for function, copy in zip(self.functions, self.copies):
            out = function(
                keras.ops.convert_to_tensor(copy["rows"]),
                keras.ops.convert_to_tensor(copy["weights"]),
                keras.ops.convert_to_tensor(self.group_sizes),
                keras.ops.convert_to_tensor(copy["bias"]) if "bias" in copy else None,
            )
            cotangent = keras.ops.convert_to_tensor(self.cotangent)
            total = total + keras.ops.sum(out * cotangent)
        return total


def gradients(functions, case, seed=0):
    """`[{name: d loss / d name}]` for each function of `functions`."""
    rows, weights = case["rows"], case["weights"]
    cotangent = np.random.default_rng(seed + 1).normal(
        size=(rows.shape[0], weights.shape[-1])
    ).astype("float32")
    layer = _TwoProducts(functions, case, cotangent)
    inputs = keras.Input((1,), batch_size=1)
    model = keras.Model(inputs, layer(inputs))
    model.compile(
        optimizer=keras.optimizers.SGD(1.0),
        loss=lambda _, y: keras.ops.sum(y),
        run_eagerly=True,
    )
    before = [{k: keras.ops.convert_to_numpy(v) for k, v in c.items()} for c in layer.copies]
    model.train_on_batch(np.zeros((1, 1), "float32"), np.zeros((1, 1), "float32"))
    return [
        {k: before[i][k] - keras.ops.convert_to_numpy(v) for k, v in c.items()}
        for i, c in enumerate(layer.copies)
    ]


def kernel(name):
    """The kernel `name` of the running backend, on backend tensors."""
    function = grouped.backend_kernels()[name]

    def call(rows, weights, group_sizes, bias=None):
        to_tensor = keras.ops.convert_to_tensor
        return function(
            to_tensor(rows),
            to_tensor(weights),
            to_tensor(group_sizes, "int32"),
            None if bias is None else to_tensor(bias),
        )

    return call


@st.composite
def grouped_cases(draw):
    num_groups = draw(st.integers(1, 6))
    layout = draw(st.sampled_from(["random", "one group", "all empty"]))
    if layout == "random":  # zeros included: empty groups
        sizes = draw(st.lists(st.integers(0, 5), min_size=num_groups, max_size=num_groups))
    else:
        sizes = [0] * num_groups
        if layout == "one group":
            sizes[draw(st.integers(0, num_groups - 1))] = draw(st.integers(1, 9))
    padding = draw(st.integers(0, 3))
    if sum(sizes) + padding == 0:
        padding = 1  # M = 0 is tested on its own (no variable of size 0)
    k = draw(st.sampled_from([1, 3, 4, 8]))
    n = draw(st.sampled_from([1, 4, 8]))
    return sizes, padding, k, n, draw(st.booleans()), draw(st.integers(0, 1000))


@pytest.mark.parametrize("name", KERNEL_NAMES)
@settings(max_examples=6, deadline=None, derandomize=True)
@given(grouped_cases())
# Row strides of 16 bytes (the aligned case of torch's grouped_mm) and not.
@example(([3, 0, 5, 2], 2, 8, 4, True, 0))
@example(([0, 7, 0], 0, 3, 5, True, 1))
@example(([0, 0, 9, 0], 0, 4, 4, False, 2))
@example(([2, 0, 1, 0, 0, 3], 3, 8, 8, True, 3))
def test_kernel_equals_reference(name, case):
    """Outputs and the gradients of rows, weights and bias of each kernel
    equal the portable reference (and NumPy) to 1e-5: empty groups, one
    group holding every row, padding rows, with and without a bias."""
    sizes, padding, k, n, use_bias, seed = case
    data = make_case(sizes, padding, k, n, seed, use_bias)
    args = (data["rows"], data["weights"], data["group_sizes"], data["bias"])
    expected = numpy_grouped_matmul(*args)
    out = keras.ops.convert_to_numpy(kernel(name)(*args))
    reference = keras.ops.convert_to_numpy(grouped.reference_grouped_matmul(*args))
    np.testing.assert_allclose(reference, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out[sum(sizes):], 0.0)

    got, want = gradients([kernel(name), grouped.reference_grouped_matmul], data, seed)
    assert sorted(got) == sorted(want) == sorted(
        key for key in ("rows", "weights", "bias") if data[key] is not None
    )
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got["rows"][sum(sizes):], 0.0)


@pytest.mark.parametrize("name", ["facade", "reference"] + KERNELS)
def test_no_rows(name):
    """M = 0 rows (all groups empty) gives a `(0, N)` result."""
    function = {
        "facade": moe_ops.grouped_matmul,
        "reference": grouped.reference_grouped_matmul,
    }.get(name) or kernel(name)
    data = make_case([0, 0, 0], 0, 4, 8, seed=0)
    out = function(data["rows"], data["weights"], data["group_sizes"], data["bias"])
    assert tuple(out.shape) == (0, 8)


@pytest.mark.parametrize("name", ["facade", "reference"] + KERNELS)
def test_nan_stays_in_its_row(name):
    """A NaN row makes only its own output NaN, and only its own group's
    weight gradient; a NaN padding row reaches nothing; padding rows output
    exact zeros."""
    function = {
        "facade": moe_ops.grouped_matmul,
        "reference": grouped.reference_grouped_matmul,
    }.get(name) or kernel(name)
    data = make_case([3, 0, 4, 2], padding=3, k=4, n=8, seed=3)
    data["rows"][4] = np.nan  # group 2 (rows 3-6)
    data["rows"][10] = np.nan  # padding (rows 9-11)
    out = keras.ops.convert_to_numpy(
        function(data["rows"], data["weights"], data["group_sizes"], data["bias"])
    )
    assert np.isnan(out[4]).all()
    assert np.isfinite(np.delete(out, 4, axis=0)).all()
    np.testing.assert_array_equal(out[9:], 0.0)

    (grad,) = gradients([function], data)
    # (The NaN rows' own entries read NaN: a NaN variable minus its update.)
    assert np.isfinite(np.delete(grad["rows"], [4, 10], axis=0)).all()
    assert np.isnan(grad["weights"][2]).all()
    assert np.isfinite(np.delete(grad["weights"], 2, axis=0)).all()
    assert np.isfinite(grad["bias"]).all()


class _Recorder(keras.layers.Layer):
    """`grouped_matmul(x, W, sizes)`, recording at each trace whether a
    kernel was available."""

    def __init__(self, case, **kwargs):
        super().__init__(**kwargs)
        self.case, self.available = case, []

    def build(self, input_shape):
        self.w = self.add_weight(
            shape=self.case["weights"].shape,
            initializer=keras.initializers.Constant(self.case["weights"]),
        )

    def call(self, x):
        self.available.append(grouped.grouped_kernel_available(x))
        return moe_ops.grouped_matmul(x, self.w, self.case["group_sizes"])


def recorder_model(case, **compile_args):
    layer = _Recorder(case)
    rows = case["rows"]
    inputs = keras.Input(rows.shape[1:], batch_size=rows.shape[0])
    model = keras.Model(inputs, layer(inputs))
    model.compile(**compile_args)
    layer.available.clear()  # forget the symbolic call
    return model, layer


def test_facade_in_a_model_equals_reference():
    """Built symbolically, called eagerly and in a compiled predict (each
    backend's default compilation), the facade gives the reference."""
    data = make_case([2, 0, 5], padding=1, k=4, n=8, seed=4)
    expected = keras.ops.convert_to_numpy(
        grouped.reference_grouped_matmul(data["rows"], data["weights"], data["group_sizes"])
    )
    model, _ = recorder_model(data)
    assert tuple(model.output.shape) == (8, 8)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(model(data["rows"])), expected, rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        model.predict_on_batch(data["rows"]), expected, rtol=1e-5, atol=1e-5
    )


class _RaisingBackend(types.SimpleNamespace):
    """A backend module whose kernel is always available and always fails."""

    KERNELS = {}

    def kernel_available(self, rows=None):
        return True

    def grouped_matmul(self, *args):
        raise RuntimeError("kernel called")


def test_use_kernels_switch_forces_the_reference(monkeypatch):
    """`use_kernels(False)` (globally or as a context manager) routes every
    call to the reference and makes the facade report no kernel; the
    previous setting comes back after the `with` block."""
    monkeypatch.setattr(grouped, "_BACKEND", _RaisingBackend())
    data = make_case([1, 2], padding=1, k=2, n=3, seed=5)
    args = (data["rows"], data["weights"], data["group_sizes"], data["bias"])
    expected = keras.ops.convert_to_numpy(grouped.reference_grouped_matmul(*args))
    assert grouped.grouped_kernel_available()
    with pytest.raises(RuntimeError, match="kernel called"):
        moe_ops.grouped_matmul(*args)
    with grouped.use_kernels(False):
        assert not grouped.kernels_enabled()
        assert not moe_ops.grouped_kernel_available()
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(moe_ops.grouped_matmul(*args)), expected
        )
    assert grouped.kernels_enabled() and grouped.grouped_kernel_available()
    try:
        grouped.use_kernels(False)
        assert not grouped.grouped_kernel_available()
    finally:
        grouped.use_kernels(True)
    with pytest.raises(ValueError, match="enabled=1"):
        grouped.use_kernels(1)


def test_bad_shapes_name_the_argument():
    data = make_case([1, 2], padding=0, k=2, n=3, seed=6)
    with pytest.raises(ValueError, match="group_sizes.shape"):
        moe_ops.grouped_matmul(data["rows"], data["weights"], np.array([3], "int32"))
    with pytest.raises(ValueError, match="bias.shape"):
        moe_ops.grouped_matmul(
            data["rows"], data["weights"], data["group_sizes"], np.zeros((2, 4))
        )
    with pytest.raises(ValueError, match="rows.shape"):
        moe_ops.grouped_matmul(data["rows"][:, :1], data["weights"], data["group_sizes"])


@pytest.mark.skipif(
    BACKEND != "tensorflow",
    reason="XLA-context detection is TensorFlow's (JAX's kernel depends on "
    "the device, and jit_compile on torch means torch.compile)",
)
def test_tensorflow_kernel_runs_outside_xla_only():
    """Eagerly and in a `tf.function` without XLA the kernel runs; under
    `jit_compile=True` the facade reports none and runs the reference."""
    data = make_case([2, 0, 5], padding=1, k=4, n=8, seed=7)
    expected = keras.ops.convert_to_numpy(
        grouped.reference_grouped_matmul(data["rows"], data["weights"], data["group_sizes"])
    )
    assert grouped.grouped_kernel_available()
    for jit_compile, available in ((False, True), (True, False)):
        model, layer = recorder_model(data, jit_compile=jit_compile)
        out = model.predict_on_batch(data["rows"])
        assert layer.available == [available]
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(
    BACKEND != "torch", reason="meta tensors and torch.compile are torch's"
)
def test_torch_kernel_not_on_meta_tensors_nor_under_compile():
    """Keras' shape inference runs a layer on meta tensors, and
    torch.compile traces with fake tensors: the facade reports no kernel
    there and runs the reference (dynamo's eager backend: the trace without
    inductor's compile)."""
    import torch

    data = make_case([2, 0, 5], padding=1, k=4, n=8, seed=8)
    rows = torch.tensor(data["rows"])
    weights = torch.tensor(data["weights"])
    sizes = torch.tensor(data["group_sizes"])
    assert grouped.grouped_kernel_available(rows)
    with keras.device("meta"):  # as Keras' compute_output_spec does
        meta = keras.ops.convert_to_tensor(data["rows"])
        assert not grouped.grouped_kernel_available(meta)
        out = moe_ops.grouped_matmul(meta, data["weights"], data["group_sizes"])
    assert out.device.type == "meta" and tuple(out.shape) == (8, 8)
    layer = _Recorder(data)
    layer(keras.Input((4,), batch_size=8))  # a symbolic call
    assert layer.available == [False]

    seen = []

    def function(rows, weights, sizes):
        seen.append(grouped.grouped_kernel_available(rows))
        return moe_ops.grouped_matmul(rows, weights, sizes)

    compiled = torch.compile(function, backend="eager", fullgraph=True)
    expected = grouped.reference_grouped_matmul(rows, weights, sizes)
    torch.testing.assert_close(compiled(rows, weights, sizes), expected)
    assert seen == [False]


@pytest.mark.skipif(BACKEND != "jax", reason="ragged_dot's device test is JAX's")
def test_jax_kernel_only_on_accelerators():
    """On CPU `ragged_dot` is a dense fallback: the facade reports no kernel
    and runs the reference (on a GPU or TPU the kernel is used)."""
    import jax

    if jax.default_backend() != "cpu":
        pytest.skip("an accelerator: ragged_dot is the kernel there")
    assert not grouped.grouped_kernel_available()
    data = make_case([2, 0, 5], padding=1, k=4, n=8, seed=9)
    args = (data["rows"], data["weights"], data["group_sizes"], data["bias"])
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(moe_ops.grouped_matmul(*args)),
        keras.ops.convert_to_numpy(grouped.reference_grouped_matmul(*args)),
    )
