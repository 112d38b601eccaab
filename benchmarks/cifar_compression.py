#!/usr/bin/env python
"""Compressing the CIFAR multi-task MoE: int8 experts, pruned experts and a
distilled dense student, against the trained float model.

    python benchmarks/cifar_multitask.py --data ../shared/data/cifar10_small.npz --epochs 20 \\
        --width 1.0 --batch-size 128 --box-weight 2
    python benchmarks/cifar_compression.py --model runs/cifar_multitask/model.keras \\
        --data ../shared/data/cifar10_small.npz --epochs 20

The first command trains the teacher (`runs/cifar_multitask/model.keras`);
this script reads it and the same data (the runner's own functions,
imported from `benchmarks/cifar_multitask.py`, the model of
`examples/cifar_multitask.py`: the same canvases, the same fixed test set)
and prints three Markdown tables:

1. int8: the float model; its expert banks quantised to int8 with int8
   activations (Keras' default `model.quantize("int8")` config) and
   weight-only; and the whole model quantised (Keras also quantises the
   `Dense` layers). Test accuracy, mean box IoU, the bytes of the expert
   banks' variables and of all variables.
2. Pruning: the token MoE pruned from its 8 experts to `--keep` (6 and 4),
   and the task MMoE to `--task-keep` (default: all but 2), by their usage
   on the training canvases (`keras_moe.compression.expert_usage`),
   without fine-tuning.
3. Distillation: the dense baseline of the example (`build_model(
   baseline=True)` with the teacher's width and expert sizes: the same
   active compute per image) trained on the labels
   only, and the same student trained by `keras_moe.compression.Distiller`
   against the float MoE teacher, with the example's optimizer and
   schedule, for `--epochs` epochs each, from the same initial weights.

Every table has the inference latency of `predict_on_batch` on
`--latency-batch` test canvases: all models are timed side by side (one
call of each model per round, in rotating order, `--repeats` rounds), the
median per model, and its ratio to the float teacher's median; every
model is loaded uncompiled and timed with the backend's default
`jit_compile` for `predict`. Run it on an idle machine: the latencies are
only comparable within one run.
"""

import argparse
import importlib.util
import inspect
import os
import sys
import time
import warnings

# This file's name shadows the `compression` package (Python 3.14's standard
# library, which jax probes for on import): keep its folder off the path.
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_moe.compression import (  # noqa: E402
    Distiller,
    expert_usage,
    prune_experts,
    weight_bytes,
)
from keras_moe.layers import Experts, default_compile_args  # noqa: E402

EXAMPLE = os.path.join(HERE, "cifar_multitask.py")
WEIGHT_ONLY = keras.quantizers.Int8QuantizationConfig(activation_quantizer=None)


