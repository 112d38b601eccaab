import os

# XLA's LLVM back end at -O0 for the tests. The suite compiles hundreds of
# tiny programs (every weight initialiser of a new shape, every train and
# predict step on JAX) and runs each once or twice, so compile time is most
# of the JAX suite's time: -O0 took a PLE layer contract test from 29 s to
# 19 s (means of 4 and 3 runs, 2026-12-03). It changes how the code is
# optimised, not what it computes (rounding may differ in the last bits; the
# whole suite passes with the same tolerances). The examples and benchmarks,
# run as users run them, keep XLA's default level. Set before Keras imports
# a backend; a user's own XLA_FLAGS wins.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest


def pytest_report_header(config):
    return (
        f"keras {keras.__version__}, backend: {keras.backend.backend()} "
        f"(KERAS_BACKEND={os.environ.get('KERAS_BACKEND', '<unset>')})"
    )


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    keras.backend.clear_session(free_memory=False)
    keras.utils.set_random_seed(1234)
    yield
    keras.config.set_dtype_policy("float32")


# XLA compilation (`jit_compile=True`) is what TensorFlow and JAX do; on torch
# Keras maps it to torch.compile (TorchDynamo), a different compiler that the
# issue does not target and that takes minutes on 2 cores. Torch runs eagerly.
xla_only = pytest.mark.skipif(
    keras.backend.backend() == "torch",
    reason="jit_compile=True means XLA on TensorFlow/JAX; torch runs eagerly",
)


# The longest tests (the example scripts run as subprocesses, loading a file
# under the other backends, 8-device expert parallelism, 2-process training:
# 20-80 s each) are scheduled first, so that the xdist workers do not end
# with one of them running alone while the other worker is idle.
RUN_FIRST = (
    "test_examples.py",
    "test_cross_backend.py",
    "test_distribution.py",
    "test_multiprocess.py",
)


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.path.name not in RUN_FIRST)


class _InputProbe(keras.layers.Layer):
    """`layer(x[0] + offset)` for one batch `x` of shape `(1, N, ...)`, with a
    trainable zero `offset` of shape `(N, ...)`; keeps the output rows
    `rows` (a list output is concatenated on its last axis)."""

    def __init__(self, layer, rows, training, mask=None, **kwargs):
        super().__init__(**kwargs)
        self.layer, self.rows, self.training_mode = layer, list(rows), training
        self.token_mask = mask

    def build(self, input_shape):
        self.offset = self.add_weight(
            name="offset", shape=input_shape[1:], initializer="zeros"
        )

    def call(self, x):
        kwargs = {} if self.token_mask is None else {"mask": self.token_mask}
        y = self.layer(x[0] + self.offset, training=self.training_mode, **kwargs)
        if isinstance(y, (list, tuple)):
            y = keras.ops.concatenate(y, axis=-1)
        return keras.ops.take(y, self.rows, axis=0)[None]


def copy_weights(source, target):
    """Assigns `source`'s weights to `target`'s, as copies (JAX donates the
    buffers of the weights in `fit`, so sharing one would delete it)."""
    for a, b in zip(source.weights, target.weights):
        b.assign(keras.ops.convert_to_numpy(a).copy())


def input_gradients(layer, x, rows, training=True, mask=None, weights=False):
    """The gradient of `sum(layer(x)[rows])` (plus the layer's own losses)
    with respect to every row of `x`, the `N` tokens or examples `(N, ...)`
    of one call, as NumPy.

    Read off one eager SGD(1) step on a zero offset added to `x` (the step
    moves it by minus the gradient), so no backend's gradient API is needed.
    `layer` is called with `training` (which picks e.g. the custom gradient
    rules of `keras_moe.ops.dispatch` and `combine`) and `mask` if given.
    With `weights=True`, also returns the gradients of the layer's
    trainable weights, a list. The layer's variables are restored
    afterwards.
    """
    probe = _InputProbe(layer, rows, training, mask=mask, name="input_probe")
    inputs = keras.Input(x.shape, batch_size=1)
    model = keras.Model(inputs, probe(inputs))
    model.compile(
        optimizer=keras.optimizers.SGD(1.0),
        loss=lambda _, y: keras.ops.sum(y),
        run_eagerly=True,
    )
    saved = [np.array(keras.ops.convert_to_numpy(v)) for v in layer.variables]
    before = [np.array(keras.ops.convert_to_numpy(v)) for v in layer.trainable_weights]
    target = np.zeros((1,) + tuple(model.outputs[0].shape[1:]), "float32")
    model.train_on_batch(x[None], target)
    weight_gradients = [
        b - keras.ops.convert_to_numpy(v)
        for b, v in zip(before, layer.trainable_weights)
    ]
    for variable, value in zip(layer.variables, saved):
        variable.assign(value)
    gradient = -keras.ops.convert_to_numpy(probe.offset)
    return (gradient, weight_gradients) if weights else gradient


