import dataclasses
import inspect
import os
import random
from typing import Callable, Optional

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

from keras_moe import layers as moe_layers  # noqa: E402


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

    def __init__(self, layer, rows, training, mask=None, routing_inputs=None, **kwargs):
        super().__init__(**kwargs)
        self.layer, self.rows, self.training_mode = layer, list(rows), training
        self.token_mask, self.routing_inputs = mask, routing_inputs

    def build(self, input_shape):
        self.offset = self.add_weight(
            name="offset", shape=input_shape[1:], initializer="zeros"
        )

    def call(self, x):
        kwargs = {} if self.token_mask is None else {"mask": self.token_mask}
        if self.routing_inputs is not None:
            kwargs["routing_inputs"] = self.routing_inputs
        y = self.layer(x[0] + self.offset, training=self.training_mode, **kwargs)
        if isinstance(y, (list, tuple)):
            y = keras.ops.concatenate(y, axis=-1)
        return keras.ops.take(y, self.rows, axis=0)[None]


def copy_weights(source, target):
    """Assigns `source`'s weights to `target`'s, as copies (JAX donates the
    buffers of the weights in `fit`, so sharing one would delete it)."""
    for a, b in zip(source.weights, target.weights):
        b.assign(keras.ops.convert_to_numpy(a).copy())


def input_gradients(
    layer, x, rows, training=True, mask=None, weights=False, routing_inputs=None
):
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
    probe = _InputProbe(
        layer, rows, training, mask=mask, routing_inputs=routing_inputs,
        name="input_probe",
    )
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
    return cls(*args, **zero_initializers(cls, kwargs))


def zero_initializers(cls, kwargs):
    """`kwargs` with `"zeros"` for every `*_initializer` argument of `cls`
    not given (`router_kernel_initializer` only without a `router`)."""
    kwargs = dict(kwargs)
    for name in inspect.signature(cls.__init__).parameters:
        if not name.endswith("_initializer"):
            continue
        if name == "router_kernel_initializer" and "router" in kwargs:
            continue
        kwargs.setdefault(name, ZEROS)
    return kwargs


def moe_model(moe, shape=(4, 8)):
    """A functional model around the layer `moe`, its weights `randomize`d."""
    inputs = keras.Input(shape)
    return randomize(keras.Model(inputs, moe(inputs)))


# ---------------------------------------------------------------------------
# The case tables: ROUTER_CASES and LAYER_FAMILIES.
#
# A property that every router (or every layer family) should have is tested
# over these rows, so that a new router or layer family is a row here, not
# an edit in five test files. A row holds what the tests need: how to build
# it (small, non-default options), its routing ids if it routes on ids, and
# each property that does not apply (`without`) or fails today (`xfail`),
# with the reason. A test takes the rows of its property from
# `router_cases(P)` / `layer_cases(P)` (a row with an xfail for P comes as a
# strict xfail).
# ---------------------------------------------------------------------------

# The properties, and the tests that check them.
CONTRACT = "contract"  # tests/layers/routers/test_base.py
MIXED_BFLOAT16 = "mixed_bfloat16"  # tests/layers/routers/test_router_matrix.py
XLA = "xla"  # tests/layers/routers/test_router_matrix.py (TF and JAX)
KERAS_HARNESS = "keras_harness"  # tests/layers/test_keras_harness.py
MASKING = "masking"  # tests/layers/test_masking.py: padding changes nothing real
QUANTIZE = "quantize"  # tests/layers/test_quantization.py: int8 -> save -> load
PRUNE = "prune"  # tests/compression/test_pruning.py
RANDOM_SHAPES = "random_shapes"  # tests/layers/test_random_shapes.py (`draw`)
NAN_ISOLATION = "nan_isolation"  # tests/layers/routers/test_nan_isolation.py
PROPERTIES = (CONTRACT, MIXED_BFLOAT16, XLA, KERAS_HARNESS, MASKING, QUANTIZE,
              NAN_ISOLATION, PRUNE, RANDOM_SHAPES)

X = (4, 8)  # (batch, features): examples
TOKENS = (2, 5, 8)  # (batch, tokens, features)


def _check_reasons(row):
    for table in (row.without, row.xfail):
        unknown = set(table) - set(PROPERTIES)
        assert not unknown, f"{row.id}: unknown properties {sorted(unknown)}"
        assert all(isinstance(why, str) and why for why in table.values()), row.id


