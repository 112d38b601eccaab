"""One shared check of the Keras layer contract, used by every layer test."""

import json
import os
import tempfile

import keras
import numpy as np

_PLAIN = (bool, int, float, str, type(None))


def _plain(value):
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return isinstance(value, _PLAIN)


def _to_numpy(tree):
    return keras.tree.map_structure(keras.ops.convert_to_numpy, tree)


def _is_shape(value):
    return isinstance(value, (list, tuple)) and all(
        v is None or isinstance(v, (int, np.integer)) for v in value
    )


def _shapes(tree):
    """A tensor, a shape tuple, or a dict/list of either -> comparable shapes."""
    if isinstance(tree, dict):
        return {key: _shapes(value) for key, value in tree.items()}
    if hasattr(tree, "shape"):
        return tuple(tree.shape)
    if isinstance(tree, (list, tuple)) and not _is_shape(tree):
        return [_shapes(value) for value in tree]
    return tuple(tree)


def _as_list(outputs):
    """The output tensors of a layer (one tensor or a list/tuple of them)."""
    return list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]


def _assert_output_shapes(outputs, expected):
    """`expected` is one shape for one tensor or a list of shapes."""
    got = _shapes(outputs)
    if isinstance(got, list):
        assert got == [tuple(s) for s in expected], (got, expected)
    else:
        assert got == tuple(expected), (got, expected)


def assert_all_finite(tree, what="outputs"):
    for leaf in keras.tree.flatten(_to_numpy(tree)):
        leaf = np.asarray(leaf)
        if np.issubdtype(leaf.dtype, np.floating) and not np.all(
            np.isfinite(leaf.astype("float32"))
        ):
            raise AssertionError(f"{what} contain NaN or Inf")


def check_config_round_trip(layer_cls, init_kwargs):
    """Every constructor argument is in `get_config` and survives
    `from_config` and a JSON round trip of the serialized layer."""
    layer = layer_cls(**init_kwargs)
    config = layer.get_config()
    for name, value in init_kwargs.items():
        if name in ("name", "dtype"):
            continue
        assert name in config, (
            f"{layer_cls.__name__}.get_config() forgets the argument {name!r}"
        )
        if _plain(value) and _plain(config[name]):
            expected = list(value) if isinstance(value, tuple) else value
            got = config[name]
            got = list(got) if isinstance(got, tuple) else got
            assert got == expected, (
                f"{layer_cls.__name__}.get_config()[{name!r}] is {got!r}, "
                f"but the layer was made with {value!r}"
            )
    revived = layer_cls.from_config(config)
    assert revived.get_config() == config, "from_config(get_config()) differs"
    serialized = json.loads(json.dumps(keras.saving.serialize_keras_object(layer)))
    again = keras.saving.deserialize_keras_object(serialized)
    assert type(again) is layer_cls
    assert again.get_config() == config, "JSON round trip changes the config"
    return config


def run_layer_test(
    layer_cls,
    init_kwargs,
    input_data,
    expected_output_shape=None,
    expected_num_trainable_weights=None,
    expected_num_non_trainable_weights=None,
    output_selector=None,
    run_fit=True,
    atol=1e-6,
):
    """Checks the Keras contract of a layer.

    1. Config: every argument in `get_config` (non-default values are the
       point), `from_config` and JSON round trips.
    2. Build: `build(input_shape)` creates the expected weights.
    3. Symbolic call on `keras.Input` agrees with `compute_output_shape`.
    4. Eager call: expected shape, finite values.
    5. `fit`: one epoch on a functional model wrapping the layer; the loss is
       finite and the trainable weights move.
    6. `.keras` save -> load gives identical predictions.

    Layers with several inputs (a list of arrays) or several outputs (a list
    of tensors, e.g. one per task) are supported: the functional model gets
    the list of inputs and outputs and `fit` trains every output with MSE.

    Args:
        layer_cls: the layer class.
        init_kwargs: constructor arguments; use non-default values.
        input_data: a NumPy array whose first axis is the batch axis, or a
            list of such arrays for a layer called on a list of tensors.
        expected_output_shape: the full output shape for `input_data` (a
            list of shapes for a layer that returns a list).
        expected_num_trainable_weights / expected_num_non_trainable_weights:
            counts after `build`, when given.
        output_selector: maps the layer's output structure to the one tensor
            to train on (for layers that return dicts, e.g. routers).
        run_fit: set `False` for layers with nothing trainable.
        atol: tolerance of the save/load comparison.
    """
    select = output_selector or (lambda outputs: outputs)
    if isinstance(input_data, (list, tuple)):
        input_data = [np.asarray(x) for x in input_data]
        input_shape = [x.shape for x in input_data]
        batch_size = input_data[0].shape[0]
    else:
        input_data = np.asarray(input_data)
        input_shape = input_data.shape
        batch_size = input_shape[0]

    # 1. Config.
    check_config_round_trip(layer_cls, init_kwargs)

    # 2. Build.
    layer = layer_cls(**init_kwargs)
    layer.build(input_shape)
    assert layer.built
    if expected_num_trainable_weights is not None:
        assert len(layer.trainable_weights) == expected_num_trainable_weights, (
            [w.path for w in layer.trainable_weights]
        )
    if expected_num_non_trainable_weights is not None:
        assert (
            len(layer.non_trainable_weights) == expected_num_non_trainable_weights
        ), [w.path for w in layer.non_trainable_weights]

    # 3. Symbolic call.
    layer = layer_cls(**init_kwargs)
    if isinstance(input_data, list):
        inputs = [
            keras.Input(batch_shape=x.shape, dtype=str(x.dtype)) for x in input_data
        ]
    else:
        inputs = keras.Input(batch_shape=input_shape, dtype=str(input_data.dtype))
    symbolic = layer(inputs)
    assert _shapes(symbolic) == _shapes(layer.compute_output_shape(input_shape))
    if expected_output_shape is not None:
        _assert_output_shapes(select(symbolic), expected_output_shape)

    # 4. Eager call.
    eager = layer(input_data)
    assert_all_finite(eager)
    if expected_output_shape is not None:
        _assert_output_shapes(select(eager), expected_output_shape)

    # 5. fit.
    model = keras.Model(inputs, select(symbolic))
    if run_fit:
        rng = np.random.default_rng(0)
        targets = [
            rng.normal(size=tuple(out.shape)).astype("float32")
            for out in _as_list(select(symbolic))
        ]
        target = targets if isinstance(select(symbolic), (list, tuple)) else targets[0]
        before = [np.array(w.numpy()) for w in model.trainable_weights]
        assert before, "the layer has no trainable weights; pass run_fit=False"
        model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
        history = model.fit(
            input_data, target, batch_size=batch_size, epochs=1, verbose=0
        )
        assert np.isfinite(history.history["loss"][0])
        after = [keras.ops.convert_to_numpy(w) for w in model.trainable_weights]
        moved = [not np.array_equal(b, a) for b, a in zip(before, after)]
        assert any(moved), "fit did not change any trainable weight"

    # 6. Save and load.
    expected = model.predict(input_data, batch_size=batch_size, verbose=0)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.keras")
        model.save(path)
        loaded = keras.saving.load_model(path)
    got = loaded.predict(input_data, batch_size=batch_size, verbose=0)
    expected, got = _as_list(expected), _as_list(got)
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        np.testing.assert_allclose(
            np.asarray(a, "float32"), np.asarray(b, "float32"), atol=atol, rtol=0
        )
    return model
