"""Loading edited `.keras` files: how long, how much memory, which error.

A `.keras` file is a zip of `config.json` (the constructor arguments of
every layer) and the weights. Someone who edits the config (by mistake, or
to attack whoever loads the file) can put any value in any argument. Issue
32 found edits that loaded for 30-90 s and 1.3-2.4 GB before failing
(`HashRouter(vocab_size=10**8)`, `PLE(num_levels=10**5)`,
`MultiGateMoE(num_tasks=10**6)`), and one that aborted the process on JAX
(`SoftMoE(slots_per_expert=10**12)`). The promise (docs/guarantees.md):
loading an edited file either succeeds or fails within 5 s and 500 MB,
with an error that names the argument.

This runner builds a small model of every keras_moe layer family (and a
tiny `MultiTaskModel` per task weighting, whose `task_weighting` and
weighting arguments, floats and strings included, are edited too), saves
it, writes one edited copy per (argument, hostile value) and loads each in
a fresh process under each backend, reporting the wall time of the load,
the peak memory of the process above that of loading the unedited file,
and the error:

```
python benchmarks/hostile_files.py                      # every edit, 3 backends
python benchmarks/hostile_files.py --backends torch --only vocab_size,num_levels
```

`tests/test_hostile_files.py` runs the same edits in one process per
backend (`sweep`) and checks the errors and the memory.
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile

# Values written over an integer argument: too large for any model (and
# `10**12` beyond what a tensor can index), negative, of the wrong type.
HOSTILE_INTS = (10**6, 10**9, 10**12, -1, 2.5, "abc", None)
# Values written over a boolean argument: each used to switch the feature
# on ("False", "no" and 2 are truthy) or off (None, 0).
HOSTILE_BOOLS = ("False", "no", 2, None)
# Values written over a float or string argument of a task weighting
# (issue 35): not finite, negative, absurdly large, of the wrong type.
HOSTILE_FLOATS = (float("nan"), float("inf"), -1.0, 1e300, "abc", None)
HOSTILE_STRINGS = ("no_such_value", "", 3, None)
# Values written over `MultiTaskModel(task_weighting=...)`: an unknown name,
# a wrong type, a config of an unknown class and one of a layer that is not
# a weighting.
HOSTILE_WEIGHTINGS = (
    "no_such_method", 3, ["fixed"],
    {"class_name": "NoSuchWeighting", "config": {}, "module": "keras_moe.weighting"},
    {"class_name": "Dense", "config": {"units": 2}, "module": "keras.layers"},
)
# Float and string arguments are swept only in these modules (the task
# weightings); the layers' are not (yet).
SWEEP_ALL_TYPES = ("keras_moe.weighting",)
# Arguments whose integer value is not a size (ignored by the sweep).
NOT_SIZES = {"verbose"}


def build_models():
    """Small models, one per layer family, with every router; name -> model."""
    import keras

    from keras_moe.layers import (
        CGC,
        PLE,
        BalancedAssignmentRouter,
        ClassificationHead,
        DSelectKRouter,
        ExpertChoiceRouter,
        HashRouter,
        MixtureOfExperts,
        MultiGateMoE,
        RegressionHead,
        SoftMoE,
        SparseMoE,
        TaskRouter,
        TopKRouter,
    )

    models = {}
    x = keras.Input((4, 8), name="x")
    ids = keras.Input((4,), dtype="int32", name="ids")
    y = SparseMoE(4, 16, num_shared_experts=1, num_groups=2, block_size=16,
                  noisy_gating=True, seed=1, name="moe")(x)
    y = SparseMoE(4, 16, router=HashRouter(4, k=2, vocab_size=64, seed=0),
                  name="hash_moe")(y, routing_inputs=ids)
    y = SparseMoE(4, 16, router=TaskRouter(4, num_tasks=3, k=2),
                  name="task_moe")(y, routing_inputs=ids % 3)
    models["sparse_moe"] = keras.Model([x, ids], y)

    x = keras.Input((4, 8), name="x")
    y = SparseMoE(4, 16, router=ExpertChoiceRouter(4, k=2), name="ec_moe")(x)
    y = SparseMoE(4, 16, router=BalancedAssignmentRouter(4), name="base_moe")(y)
    y = SparseMoE(4, 16, router=DSelectKRouter(4, k=2, seed=3), name="dsk_moe")(y)
    y = SparseMoE(4, 16, router=TopKRouter(4, k=2, batch_prioritized=True),
                  name="bpr_moe")(y)
    y = SoftMoE(4, 16, slots_per_expert=2, normalize=True, name="soft")(y)
    models["routers_soft_moe"] = keras.Model(x, y)

    x = keras.Input((8,), name="x")
    a, b = MultiGateMoE(2, 4, 16, name="mmoe")(x)
    c, d = PLE(2, num_levels=2, num_task_experts=1, num_shared_experts=1,
               hidden_dim=16, name="ple")(x)
    e, f = CGC(2, 1, 1, 16, name="cgc")(x)
    mixed = MixtureOfExperts([keras.layers.Dense(8), keras.layers.Dense(8)],
                             integration="attention", name="mixture")(x)
    heads = {
        "a": RegressionHead(1, name="a")(keras.layers.Concatenate()([a, c, e])),
        "b": ClassificationHead(3, hidden_units=[8], name="b")(
            keras.layers.Concatenate()([b, d, f, mixed])),
    }
    models["multitask"] = keras.Model(x, heads)
    models.update(weighting_models())
    return models


def weighting_models():
    """One tiny `MultiTaskModel` per task weighting (issue 35), with a
    seed where the weighting takes one; name -> model. The sweep edits the
    model-level arguments of the first only (`weighting_fixed`) and the
    weighting's arguments of every one."""
    import inspect

    import keras

    from keras_moe import weighting as weighting_lib
    from keras_moe.models import MultiTaskModel

    models = {}
    classes = sorted(set(weighting_lib.REGISTRY.values()), key=lambda c: c.registered_name)
    for cls in classes:
        arguments = inspect.signature(cls.__init__).parameters
        weighting = cls(seed=1) if "seed" in arguments else cls()
        x = keras.Input((4,), name="x")
        h = keras.layers.Dense(4, name="trunk")(x)
        outputs = {t: keras.layers.Dense(1, name=t)(h) for t in ("a", "b")}
        models[f"weighting_{cls.registered_name}"] = MultiTaskModel(
            x, outputs, task_weighting=weighting
        )
    return models