@dataclasses.dataclass(frozen=True, eq=False)
class RouterCase:
    """A row of `ROUTER_CASES`: one router configuration.

    Attributes:
        id: the test id.
        cls: the router class.
        kwargs: its constructor arguments besides `num_experts`.
        routing_ids: `(rng, shape) -> int ids` for a router that routes on
            ids (`routing_inputs=`); None for one that routes on the tokens.
        assigns_positions: the router places tokens in the expert buffers
            itself (the class must declare the same).
        harness: options for Keras's `run_layer_test` (its training check is
            off for every router: a routing dict cannot be fitted).
        unreachable: `(router, kept)`: makes the experts outside `kept`
            unreachable after `randomize` (pruning them then changes no
            output); None: the pruning test compares only the tokens that
            the router sends to kept experts.
        prune_keep: the experts (of 6) that the pruning test keeps.
        mask_gradients: also run the padding-gradient test on it (5-20 s
            on JAX: one row per dispatch path is enough).
        without: `{property: why it does not apply}`.
        xfail: `{property: why it fails today}`.
    """

    id: str
    cls: type
    kwargs: dict = dataclasses.field(default_factory=dict)
    routing_ids: Optional[Callable] = None
    assigns_positions: bool = False
    harness: dict = dataclasses.field(default_factory=dict)
    unreachable: Optional[Callable] = None
    prune_keep: tuple = (0, 1, 2, 3)
    mask_gradients: bool = False
    without: dict = dataclasses.field(default_factory=dict)
    xfail: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        _check_reasons(self)

    @property
    def needs_routing_inputs(self):
        return self.routing_ids is not None

    def init_kwargs(self, num_experts=4, zeros=False, **overrides):
        kwargs = dict(self.kwargs, num_experts=num_experts, **overrides)
        return zero_initializers(self.cls, kwargs) if zeros else kwargs

    def make(self, num_experts=4, zeros=False, **overrides):
        """The router, with `num_experts` experts (`zeros=True`: zero
        initializers; then `randomize` the built model)."""
        return self.cls(**self.init_kwargs(num_experts, zeros, **overrides))

    def moe(self, num_experts=4, hidden_dim=8, zeros=False, **kwargs):
        """A `SparseMoE` routed by this router: the layer in which the MoE
        tests run each router."""
        kwargs = dict(kwargs, router=self.make(num_experts, zeros=zeros))
        if zeros:
            kwargs = zero_initializers(moe_layers.SparseMoE, kwargs)
        return moe_layers.SparseMoE(num_experts, hidden_dim, **kwargs)

    def call_kwargs(self, shape, seed=0):
        """`{"routing_inputs": int32 ids of shape}` for an id router, else
        `{}`: the extra arguments of a call on tokens of shape `shape + (d,)`."""
        if self.routing_ids is None:
            return {}
        ids = self.routing_ids(np.random.default_rng(seed), shape)
        return {"routing_inputs": np.asarray(ids, "int32")}

    def model(self, layer, shape):
        """`(inputs, outputs)` of `layer` (a router, or a layer it routes)
        called on `keras.Input(shape)` tokens, and on an int32 ids input
        for an id router."""
        x_in = keras.Input(shape)
        if self.routing_ids is None:
            return x_in, layer(x_in)
        ids_in = keras.Input(shape[:-1], dtype="int32")
        return [x_in, ids_in], layer(x_in, routing_inputs=ids_in)

    def data(self, x, seed=0):
        """The input of `model` for the tokens `x`: `x`, or `[x, ids]`."""
        ids = self.call_kwargs(x.shape[:-1], seed).get("routing_inputs")
        return x if ids is None else [x, ids]


