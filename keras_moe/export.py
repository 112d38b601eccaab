"""Export a Keras model to a TensorFlow SavedModel (or ONNX) from any backend.

`export_saved_model(model, path)` gives a SavedModel with a `serve` endpoint
and a `serving_default` signature (a dict of named inputs in, a dict of named
outputs out), callable with `tf.saved_model.load(path).serve(...)` and servable
by TF Serving, for a model built and trained on TensorFlow, JAX or PyTorch:

- TensorFlow and JAX: Keras' own `model.export(path, format="tf_saved_model")`.
- PyTorch: Keras 3.15's torch exporter fails for any functional model (the
  inputs/`dynamic_shapes` structure mismatch in `torch.export`) and needs
  `torch_xla`, which has no build for torch 2.13. So the model is saved to a
  temporary `.keras` file and exported by a TensorFlow-backend subprocess:

      KERAS_BACKEND=tensorflow python -m keras_moe.export model.keras out_dir

  which loads the file and calls `model.export`. The weights are the same, so
  the SavedModel computes what the torch model computes.

`export_onnx(model, path)` wraps `model.export(path, format="onnx")` and checks
that ONNX Runtime can load the result (several ops that our sparse routers use
have no ONNX conversion in the current converters; see docs/export.md).

References:
    Keras export API: `keras.Model.export`, `keras.export.ExportArchive`.
"""

import argparse
import contextlib
import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile

import keras

from keras_moe.ops import grouped
from keras_moe.utils import validation

# Backends on which Keras' `model.export(format="tf_saved_model")` works.
DIRECT_BACKENDS = ("tensorflow", "jax")
_CHILD_BACKEND = "tensorflow"
_INSTALL_TF = 'pip install "keras-moe[tensorflow]"  (or tensorflow-cpu)'
_INSTALL_ONNX = 'pip install "keras-moe[onnx]"'
_MAX_ERROR_CHARS = 6000


def _tensorflow_available():
    return importlib.util.find_spec("tensorflow") is not None


def _require_tensorflow(what):
    if not _tensorflow_available():
        raise ImportError(
            f"{what} needs TensorFlow (a SavedModel is a TensorFlow format), "
            f"but it is not installed. Install it with: {_INSTALL_TF}"
        )


# ---------------------------------------------------------------------------
# Input signatures through JSON (for the subprocess)
# ---------------------------------------------------------------------------


def _spec_to_json(spec):
    if isinstance(spec, dict):
        return {"dict": {key: _spec_to_json(value) for key, value in spec.items()}}
    if isinstance(spec, (list, tuple)):
        return {"list": [_spec_to_json(value) for value in spec]}
    shape = getattr(spec, "shape", None)
    dtype = getattr(spec, "dtype", None)
    if shape is None or dtype is None:
        raise ValueError(
            "input_signature must be a structure (list, tuple, dict) of "
            "keras.InputSpec, keras.KerasTensor or tf.TensorSpec with a shape "
            f"and a dtype. Received: {spec!r}"
        )
    dtype = getattr(dtype, "name", dtype)  # tf.DType -> "float32"
    shape = [None if d is None else int(d) for d in tuple(shape)]
    return {"spec": {"shape": shape, "dtype": str(dtype),
                     "name": getattr(spec, "name", None)}}


def _spec_from_json(data):
    if "dict" in data:
        return {key: _spec_from_json(value) for key, value in data["dict"].items()}
    if "list" in data:
        return [_spec_from_json(value) for value in data["list"]]
    spec = data["spec"]
    return keras.InputSpec(shape=tuple(spec["shape"]), dtype=spec["dtype"],
                           name=spec["name"])


# ---------------------------------------------------------------------------
# Modules that register the model's custom objects
# ---------------------------------------------------------------------------


def _config_modules(config, found):
    """Collects the `module` of every serialized object in a Keras config
    (Keras writes `module: None` for a registered object from `__main__`)."""
    if isinstance(config, dict):
        if "class_name" in config:
            module = config.get("module")
            if isinstance(module, str):
                found.add(module)
            elif module is None and config.get("registered_name"):
                found.add("__main__")
        for value in config.values():
            _config_modules(value, found)
    elif isinstance(config, (list, tuple)):
        for value in config:
            _config_modules(value, found)
    return found


def _is_library_module(name):
    root = name.split(".")[0]
    return root in ("keras", "keras_moe", "builtins", "tensorflow", "jax", "torch",
                    "numpy")