def load_example():
    """`benchmarks/cifar_multitask.py` as a module (its data and model code)."""
    spec = importlib.util.spec_from_file_location("cifar_multitask", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def evaluate(example, model, images, labels, boxes):
    predictions = model.predict(images, batch_size=256, verbose=0)
    accuracy = float(np.mean(np.argmax(predictions["class"], -1) == labels))
    iou = float(example.box_iou(predictions["box"], boxes).mean())
    return accuracy, iou


def latencies(models, batch, repeats):
    """Median milliseconds of `predict_on_batch(batch)` per model, all
    models measured side by side in rotating order."""
    names = list(models)
    for name in names:  # compile and warm up
        for _ in range(2):
            models[name].predict_on_batch(batch)
    times = {name: [] for name in names}
    for round_ in range(repeats):
        order = names[round_ % len(names):] + names[: round_ % len(names)]
        for name in order:
            start = time.perf_counter()
            models[name].predict_on_batch(batch)
            times[name].append(time.perf_counter() - start)
    return {name: 1000 * float(np.median(t)) for name, t in times.items()}


def quantized(path, **kwargs):
    model = keras.saving.load_model(path, compile=False)
    with warnings.catch_warnings():  # routers, norms, convs stay float
        warnings.simplefilter("ignore")
        model.quantize("int8", **kwargs)
    return model


def optimizer(example_args, steps):
    """The example's optimizer: AdamW, linear warm-up then cosine decay."""
    warmup = min(200, steps // 5)
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, max(1, steps - warmup), warmup_target=example_args.learning_rate,
        warmup_steps=warmup,
    )
    return keras.optimizers.AdamW(schedule, weight_decay=5e-4)


def twin_arguments(example, teacher):
    """`build_model` arguments of the teacher's dense twin: the teacher's
    backbone width (first conv: 32 x width) and active expert sizes."""
    first = next(l for l in teacher.layers if isinstance(l, keras.layers.Conv2D))
    token, task = teacher.get_layer("token_moe"), teacher.get_layer("task_moe")
    arguments = dict(width=first.filters / 32, k=token.k, hidden=token.hidden_dim,
                     task_experts=task.num_experts, task_k=task.k,
                     task_hidden=task.hidden_dim, baseline=True)
    if token.num_shared_experts:
        arguments["shared_experts"] = token.num_shared_experts
    parameters = inspect.signature(example.build_model).parameters
    return {n: v for n, v in arguments.items() if n in parameters}


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def mb(n):
    return f"{n / 2**20:.3f} MB"


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--model", default="runs/cifar_multitask/model.keras",
                        help="the trained teacher, from benchmarks/cifar_multitask.py")
    parser.add_argument("--data", default="sample",
                        help="the example's --data (an .npz, 'sample' or 'keras')")
    parser.add_argument("--epochs", type=int, default=20,
                        help="training epochs of each dense student")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--box-weight", type=float, default=2.0)
    parser.add_argument("--alpha", type=float, default=0.5,
                        help="weight of the distillation terms")
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--keep", default="6,4",
                        help="experts kept in the token MoE (of 8), comma-separated")
    parser.add_argument("--task-keep", default=None,
                        help="experts kept in the task MMoE, comma-separated "
                             "(default: all but 2)")
    parser.add_argument("--usage-images", type=int, default=2048,
                        help="training images whose canvases measure expert usage")
    parser.add_argument("--train-size", type=int, default=None)
    parser.add_argument("--test-size", type=int, default=None)
    parser.add_argument("--latency-batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not os.path.exists(args.model):
        parser.error(
            f"{args.model} does not exist: train it first with python "
            "benchmarks/cifar_multitask.py --data ... --epochs 20"
        )

    example = load_example()
    keras.utils.set_random_seed(args.seed)
    (x_train, y_train), (x_test, y_test), _ = example.load_cifar(args.data)
    x_train, y_train = x_train[: args.train_size], y_train[: args.train_size]
    x_test, y_test = x_test[: args.test_size], y_test[: args.test_size]
    # The example's fixed test canvases.
    test_images, test_boxes = example.make_canvases(
        x_test, np.random.default_rng(12345), flip=False
    )
    latency_batch = test_images[: args.latency_batch]
    print(f"Keras {keras.__version__}, backend {keras.backend.backend()}; "
          f"{len(x_train)} training and {len(x_test)} test images; "
          f"teacher {args.model}")

    # Uncompiled: the teacher's compile config (e.g. jit_compile resolved on
    # the backend it was trained with) must not differ from the others'.
    teacher = keras.saving.load_model(args.model, compile=False)
    jit_compile = teacher.jit_compile  # this backend's default for predict
    experts_only = lambda layer: isinstance(layer, Experts)  # noqa: E731
    models = {"float": teacher}
    models["int8 experts (int8 activations)"] = quantized(args.model, filters=experts_only)
    models["int8 experts (weight-only)"] = quantized(
        args.model, filters=experts_only, config=WEIGHT_ONLY
    )
    models["int8 whole model (Keras default)"] = quantized(args.model)
    int8_names = list(models)

    # Pruning, by the usage on training canvases.
    usage_data = example.CanvasDataset(
        x_train[: args.usage_images], y_train[: args.usage_images],
        args.batch_size, args.seed + 1,
    )
    usage = expert_usage(teacher, usage_data)
    moe_layers = [n for n in ("token_moe", "task_moe") if n in usage]
    for name in moe_layers:
        print(f"\n{name} expert usage on {min(len(x_train), args.usage_images)} "
              "training canvases (%): "
              + " ".join(f"{100 * u:.1f}" for u in usage[name]))
    token_experts = teacher.get_layer("token_moe").num_experts
    task_experts = teacher.get_layer("task_moe").num_experts
    token_keeps = [int(k) for k in args.keep.split(",") if k]
    task_keep = args.task_keep or str(max(1, task_experts - 2))
    task_keeps = [int(k) for k in task_keep.split(",") if k]
    plans = [{"token_moe": k} for k in token_keeps]
    plans += [{"task_moe": k} for k in task_keeps]
    if token_keeps and task_keeps:
        plans.append({"token_moe": min(token_keeps), "task_moe": min(task_keeps)})
    pruned_names = []
    for plan in plans:
        sizes = (plan.get("token_moe", token_experts), plan.get("task_moe", task_experts))
        name = f"pruned {sizes[0]}/{token_experts} token, {sizes[1]}/{task_experts} task experts"
        models[name] = prune_experts(teacher, plan, usage=usage)
        pruned_names.append((name, sizes))

    # Distillation into the dense baseline.
    twin = twin_arguments(example, teacher)
    steps = args.epochs * max(1, len(x_train) // args.batch_size)
    loss_weights = {"class": 1.0, "box": args.box_weight}
    students = {}
    for mode in ("labels only", "distilled"):
        keras.utils.set_random_seed(args.seed)  # the same initial student
        student = example.build_model(**twin)
        compile_args = dict(loss_weights=loss_weights, **default_compile_args(student))
        if mode == "distilled":
            trainer = Distiller(student, teacher, alpha=args.alpha,
                                temperature=args.temperature)
        else:
            trainer = student
        trainer.compile(optimizer=optimizer(args, steps), **compile_args)
        # The same canvases, in the same order, for both students.
        train = example.CanvasDataset(
            x_train, y_train, args.batch_size, args.seed, workers=2
        )
        start = time.time()
        trainer.fit(train, epochs=args.epochs, verbose=0)
        seconds = time.time() - start
        students[mode] = (student, seconds)
        print(f"dense student ({mode}): {student.count_params():,} parameters, "
              f"trained {args.epochs} epochs in {seconds:.0f} s")
        models[f"dense student ({mode})"] = student

    scores = {name: evaluate(example, m, test_images, y_test, test_boxes)
              for name, m in models.items()}
    for model in models.values():  # one setting for every timed model
        model.jit_compile = jit_compile
        model.predict_function = None
    timing = latencies(models, latency_batch, args.repeats)
    base_ms = timing["float"]

    def ms(name):
        return f"{timing[name]:.1f}"

    def ratio(name):
        return f"{timing[name] / base_ms:.2f}"

    float_bank = weight_bytes(teacher, experts_only=True)
    rows = []
    for name in int8_names:
        model = models[name]
        acc, iou = scores[name]
        bank = weight_bytes(model, experts_only=True)
        rows.append([name, f"{acc:.4f}", f"{iou:.4f}", mb(bank),
                     f"{float_bank / bank:.2f}x", mb(weight_bytes(model)),
                     ms(name), ratio(name)])
    print("\n### int8 quantisation\n")
    print(table(["model", "test accuracy", "mean IoU", "expert-bank bytes",
                 "bank shrink", "all weights", "latency (ms)", "latency / float"],
                rows))

    rows = [[f"{token_experts}/{token_experts}, {task_experts}/{task_experts} (float)",
             f"{scores['float'][0]:.4f}",
             f"{scores['float'][1]:.4f}", mb(float_bank), ms("float"), "1.00"]]
    for name, sizes in pruned_names:
        acc, iou = scores[name]
        rows.append([f"{sizes[0]}/{token_experts}, {sizes[1]}/{task_experts}",
                     f"{acc:.4f}", f"{iou:.4f}",
                     mb(weight_bytes(models[name], experts_only=True)),
                     ms(name), ratio(name)])
    print("\n### Expert pruning (no fine-tuning)\n")
    print(table(["token experts, task experts", "test accuracy", "mean IoU",
                 "expert-bank bytes", "latency (ms)", "latency / float"], rows))

    rows = [["MoE teacher (float)", f"{teacher.count_params():,}",
             f"{scores['float'][0]:.4f}", f"{scores['float'][1]:.4f}", "",
             ms("float"), "1.00"]]
    for mode, (student, seconds) in students.items():
        name = f"dense student ({mode})"
        acc, iou = scores[name]
        rows.append([name, f"{student.count_params():,}", f"{acc:.4f}",
                     f"{iou:.4f}", f"{seconds:.0f}", ms(name), ratio(name)])
    print(f"\n### Distillation (alpha={args.alpha}, T={args.temperature}, "
          f"{args.epochs} epochs)\n")
    print(table(["model", "parameters", "test accuracy", "mean IoU",
                 "train s", "latency (ms)", "latency / teacher"], rows))
    print(f"\nLatency: predict_on_batch on {len(latency_batch)} canvases, median "
          f"of {args.repeats} side-by-side rounds, backend {keras.backend.backend()}, "
          f"jit_compile={jit_compile}.")


if __name__ == "__main__":
    main()