def save_models(directory):
    """Saves `build_models()` as `<name>.keras` in `directory`; name -> path."""
    paths = {}
    for name, model in build_models().items():
        paths[name] = os.path.join(directory, f"{name}.keras")
        model.save(paths[name])
    return paths


def _is_ours(layer_config):
    return isinstance(layer_config, dict) and layer_config.get("module", "").startswith(
        "keras_moe"
    )


def _walk(node, path=()):
    """Yields `(path, key, value, module)` for each argument of each
    keras_moe object's config in the nested config `node`."""
    if isinstance(node, dict):
        if _is_ours(node) and isinstance(node.get("config"), dict):
            for key, value in node["config"].items():
                yield path + ("config",), key, value, node["module"]
        for key, value in node.items():
            yield from _walk(value, path + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, path + (i,))


def edits(config, values=None, weighting_only=False):
    """The edits of a model config: `(path, key, value)` for every integer
    and boolean argument of our layers, every float and string argument of
    a task weighting, `MultiTaskModel`'s `task_weighting`, and each hostile
    value (or each of `values`, if given). `weighting_only`: only the
    arguments inside `task_weighting`."""
    seen = set()
    for path, key, value, module in _walk(config):
        if key in NOT_SIZES or (path, key) in seen:
            continue
        if weighting_only and "task_weighting" not in path:
            continue
        seen.add((path, key))
        all_types = module.startswith(SWEEP_ALL_TYPES)
        if key == "task_weighting" and module == "keras_moe.models":
            hostile_values = HOSTILE_WEIGHTINGS
        elif isinstance(value, bool):
            hostile_values = HOSTILE_BOOLS
        elif isinstance(value, int):
            hostile_values = HOSTILE_INTS
        elif isinstance(value, float) and all_types:
            hostile_values = HOSTILE_FLOATS
        elif isinstance(value, str) and all_types and key != "name":
            hostile_values = HOSTILE_STRINGS
        else:
            continue
        for hostile in values or hostile_values:
            yield path, key, hostile


def read_config(path):
    with zipfile.ZipFile(path) as archive:
        return json.loads(archive.read("config.json"))


def write_edited(source, target, path, key, value):
    """Copies the `.keras` file `source` to `target` with the argument
    `key` of the config at `path` set to `value`."""
    config = read_config(source)
    node = config
    for step in path:
        node = node[step]
    node[key] = value
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as dst:
        for item in src.infolist():
            data = json.dumps(config) if item.filename == "config.json" else src.read(item)
            dst.writestr(item, data)