def custom_object_modules(model):
    """The modules (other than Keras' and keras_moe's own) whose import
    registers the custom objects in `model`'s config, as `(name, file)` pairs.

    Raises a `ValueError` for objects defined in `__main__` (a script or a
    notebook): another process cannot import those by name, so pass
    `modules=[__file__]` (the script must guard its own run with
    `if __name__ == "__main__":`) or move them to a module.
    """
    config = keras.saving.serialize_keras_object(model)
    names = sorted(m for m in _config_modules(config, set())
                   if not _is_library_module(m))
    result = []
    for name in names:
        if name == "__main__":
            continue
        module = sys.modules.get(name)
        result.append((name, getattr(module, "__file__", None)))
    return result, "__main__" in names


def _import_module(entry, file=None):
    """Imports a module by name, or a `.py` file (then under a private name)."""
    if entry.endswith(".py") or os.sep in entry:
        file, entry = entry, None
    if entry is not None:
        try:
            return importlib.import_module(entry)
        except ModuleNotFoundError:
            if not file:
                raise
    if not file or not os.path.exists(file):
        raise ValueError(
            f"Cannot import the module {entry or file!r}: no such module or file"
        )
    name = entry or "_keras_moe_user_" + os.path.splitext(os.path.basename(file))[0]
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------
# SavedModel
# ---------------------------------------------------------------------------


def _child_env():
    env = dict(os.environ, KERAS_BACKEND=_CHILD_BACKEND)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # The child imports what the parent can import (e.g. a test module or a
    # package on a path added at run time), and uses the same temp dir.
    paths = [p for p in sys.path if p and os.path.isdir(p)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env["TMPDIR"] = tempfile.gettempdir()
    return env


def _tail(text, limit=_MAX_ERROR_CHARS):
    text = text.strip()
    return text if len(text) <= limit else "...\n" + text[-limit:]


def _export_in_subprocess(model, path, modules, input_signature, verbose, timeout):
    detected, from_main = custom_object_modules(model)
    given = list(modules or [])
    if from_main and not any(m.endswith(".py") for m in given):
        raise ValueError(
            "The model uses objects defined in `__main__` (a script or a "
            "notebook), which the TensorFlow subprocess cannot import by name. "
            "Pass modules=[__file__] (the script must guard its own run with "
            "`if __name__ == '__main__':`) or define them in a module."
        )
    entries = [{"name": name, "file": file} for name, file in detected]
    entries += [{"name": m, "file": None} for m in given]
    with tempfile.TemporaryDirectory(prefix="keras_moe_export_") as tmp:
        keras_path = os.path.join(tmp, "model.keras")
        model.save(keras_path)
        command = [
            sys.executable, "-c",
            "import sys; from keras_moe.export import main; sys.exit(main())",
            keras_path, str(path), "--modules-json", json.dumps(entries),
        ]
        if input_signature is not None:
            command += ["--input-signature-json",
                        json.dumps(_spec_to_json(input_signature))]
        if verbose:
            command.append("--verbose")
        try:
            result = subprocess.run(command, capture_output=True, text=True,
                                    env=_child_env(), timeout=timeout)
        except subprocess.TimeoutExpired as error:
            raise RuntimeError(
                f"SavedModel export in the {_CHILD_BACKEND} subprocess did not "
                f"finish within timeout={timeout} s. Its output:\n"
                + _tail((error.stdout or b"").decode(errors="replace")
                        if isinstance(error.stdout, bytes) else (error.stdout or ""))
            ) from None
    if result.returncode != 0:
        raise RuntimeError(
            f"SavedModel export in a KERAS_BACKEND={_CHILD_BACKEND} subprocess "
            f"failed (exit code {result.returncode}). Its error output:\n"
            + _tail(result.stderr or result.stdout)
        )
    if verbose and result.stdout.strip():
        print(result.stdout.strip())


def export_saved_model(model, path, *, modules=None, input_signature=None,
                       verbose=False, in_subprocess=None, timeout=None):
    """Exports `model` as a TensorFlow SavedModel, from any backend.

    The SavedModel has a `serve` endpoint and a `serving_default` signature
    that maps the model's named inputs (`keras.Input(name=...)`) to its named
    outputs (the keys of a dict output; `output_0` for a single tensor),
    with a dynamic batch dimension. Load it with `tf.saved_model.load(path)`
    and call `.serve(x)`, or serve it with TF Serving.

    On TensorFlow and JAX this is `model.export(path, format="tf_saved_model")`.
    On PyTorch (which Keras 3.15 cannot export to a SavedModel), the model is
    saved to a temporary `.keras` file that a `KERAS_BACKEND=tensorflow`
    subprocess loads and exports; the temporary file is removed afterwards.

    Args:
        model: a built Keras model.
        path: the SavedModel directory to write.
        modules: modules to import in the subprocess before loading the
            model, so that their custom layers register: module names or
            `.py` file paths. The modules of the model's own custom objects
            are found from its config and imported automatically; objects
            defined in `__main__` need `modules=[__file__]`.
        input_signature: optional input specs (`keras.InputSpec`,
            `keras.KerasTensor` or `tf.TensorSpec`, in the model's input
            structure), passed to `model.export`; default: the model's inputs
            with a dynamic batch.
        verbose: print Keras' export summary (the subprocess's output).
        in_subprocess: `None` (default) exports in a TensorFlow subprocess
            only where `model.export` cannot (torch); `True` always does;
            `False` never does.
        timeout: seconds after which the subprocess is stopped (default: no
            limit).

    Returns:
        `path`.

    Raises:
        ImportError: TensorFlow is not installed.
        RuntimeError: the export subprocess failed; the message carries its
            error output.
        ValueError: bad arguments, or custom objects from `__main__` without
            `modules=[__file__]`.

    Example:

    >>> import keras, numpy as np, tempfile, os
    >>> from keras_moe import export_saved_model
    >>> from keras_moe.layers import SparseMoE
    >>> inputs = keras.Input((4, 8), name="tokens")
    >>> outputs = SparseMoE(4, 16, k=2, eval_capacity_factor=None)(inputs)
    >>> model = keras.Model(inputs, {"y": outputs})
    >>> path = export_saved_model(model, os.path.join(tempfile.mkdtemp(), "sm"))
    >>> import tensorflow as tf
    >>> artifact = tf.saved_model.load(path)  # keep it: it owns the variables
    >>> served = artifact.serve(np.ones((3, 4, 8), "float32"))
    >>> tuple(served["y"].shape)
    (3, 4, 8)
    """
    if not isinstance(model, keras.Model):
        raise ValueError(
            f"model must be a keras.Model. Received: model of type {type(model).__name__}"
        )
    if not model.built:
        raise ValueError(
            f"model must be built before export. Received: unbuilt model {model.name!r}"
        )
    if in_subprocess is not None and not isinstance(in_subprocess, bool):
        raise ValueError(
            f"in_subprocess must be None, True or False. Received: in_subprocess={in_subprocess!r}"
        )
    verbose = validation.boolean("verbose", verbose)
    if modules is not None:
        if isinstance(modules, str) or not all(isinstance(m, str) for m in modules):
            raise ValueError(
                f"modules must be a list of module names or .py paths. Received: modules={modules!r}"
            )
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout must be > 0 or None. Received: timeout={timeout!r}")
    _require_tensorflow("export_saved_model")
    path = os.fspath(path)
    backend = keras.backend.backend()
    if in_subprocess is None:
        in_subprocess = backend not in DIRECT_BACKENDS
    if not in_subprocess and backend not in DIRECT_BACKENDS:
        raise ValueError(
            "Keras cannot export a SavedModel directly from the "
            f"{backend} backend; use in_subprocess=None or True. Received: "
            f"in_subprocess=False, backend={backend}"
        )
    existed = os.path.exists(path)
    try:
        if in_subprocess:
            _export_in_subprocess(model, path, modules, input_signature, verbose,
                                  timeout)
        else:
            # Portable ops only: no backend kernel (keras_moe.ops.grouped).
            with grouped.use_kernels(False):
                model.export(path, format="tf_saved_model", verbose=verbose,
                             input_signature=input_signature)
    except BaseException:
        if not existed and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)  # no half-written artifact
        raise
    return path