@dataclasses.dataclass(frozen=True, eq=False)
class LayerCase:
    """A row of `LAYER_FAMILIES`: one layer configuration. The rows of a
    class (a family) stand together; a test that needs one configuration
    per family (`layer_cases(P, one_per_family=True)`) takes the family's
    first row that has P.

    Attributes:
        id: the test id.
        cls: the layer class.
        kwargs: its constructor arguments, or a function returning them
            (where an argument is a layer: a new one for each layer).
        input_shape: the shape of its input, batch first.
        harness: options for Keras's `run_layer_test`.
        mask_gradients: also run the padding-gradient test on it (5-20 s on
            JAX: one row per path is enough).
        draw: `draw -> layer` with arguments drawn by hypothesis's `draw`
            (out-of-range ones included), for the random-shape test: on the
            family's first row.
        without: `{property: why it does not apply}`.
        xfail: `{property: why it fails today}`.
    """

    id: str
    cls: type
    kwargs: object
    input_shape: tuple
    harness: dict = dataclasses.field(default_factory=dict)
    mask_gradients: bool = False
    draw: Optional[Callable] = None
    without: dict = dataclasses.field(default_factory=dict)
    xfail: dict = dataclasses.field(default_factory=dict)

    routing_ids = None  # a layer row routes on its tokens (a class attribute)

    def __post_init__(self):
        _check_reasons(self)

    def init_kwargs(self, zeros=False, **overrides):
        kwargs = self.kwargs() if callable(self.kwargs) else dict(self.kwargs)
        kwargs.update(overrides)
        return zero_initializers(self.cls, kwargs) if zeros else kwargs

    def make(self, zeros=False, **overrides):
        """The layer (`zeros=True`: zero initializers; then `randomize`)."""
        return self.cls(**self.init_kwargs(zeros, **overrides))


def _params(rows, prop, skip_without=True):
    assert prop in PROPERTIES, f"{prop!r}: add the property to PROPERTIES"
    params = []
    for row in rows:
        marks = []
        if prop in row.without and not skip_without:
            continue
        if prop in row.without:
            marks.append(pytest.mark.skip(reason=f"{row.id}: {row.without[prop]}"))
        elif prop in row.xfail:
            marks.append(pytest.mark.xfail(reason=row.xfail[prop], strict=True))
        params.append(pytest.param(row, id=row.id, marks=marks))
    return params


def _first_of_each_family(rows, prop):
    seen, first = set(), []
    for row in rows:
        if prop not in row.without and row.cls not in seen:
            seen.add(row.cls)
            first.append(row)
    return first


def router_cases(prop):
    """The rows of `ROUTER_CASES` as pytest params for the property `prop`.
    Every router should have every router property: a row without `prop`
    comes as a skipped case that gives the reason."""
    return _params(ROUTER_CASES, prop)


def layer_cases(prop, one_per_family=False):
    """The rows of `LAYER_FAMILIES` that have the property `prop`, as pytest
    params (the layers are of different kinds, e.g. a head takes no token
    sequence: a row without `prop` is left out, its reason in the table);
    with `one_per_family`, the first such row of each family."""
    rows = _first_of_each_family(LAYER_FAMILIES, prop) if one_per_family else LAYER_FAMILIES
    return _params(rows, prop, skip_without=False)


# One hypothesis seed per session for the property tests parametrised over
# the tables (`@hypothesis.seed(SESSION_SEED)`): every row draws the same
# examples, so JAX compiles the ops that rows share once per shape, not once
# per row; the next session draws other examples.
SESSION_SEED = random.SystemRandom().getrandbits(32)


def cases_with(rows, prop):
    """The rows that have `prop` and do not fail it, for a test that runs
    them all in one model (one compile)."""
    return [row for row in rows if prop not in row.without and prop not in row.xfail]


# How the pruning test makes a router's experts outside `kept` unreachable.
def _kernel_columns(router, kept):
    """The other experts' router-kernel columns at -10: on positive tokens
    their logits are far below every kept expert's."""
    kernel = np.array(keras.ops.convert_to_numpy(router.kernel))
    kernel[:, [e for e in range(kernel.shape[-1]) if e not in kept]] = -10.0
    router.kernel.assign(kernel)


def _code_bits(router, kept):
    """DSelect-k addresses experts by a binary code: keeping the first
    `2**b` experts turns the higher bits of every selector off."""
    bits = int(np.log2(len(kept)))
    assert list(kept) == list(range(2**bits)), "DSelect-k keeps a prefix"
    bias = np.zeros((router.k, router.num_bits), "float32")
    bias[:, bits:] = -10.0
    router.code_bias.assign(bias.reshape(-1))


def _task_columns(router, kept):
    """The other experts' columns of the task-logit table at -1e3."""
    logits = np.array(keras.ops.convert_to_numpy(router.task_logits))
    logits[:, [e for e in range(logits.shape[-1]) if e not in kept]] = -1e3
    router.task_logits.assign(logits)