def tokens(shape, seed=0):
    """Standard normal float32 tokens (or examples) of `shape`."""
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def numpy_experts(layer, x):
    """Dense reference: a loop over experts with NumPy."""
    weights = {
        w.path.split("/")[-1]: keras.ops.convert_to_numpy(w) for w in layer.weights
    }
    act = lambda v: keras.ops.convert_to_numpy(layer.activation(v))  # noqa: E731
    out = []
    for e in range(layer.num_experts):
        h = x[e] @ weights["kernel_in"][e]
        if layer.use_bias:
            h = h + weights["bias_in"][e]
        if layer.gated:
            g = x[e] @ weights["kernel_gate"][e]
            if layer.use_bias:
                g = g + weights["bias_gate"][e]
            if layer.glu_limit is not None:
                g = np.minimum(g, layer.glu_limit)
                h = np.clip(h, -layer.glu_limit, layer.glu_limit)
            h = act(g) * (h + layer.glu_linear_offset)
        else:
            h = act(h)
        y = h @ weights["kernel_out"][e]
        if layer.use_bias:
            y = y + weights["bias_out"][e]
        if layer.output_scale:
            y = y * weights["expert_scale"][e]
        out.append(y)
    return np.stack(out)


def numpy_iou_giou(a, b):
    """Reference IoU and GIoU of single boxes [y1, x1, y2, x2] (float64)."""
    a, b = np.asarray(a, "float64"), np.asarray(b, "float64")
    area = lambda box: max(box[2] - box[0], 0) * max(box[3] - box[1], 0)
    ih = max(min(a[2], b[2]) - max(a[0], b[0]), 0)
    iw = max(min(a[3], b[3]) - max(a[1], b[1]), 0)
    inter = ih * iw
    union = area(a) + area(b) - inter
    enclosing = (max(a[2], b[2]) - min(a[0], b[0])) * (
        max(a[3], b[3]) - min(a[1], b[1])
    )
    iou = inter / union if union > 0 else 0.0
    giou = iou - (enclosing - union) / enclosing if enclosing > 0 else iou
    return iou, giou


def random_boxes(rng, shape):
    corners = np.sort(rng.uniform(size=shape + (2, 2)), axis=-2)
    y1, x1, y2, x2 = corners[..., 0, 0], corners[..., 0, 1], corners[..., 1, 0], corners[..., 1, 1]
    return np.stack([y1, x1, y2, x2], axis=-1).astype("float32")


def to_numpy(tree):
    """A tensor, or a nested structure of them, as NumPy."""
    return keras.tree.map_structure(keras.ops.convert_to_numpy, tree)


def weight(layer, name):
    """The variable of `layer` whose path ends with `name`."""
    matches = [w for w in layer.weights if w.path.endswith(name)]
    assert len(matches) == 1, [w.path for w in layer.weights]
    return matches[0]


def softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


# Non-default expert options, for the config round trips of the layers that
# own an `Experts` bank.
EXPERT_OPTIONS = dict(
    activation="silu",
    gated=True,
    use_bias=False,
    kernel_initializer="he_normal",
    bias_initializer="ones",
    kernel_regularizer="l2",
    bias_regularizer="l1",
)


def perturb_task_experts(cgc, task):
    """Adds noise to the output kernels of `task`'s experts in `cgc` (a
    `CGC` layer or a level of a `PLE`)."""
    kernel = weight(cgc.task_experts, "kernel_out")
    value = np.array(keras.ops.convert_to_numpy(kernel))
    m = cgc.num_task_experts
    value[task * m : (task + 1) * m] += 1.0
    kernel.assign(value)


# Layers built with "zeros" initializers, then `randomize`d: on JAX every
# random initializer compiles once per variable shape (about a second per
# MoE layer on 2 cores), so the compression and quantization tests draw
# their weights with NumPy instead.
ZEROS = "zeros"


def randomize(model, seed=0, scale=0.5):
    """Assigns NumPy normal values, `scale / sqrt(fan_in)`, to every float
    trainable variable of `model` (a layer or model); returns `model`."""
    rng = np.random.default_rng(seed)
    for variable in model.trainable_variables:
        if "float" not in str(variable.dtype):
            continue
        shape = tuple(variable.shape)
        fan_in = shape[-2] if len(shape) >= 2 else 1
        value = rng.normal(size=shape) * scale / np.sqrt(fan_in)
        variable.assign(value.astype(variable.dtype))
    return model


def zeros(cls, *args, **kwargs):
    """`cls(*args, **kwargs)` with `"zeros"` for each of its random
    initializers (then call `randomize` on the built model)."""
    from keras_moe.layers import CGC, PLE, MultiGateMoE, SoftMoE, SparseMoE

    names = ["kernel_initializer"]
    if cls is SparseMoE and "router" not in kwargs:
        names.append("router_kernel_initializer")
    if cls is SoftMoE:
        names.append("slot_initializer")
    if cls in (MultiGateMoE, CGC, PLE):
        names.append("gate_kernel_initializer")
    for name in names:
        kwargs.setdefault(name, ZEROS)
    return cls(*args, **kwargs)


def moe_model(moe, shape=(4, 8)):
    """A functional model around the layer `moe`, its weights `randomize`d."""
    inputs = keras.Input(shape)
    return randomize(keras.Model(inputs, moe(inputs)))