# ---------------------------------------------------------------------------
# ONNX
# ---------------------------------------------------------------------------

_ONNX_CONVERTERS = {
    "tensorflow": ("onnx", "tf2onnx"),
    "jax": ("onnx", "jax2onnx"),
    "torch": ("onnx", "onnxscript"),
}


def _onnx_input_signature(model):
    """The model's input specs (dynamic batch), so that `model.export` does
    not require a prior eager call (JAX's `predict` does not count as one)."""
    from keras_moe.utils.keras_internals import input_signature

    return input_signature(model)


def export_onnx(model, path, *, input_signature=None, opset_version=None,
                verbose=False, check=True):
    """Exports `model` to an ONNX file with `model.export(format="onnx")`,
    and checks that ONNX Runtime can load it.

    Works on every backend for models made of dense layers, `SoftMoE`,
    `MultiGateMoE` with dense gates (`k=None`), a one-input `CGC` and the
    heads; top-k routing (`SparseMoE`'s `TopKRouter`, `MultiGateMoE(k=...)`,
    top-k `MixtureOfExperts`) converts on no backend with the current
    converters. Some converters write files that ONNX Runtime rejects: with
    `check=True` such a file is removed and an error raised.
    docs/export.md lists what works where, with the converters' messages.

    The batch dimension is dynamic on every backend (on torch, Keras then
    uses the TorchScript exporter). On JAX the model is traced in a
    `keras.StatelessScope`, so that the routing-statistics updates of our
    layers do not leave tracers in its variables.

    Args:
        model: a built Keras model.
        path: the `.onnx` file to write.
        input_signature: optional input specs, as for `model.export`.
        opset_version: optional ONNX opset.
        verbose: print the converter's messages.
        check: load the file with `onnxruntime` (if installed) and raise if
            that fails.

    Returns:
        `path`.

    Raises:
        ImportError: the converter of the current backend is not installed.
        RuntimeError: the converter failed, or ONNX Runtime cannot load its
            output.

    Example:

    >>> import keras, os, tempfile
    >>> from keras_moe import export_onnx
    >>> from keras_moe.layers import MultiGateMoE, RegressionHead
    >>> inputs = keras.Input((8,), name="features")
    >>> a, b = MultiGateMoE(num_tasks=2, num_experts=4, hidden_dim=16)(inputs)
    >>> model = keras.Model(inputs, {"a": RegressionHead(1, name="a")(a),
    ...                              "b": RegressionHead(1, name="b")(b)})
    >>> path = export_onnx(model, os.path.join(tempfile.mkdtemp(), "m.onnx"))
    """
    verbose = validation.boolean("verbose", verbose)
    check = validation.boolean("check", check)
    backend = keras.backend.backend()
    if backend not in _ONNX_CONVERTERS:
        raise ValueError(f"ONNX export supports tensorflow, jax and torch. Received: backend={backend}")
    missing = [p for p in _ONNX_CONVERTERS[backend] if importlib.util.find_spec(p) is None]
    if missing:
        raise ImportError(
            f"ONNX export on the {backend} backend needs {', '.join(missing)}, "
            f"which is not installed. Install it with: {_INSTALL_ONNX}"
        )
    if not model.built:
        raise ValueError(
            f"model must be built before export. Received: unbuilt model {model.name!r}"
        )
    path = os.fspath(path)
    if input_signature is None:
        input_signature = _onnx_input_signature(model)
    existed = os.path.exists(path)
    # jax2onnx traces `model(...)` itself: the routing-statistics `assign`s of
    # our layers would store tracers in the model's variables (and break its
    # next call). A stateless scope keeps them out of the model.
    scope = keras.StatelessScope() if backend == "jax" else contextlib.nullcontext()
    try:
        with scope, grouped.use_kernels(False):
            model.export(path, format="onnx", verbose=verbose,
                         input_signature=input_signature,
                         opset_version=opset_version)
    except Exception as error:
        if not existed and os.path.exists(path):
            os.remove(path)
        raise RuntimeError(
            f"ONNX export on the {backend} backend failed: "
            f"{type(error).__name__}: {_tail(str(error), 2000)}\n"
            "See docs/export.md (ONNX) for the layers that convert on each backend."
        ) from error
    if check and importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime

        try:
            onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        except Exception as error:
            os.remove(path)
            raise RuntimeError(
                f"The ONNX converter of the {backend} backend wrote a file that "
                f"ONNX Runtime cannot load (removed): {_tail(str(error), 2000)}\n"
                "See docs/export.md (ONNX) for the layers that convert on each backend."
            ) from None
    return path