NUM_TASKS = 3
VOCAB = 16
# A router's losses and statistics stay float32 under any policy (a softmax
# over float16 logits routes badly; docs/guarantees.md): Keras's mixed-
# precision check, which wants every output in float16, does not apply.
FLOAT32_ROUTING_DICT = dict(run_mixed_precision_check=False)
ID_ROUTER_HARNESS = (
    "routes on ids passed as `routing_inputs`; Keras's harness calls the layer "
    "on the input tensor alone in its symbolic, build and mixed-precision "
    "checks, which an id router rejects with a ValueError by design (its own "
    "test file runs keras_moe.testing.run_layer_test with ids)"
)

ROUTER_CASES = (
    RouterCase(
        "top2", moe_layers.TopKRouter,
        dict(k=2, z_loss_weight=0.1, importance_weight=0.1),
        harness=FLOAT32_ROUTING_DICT, unreachable=_kernel_columns,
        mask_gradients=True,
    ),
    RouterCase(
        "top1_prioritized_sigmoid_bias", moe_layers.TopKRouter,
        dict(k=1, batch_prioritized=True, score_function="sigmoid",
             bias_update_rate=0.01),
        harness=FLOAT32_ROUTING_DICT, unreachable=_kernel_columns,
    ),
    RouterCase(
        "top2_noisy", moe_layers.TopKRouter,
        dict(k=2, noisy_gating=True, load_weight=0.1, use_bias=True),
        harness=FLOAT32_ROUTING_DICT, unreachable=_kernel_columns,
        without={MASKING: "its training noise is drawn for the whole batch, so "
                 "padding changes the real tokens' draws"},
    ),
    # Issue 34: DeepSeek-V3's group-limited routing (2 groups of E / 2
    # experts, the best one kept; pruning keeps 2 experts in each group of
    # 3) and Mixtral's router jitter.
    RouterCase(
        "top2_group_limited_sigmoid_bias", moe_layers.TopKRouter,
        dict(k=2, num_expert_groups=2, top_expert_groups=1,
             score_function="sigmoid", bias_update_rate=0.01),
        harness=FLOAT32_ROUTING_DICT, unreachable=_kernel_columns,
        prune_keep=(0, 1, 3, 4),
    ),
    RouterCase(
        "top2_jitter", moe_layers.TopKRouter,
        dict(k=2, jitter_noise=0.2, seed=5, z_loss_weight=0.1),
        harness=FLOAT32_ROUTING_DICT, unreachable=_kernel_columns,
        without={MASKING: "its training jitter is drawn for the whole batch, so "
                 "padding changes the real tokens' draws; "
                 "tests/layers/test_masking_fine_tuning.py checks it instead"},
    ),
    RouterCase(
        "expert_choice", moe_layers.ExpertChoiceRouter,
        dict(k=2, z_loss_weight=0.1, use_bias=True),
        assigns_positions=True, harness=FLOAT32_ROUTING_DICT,
        unreachable=_kernel_columns, mask_gradients=True,
    ),
    RouterCase(
        "balanced_assignment", moe_layers.BalancedAssignmentRouter,
        dict(num_iterations=4), unreachable=_kernel_columns,
    ),
    RouterCase(
        "dselect_k", moe_layers.DSelectKRouter, dict(k=2, entropy_weight=0.1),
        unreachable=_code_bits,
    ),
    RouterCase(
        "hash", moe_layers.HashRouter, dict(k=2, vocab_size=VOCAB),
        routing_ids=lambda rng, shape: rng.integers(0, VOCAB, shape),
        prune_keep=(0, 2, 3, 5),
        without={KERAS_HARNESS: ID_ROUTER_HARNESS},
    ),
    RouterCase(
        "task", moe_layers.TaskRouter,
        dict(num_tasks=NUM_TASKS, k=2, load_balance_weight=0.01),
        routing_ids=lambda rng, shape: rng.integers(0, NUM_TASKS, shape),
        unreachable=_task_columns,
        without={KERAS_HARNESS: ID_ROUTER_HARNESS},
    ),
)


# The arguments each family draws in the random-shape test (`draw` is
# hypothesis's `data.draw`). Out-of-range values (k = E + 1, 0 slots, ...)
# are drawn on purpose: the layer must raise a ValueError that names them.
def _draw_experts(draw):
    from hypothesis import strategies as st

    return moe_layers.Experts(draw(st.integers(1, 4)), draw(st.integers(1, 6)))