def load(path):
    """Loads `path`; returns `(seconds, None or (error type, message))`."""
    import keras

    start = time.perf_counter()
    try:
        keras.saving.load_model(path)
        error = None
    except Exception as e:  # noqa: BLE001 - reported, not handled
        error = (type(e).__name__, str(e))
    return time.perf_counter() - start, error


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sweep(directory, only=None):
    """Saves the models in `directory`, then loads every edited copy in
    this process. Returns one dict per edit: model, argument, value,
    seconds, error, plus `clean_seconds` (the unedited file) and the peak
    memory (MB) before and after the whole sweep."""
    paths = save_models(directory)
    rows, clean = [], {}
    for name, source in paths.items():
        clean[name] = min(load(source)[0] for _ in range(3))
    before = peak_rss_mb()
    for name, source in paths.items():
        weighting_only = name.startswith("weighting_") and name != "weighting_fixed"
        config = read_config(source)
        for n, (path, key, value) in enumerate(edits(config, weighting_only=weighting_only)):
            if only and key not in only:
                continue
            target = os.path.join(directory, f"{name}_{n}.keras")
            write_edited(source, target, path, key, value)
            seconds, error = load(target)
            os.remove(target)
            rows.append(dict(model=name, layer=_layer_name(read_config(source), path),
                             argument=key, value=repr(value), seconds=seconds,
                             clean_seconds=clean[name], error=error))
    return rows, before, peak_rss_mb()


def _layer_name(config, path):
    node = config
    for step in path[:-1]:
        node = node[step]
    return node.get("config", {}).get("name", "?") if isinstance(node, dict) else "?"


def _load_worker(path):
    """`--load PATH`: one load in this fresh process, as a RESULT line."""
    import importlib.util

    import keras_moe.layers  # noqa: F401  (registers the classes; not timed)

    # Keras imports TensorFlow, when installed, on the first load under every
    # backend (its serialization checks `tf.available`): not the file's cost.
    if importlib.util.find_spec("tensorflow") is not None:
        import tensorflow  # noqa: F401
    base = peak_rss_mb()
    seconds, error = load(path)
    print("RESULT " + json.dumps(dict(seconds=seconds, peak_mb=peak_rss_mb() - base,
                                      error=error)), flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="tensorflow,jax,torch")
    parser.add_argument("--only", default=None,
                        help="comma-separated argument names to edit (default: all)")
    parser.add_argument("--values", default=None,
                        help="comma-separated Python literals to write instead of "
                             "the hostile values, e.g. 10**8 (with --only)")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds before a load is stopped and reported as such")
    parser.add_argument("--load", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.load:
        return _load_worker(args.load)
    only = set(args.only.split(",")) if args.only else None
    values = [eval(v, {}) for v in args.values.split(",")] if args.values else None  # noqa: S307
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    print("| backend | layer | argument | value | load s | peak MB | result |")
    print("|---|---|---|---|---|---|---|")
    for backend in args.backends.split(","):
        env["KERAS_BACKEND"] = backend
        directory = tempfile.mkdtemp()
        try:
            subprocess.run([sys.executable, "-c", (
                "import sys; sys.path.insert(0, %r); import hostile_files as h; "
                "h.save_models(%r)") % (os.path.dirname(os.path.abspath(__file__)),
                                        directory)], env=env, check=True)
            files = sorted(os.listdir(directory))
            cases = [("(clean)", name, None, None, None) for name in files]
            for name in files:
                source = os.path.join(directory, name)
                config = read_config(source)
                weighting_only = name.startswith("weighting_") and name != "weighting_fixed.keras"
                for path, key, value in edits(config, values, weighting_only):
                    if only is None or key in only:
                        cases.append((_layer_name(config, path), name, path, key, value))
            for n, (layer, name, path, key, value) in enumerate(cases):
                source = os.path.join(directory, name)
                target = source
                if path is not None:
                    target = os.path.join(directory, f"edit_{n}.keras")
                    write_edited(source, target, path, key, value)
                _report(backend, layer, key, value, target, env, args.timeout)
                if target != source:
                    os.remove(target)
        finally:
            shutil.rmtree(directory, ignore_errors=True)


def _report(backend, layer, key, value, target, env, timeout):
    try:
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--load", target],
                             env=env, capture_output=True, text=True, timeout=timeout)
        rows = [json.loads(line[7:]) for line in out.stdout.splitlines()
                if line.startswith("RESULT ")]
        if rows:
            row = rows[0]
            error = row["error"]
            result = "loads" if error is None else f"{error[0]}: {error[1][:120]}"
            seconds, peak = f"{row['seconds']:.2f}", f"{row['peak_mb']:.0f}"
        else:
            tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["?"]
            seconds, peak = "-", "-"
            result = f"process died (exit {out.returncode}): {tail[0][:120]}"
    except subprocess.TimeoutExpired:
        seconds, peak, result = f">{timeout:.0f}", "-", "stopped: timeout"
    result = result.replace("|", "/").replace("\n", " ")
    value = "-" if key is None else repr(value)
    print(f"| {backend} | {layer} | {key or '(none)'} | {value} | {seconds} | {peak} "
          f"| {result} |", flush=True)


if __name__ == "__main__":
    main()