# ---------------------------------------------------------------------------
# Command line: the TensorFlow side of the torch route
# ---------------------------------------------------------------------------


def main(argv=None):
    """`KERAS_BACKEND=tensorflow python -m keras_moe.export MODEL.keras OUT_DIR
    [--module M ...]`: loads a `.keras` file and exports a SavedModel."""
    parser = argparse.ArgumentParser(
        prog="python -m keras_moe.export",
        description="Load a .keras file and export it as a TensorFlow SavedModel "
                    "(run with KERAS_BACKEND=tensorflow or jax).",
    )
    parser.add_argument("keras_file")
    parser.add_argument("export_dir")
    parser.add_argument("--module", action="append", default=[],
                        help="module name or .py file to import first (its "
                             "custom layers register); repeatable")
    parser.add_argument("--modules-json", default="[]", help=argparse.SUPPRESS)
    parser.add_argument("--input-signature-json", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)

    backend = keras.backend.backend()
    if backend not in DIRECT_BACKENDS:
        parser.error(f"run with KERAS_BACKEND=tensorflow or jax (now: {backend})")
    entries = json.loads(args.modules_json) + [{"name": m, "file": None} for m in args.module]
    for entry in entries:
        _import_module(entry["name"], entry.get("file"))
    model = keras.saving.load_model(args.keras_file, compile=False)
    signature = None
    if args.input_signature_json:
        signature = _spec_from_json(json.loads(args.input_signature_json))
    export_saved_model(model, args.export_dir, input_signature=signature,
                       verbose=args.verbose, in_subprocess=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