def _draw_sparse_moe(draw):
    from hypothesis import strategies as st

    e = draw(st.integers(1, 5))
    return moe_layers.SparseMoE(
        e,
        draw(st.integers(1, 6)),
        k=draw(st.integers(1, e + 1)),  # k = E + 1 is an error
        capacity_factor=draw(st.sampled_from([None, 0.5, 1.25, 0.0, -1.0])),
        eval_capacity_factor=draw(st.sampled_from([None, 0.25, 2.0])),
        dispatch=draw(st.sampled_from(["sparse", "dense"])),
        num_shared_experts=draw(st.integers(0, 1)),
    )


def _draw_soft_moe(draw):
    from hypothesis import strategies as st

    return moe_layers.SoftMoE(
        draw(st.integers(1, 4)),
        draw(st.integers(1, 6)),
        slots_per_expert=draw(st.integers(0, 2)),  # 0 is an error
    )


def _draw_mixture(draw):
    from hypothesis import strategies as st

    n = draw(st.integers(1, 4))
    return moe_layers.MixtureOfExperts(
        [keras.layers.Dense(3) for _ in range(n)],
        k=draw(st.sampled_from([None, 1, n, n + 1])),
        integration=draw(st.sampled_from(["weighted_sum", "max", "attention"])),
    )


def _draw_multi_gate(draw):
    from hypothesis import strategies as st

    e = draw(st.integers(1, 4))
    return moe_layers.MultiGateMoE(
        draw(st.integers(1, 3)),
        e,
        draw(st.integers(1, 6)),
        k=draw(st.sampled_from([None, 1, e, e + 1])),
        eval_capacity_factor=draw(st.sampled_from([None, 0.5])),
    )


def _draw_cgc(draw):
    from hypothesis import strategies as st

    return moe_layers.CGC(
        draw(st.integers(1, 3)),
        num_task_experts=draw(st.integers(0, 2)),
        num_shared_experts=draw(st.integers(0, 2)),  # 0 and 0 is an error
        hidden_dim=draw(st.integers(1, 6)),
    )


def _draw_ple(draw):
    from hypothesis import strategies as st

    return moe_layers.PLE(
        draw(st.integers(1, 3)),
        num_levels=draw(st.integers(0, 2)),  # 0 is an error
        num_task_experts=1,
        num_shared_experts=1,
        hidden_dim=draw(st.integers(1, 6)),
    )


def _draw_regression_head(draw):
    from hypothesis import strategies as st

    return moe_layers.RegressionHead(draw(st.integers(0, 3)))  # 0 is an error


def _draw_classification_head(draw):
    from hypothesis import strategies as st

    return moe_layers.ClassificationHead(draw(st.integers(0, 4)))  # 0: an error


# Keras's training check fits a model on the layer's output: it cannot feed
# a list (one output per task) to fit; tests/layers/test_<family>.py train
# those layers with keras_moe.testing.run_layer_test instead.
LIST_OUTPUT = dict(run_training_check=False)
NOT_TOKENS = "it takes examples (batch, features), not a token sequence to mask"
# The padding test takes 10-30 s a row on JAX: one row per path and family.
MASKED_IN_ANOTHER_ROW = "another row of its family runs the same path under masking"
PER_ROUTER = "the quantization test runs SparseMoE once per ROUTER_CASES row"


def _dense_experts(n):
    return [keras.layers.Dense(3) for _ in range(n)]


LAYER_FAMILIES = (
    LayerCase(
        "experts", moe_layers.Experts, dict(num_experts=3, hidden_dim=4), (3, 5, 8),
        draw=_draw_experts,
        without={MASKING: "a bank: its input is (experts, capacity, d) buffers"},
    ),
    # SparseMoE: the masking, quantization and pruning tests also run it
    # once per router (`RouterCase.moe`).
    LayerCase(
        "sparse_moe", moe_layers.SparseMoE,
        dict(num_experts=4, hidden_dim=8, k=1, capacity_factor=0.75,
             eval_capacity_factor=0.75),
        TOKENS, harness=dict(supports_masking=True), draw=_draw_sparse_moe,
        without={QUANTIZE: PER_ROUTER},
    ),
    LayerCase(
        "sparse_moe_dropless_shared", moe_layers.SparseMoE,
        dict(num_experts=4, hidden_dim=8, k=2, capacity_factor=None,
             num_shared_experts=1, z_loss_weight=0.1),
        TOKENS, harness=dict(supports_masking=True), mask_gradients=True,
    ),
    LayerCase(
        "sparse_moe_lora_shared", moe_layers.SparseMoE,
        dict(num_experts=4, hidden_dim=8, k=2, capacity_factor=0.75,
             eval_capacity_factor=0.75, num_shared_experts=1, lora_rank=2),
        TOKENS, harness=dict(supports_masking=True),
    ),
    LayerCase(
        "soft_moe", moe_layers.SoftMoE,
        dict(num_experts=4, hidden_dim=8, slots_per_expert=2), TOKENS,
        harness=dict(supports_masking=True), mask_gradients=True,
        draw=_draw_soft_moe,
    ),
    LayerCase(
        "mixture", moe_layers.MixtureOfExperts,
        lambda: dict(experts=_dense_experts(3), integration="attention", k=2), X,
        draw=_draw_mixture, without={MASKING: NOT_TOKENS},
    ),
    LayerCase(
        "mixture_dense", moe_layers.MixtureOfExperts,
        lambda: dict(experts=_dense_experts(2)), X, without={MASKING: NOT_TOKENS},
    ),
    # Multi-task layers: one output per task (a list).
    LayerCase(
        "multi_gate_moe_sparse", moe_layers.MultiGateMoE,
        dict(num_tasks=2, num_experts=4, hidden_dim=8, k=2, capacity_factor=0.75,
             eval_capacity_factor=0.75),
        TOKENS, harness=LIST_OUTPUT, draw=_draw_multi_gate,
    ),
    LayerCase(
        "multi_gate_moe_dense", moe_layers.MultiGateMoE,
        dict(num_tasks=2, num_experts=4, hidden_dim=8), X, harness=LIST_OUTPUT,
        mask_gradients=True,
    ),
    LayerCase(
        "multi_gate_moe_mixed_routers", moe_layers.MultiGateMoE,
        lambda: dict(
            num_tasks=2, num_experts=4, hidden_dim=8, capacity_factor=1.0,
            eval_capacity_factor=1.0,
            routers=[moe_layers.DSelectKRouter(4, k=2, entropy_weight=0.1),
                     moe_layers.ExpertChoiceRouter(4)],
        ),
        TOKENS, harness=LIST_OUTPUT, mask_gradients=True,
    ),
    LayerCase(
        "cgc", moe_layers.CGC,
        dict(num_tasks=2, num_task_experts=1, num_shared_experts=1, hidden_dim=4),
        X, harness=LIST_OUTPUT, draw=_draw_cgc,
        without={MASKING: MASKED_IN_ANOTHER_ROW},
    ),
    LayerCase(
        "cgc_sparse_shared_output", moe_layers.CGC,
        dict(num_tasks=2, num_task_experts=1, num_shared_experts=2, hidden_dim=8,
             shared_output=True, k=2),
        TOKENS, harness=LIST_OUTPUT,
    ),
    LayerCase(
        "ple", moe_layers.PLE,
        dict(num_tasks=2, num_levels=2, num_task_experts=1, num_shared_experts=1,
             hidden_dim=8),
        TOKENS, harness=LIST_OUTPUT, draw=_draw_ple,
    ),
    # Task heads: (batch, features) -> predictions.
    LayerCase(
        "regression_head", moe_layers.RegressionHead, dict(units=2), X,
        draw=_draw_regression_head, without={MASKING: NOT_TOKENS},
    ),
    LayerCase(
        "classification_head", moe_layers.ClassificationHead,
        dict(num_classes=3, hidden_units=[4]), X,
        draw=_draw_classification_head, without={MASKING: NOT_TOKENS},
    ),
    LayerCase(
        "binary_head", moe_layers.BinaryHead, dict(hidden_units=[4]), X,
        draw=lambda draw: moe_layers.BinaryHead(), without={MASKING: NOT_TOKENS},
    ),
    LayerCase(
        "box_head", moe_layers.BoxHead, dict(hidden_units=[4]), X,
        draw=lambda draw: moe_layers.BoxHead(), without={MASKING: NOT_TOKENS},
    ),
)


def _check_tables():
    for table in (ROUTER_CASES, LAYER_FAMILIES):
        ids = [row.id for row in table]
        assert len(set(ids)) == len(ids), f"an id twice in a case table: {ids}"
    families = [row.cls for row in LAYER_FAMILIES]
    for cls in set(families):  # the rows of a family stand together
        where = [i for i, c in enumerate(families) if c is cls]
        assert where == list(range(where[0], where[-1] + 1)), cls.__name__
    for row in _first_of_each_family(LAYER_FAMILIES, RANDOM_SHAPES):
        assert row.draw is not None, f"{row.id}: the family's first row draws"


_check_tables()
