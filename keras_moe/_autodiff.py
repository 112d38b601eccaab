"""Per-backend training steps that take per-task gradients.

Keras has no backend-agnostic gradient op, so the steps that need the
gradient of each task separately are written here, once per backend, as a
copy of Keras 3's `train_step` for that backend extended by the task
gradients. The model must be a `keras_moe.models.MultiTaskModel`: its
`compute_loss` leaves the step's task losses (and a gradient method's task
objectives, and the `add_loss` total) in `model._recorder`. Three plans:

- `"norms"` (GradNorm): the norms `||grad_W L_t||` on the shared layer's
  weights `W`, then the weighting's `update`; the model trains on the
  weighted total as usual.
- `"parameters"` (a gradient method): the gradients of the `T` task
  objectives on every trainable variable (`T` backward passes; one more
  for the `add_loss` losses when there are any); the shared variables'
  part, flattened into a `(T, P)` matrix, goes through the weighting's
  `combine`, the other variables get the sum of their task gradients.
- `"representation"` (a gradient method with `representation=`): the
  model runs as `trunk` (inputs -> `z`) and `heads` (`z`, inputs ->
  outputs); the gradients of the task objectives with respect to `z` go
  through `combine`, and one backward pass sends the combined `dz` through
  the trunk (together with the heads' own gradients and the `add_loss`
  gradients).

Backend by backend:

- TensorFlow: a persistent `GradientTape` (graph or XLA, as `fit`
  compiles).
- JAX: one `jax.vjp` of a stateless forward pass (a `StatelessScope`
  over the model's variables); the task gradients are its pullbacks,
  `vmap`ped (in representation mode, the gradient with respect to `z` is
  that of a zero offset added to `z` before the heads).
- PyTorch: `torch.autograd.grad` per task, the graph retained.

Mixed precision: the task objectives are multiplied by the optimizer's
loss scale before differentiation (as Keras scales the loss), the
gradients are divided by it before `combine` and the combined gradient is
multiplied back, so `LossScaleOptimizer.apply` unscales and checks every
gradient as usual. When a step's task gradients are not finite (the loss
scale overflowed), the weighting's state updates of that step are undone.
"""

import keras
from keras import ops

from keras_moe.utils.keras_internals import loss_tracker, update_metrics_variables


def task_gradient_train_step(model, *args):
    backend = keras.backend.backend()
    if backend == "tensorflow":
        return _tensorflow_train_step(model, *args)
    if backend == "jax":
        return _jax_train_step(model, *args)
    if backend == "torch":
        return _torch_train_step(model, *args)
    raise NotImplementedError(
        f"The per-task gradients are not implemented for the {backend!r} "
        "backend (TensorFlow, JAX and PyTorch are)."
    )


# Backend-agnostic pieces ------------------------------------------------------


def _plan(model):
    if model.task_weighting.needs_gradient_norms:
        return "norms"
    return "representation" if model._split is not None else "parameters"


def _global_norm(gradients):
    squares = [
        ops.sum(ops.square(ops.cast(g, "float32"))) for g in gradients if g is not None
    ]
    if not squares:
        return ops.zeros((), "float32")
    return ops.sqrt(ops.sum(ops.stack(squares)))


def _batch_size(x):
    return ops.shape(next(i for i in keras.tree.flatten(x) if i is not None))[0]


def _forward(model, x):
    if "training" in model.call_signature_parameters:
        return model(x, training=True)
    return model(x)


def _split_forward(model, x, offset=None):
    """`(z, y_pred)` through the trunk and the heads (`z + offset` enters
    the heads when an offset is given)."""
    inputs = [ops.convert_to_tensor(i) for i in keras.tree.flatten(x)]
    z = model._split.trunk(inputs, training=True)
    head_input = z if offset is None else z + ops.cast(offset, z.dtype)
    return z, model._split.heads([head_input] + inputs, training=True)


def _loss_scale(model):
    """The optimizer's current loss scale (1 without loss scaling)."""
    if model.optimizer is None:
        return ops.ones((), "float32")
    return ops.cast(model.optimizer.scale_loss(ops.ones((), "float32")), "float32")


def _flatten(tensors, variables):
    return ops.concatenate(
        [
            ops.reshape(
                ops.zeros(v.shape, "float32") if g is None else ops.cast(g, "float32"),
                (-1,),
            )
            for g, v in zip(tensors, variables)
        ]
    )


def _unflatten(vector, variables):
    pieces, start = [], 0
    for v in variables:
        size = 1
        for dim in v.shape:
            size *= dim
        pieces.append(ops.reshape(vector[start : start + size], v.shape))
        start += size
    return pieces


def _guarded(weighting, finite, update):
    """Runs `update()` and undoes the weighting's state changes when the
    step is not `finite`."""
    state = list(weighting.non_trainable_variables)
    saved = [ops.copy(v.value) for v in state]
    result = update()
    for variable, old in zip(state, saved):
        variable.assign(ops.where(finite, variable.value, old))
    return result


def _combine(model, rows, task_losses, scale):
    """The weighting's `combine` of the scaled task gradients `rows` (`T`
    vectors), in float32, unscaled before and scaled after."""
    grads = ops.stack([ops.cast(r, "float32") for r in rows]) / scale
    losses = ops.cast(task_losses, "float32")
    finite = ops.logical_and(
        ops.all(ops.isfinite(grads)), ops.all(ops.isfinite(losses))
    )
    safe = ops.where(finite, grads, ops.zeros_like(grads))
    weighting = model.task_weighting
    update = _guarded(weighting, finite, lambda: weighting.combine(safe, losses))
    # A skipped step keeps its non-finite gradients (the loss-scale
    # optimizer must see them to lower the scale).
    return ops.where(finite, update, ops.sum(grads, axis=0)) * scale


def _update_norms(model, task_losses, norms):
    finite = ops.all(ops.isfinite(norms))
    _guarded(
        model.task_weighting,
        finite,
        lambda: model.task_weighting.update(task_losses, norms),
    )


def _parameter_gradients(model, variables, task_grads, additional_grads, task_losses, scale):
    """The gradient of every variable: `combine` of the task gradients on
    the shared ones, the sum of the task gradients on the others, plus the
    `add_loss` gradients."""
    shared_index = [i for i, v in enumerate(variables) if id(v) in model._shared_ids]
    shared = [variables[i] for i in shared_index]
    rows = [_flatten([grads[i] for i in shared_index], shared) for grads in task_grads]
    combined = dict(zip(shared_index, _unflatten(_combine(model, rows, task_losses, scale), shared)))
    gradients = []
    for i, variable in enumerate(variables):
        if i in combined:
            gradient = ops.cast(combined[i], variable.dtype)
        else:
            parts = [grads[i] for grads in task_grads if grads[i] is not None]
            gradient = None
            for part in parts:
                gradient = part if gradient is None else gradient + part
        if additional_grads is not None and additional_grads[i] is not None:
            gradient = (
                additional_grads[i] if gradient is None else gradient + additional_grads[i]
            )
        gradients.append(gradient)
    return gradients


def _representation_correction(model, z, dz, task_losses, scale):
    """`combine(dz) - sum_t dz_t`: added to the cotangent of `z`, it turns
    the heads' `sum_t dz_t` into the combined one."""
    dz = [ops.zeros_like(z) if d is None else d for d in dz]
    rows = [ops.reshape(d, (-1,)) for d in dz]
    combined = ops.reshape(_combine(model, rows, task_losses, scale), ops.shape(z))
    total = dz[0]
    for d in dz[1:]:
        total = total + d
    return ops.cast(combined - ops.cast(total, "float32"), z.dtype)


# TensorFlow --------------------------------------------------------------------


def _tensorflow_train_step(model, data):
    import tensorflow as tf

    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    plan = _plan(model)
    with tf.GradientTape(persistent=True) as tape:
        if plan == "representation":
            z, y_pred = _split_forward(model, x)
        else:
            y_pred = _forward(model, x)
        loss = model.compute_loss(
            x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
        )
        recorder = model._recorder
        loss_tracker(model).update_state(
            _unscale_for_replicas(loss), sample_weight=_batch_size(x)
        )
        scale = _loss_scale(model)
        scaled_loss = ops.cast(loss, "float32") * scale
        per_task = recorder.task_loss_list if plan == "norms" else recorder.objective_list
        targets = [ops.cast(t, "float32") * scale for t in per_task]
        additional = recorder.additional_loss
        if additional is not None:
            additional = ops.cast(additional, "float32") * scale
    variables = model.trainable_variables
    task_losses = recorder.task_losses
    if plan == "norms":
        shared = model.shared_layer.trainable_variables
        norms = tf.stack([_global_norm(tape.gradient(t, shared)) for t in targets])
        gradients = tape.gradient(scaled_loss, variables)
        model.optimizer.apply_gradients(zip(gradients, variables))
        _update_norms(model, task_losses, norms / scale)
    elif plan == "parameters":
        task_grads = [_dense(tape.gradient(t, variables)) for t in targets]
        additional_grads = None
        if additional is not None:
            additional_grads = _dense(tape.gradient(additional, variables))
        gradients = _parameter_gradients(
            model, variables, task_grads, additional_grads, task_losses, scale
        )
        model.optimizer.apply_gradients(zip(gradients, variables))
    else:
        dz = [tape.gradient(t, z) for t in targets]
        correction = _representation_correction(model, z, dz, task_losses, scale)
        gradients = tape.gradient(
            [scaled_loss, z],
            variables,
            output_gradients=[tf.ones_like(scaled_loss), correction],
        )
        model.optimizer.apply_gradients(zip(gradients, variables))
    del tape
    return model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)


def _dense(gradients):
    """Embedding gradients come as `tf.IndexedSlices`; the combination
    needs dense tensors."""
    import tensorflow as tf

    return [None if g is None else tf.convert_to_tensor(g) for g in gradients]


def _unscale_for_replicas(loss):
    """Under `tf.distribute` Keras' losses are divided by the number of
    replicas; the logged loss is multiplied back, as Keras' train_step
    does."""
    import tensorflow as tf

    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    if replicas > 1:
        loss = loss * ops.cast(replicas, loss.dtype)
    return loss


# PyTorch -----------------------------------------------------------------------


def _torch_train_step(model, data):
    import torch

    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    plan = _plan(model)
    if plan == "representation":
        z, y_pred = _split_forward(model, x)
    else:
        y_pred = _forward(model, x)
    model.zero_grad()
    loss = model.compute_loss(
        x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
    )
    recorder = model._recorder
    task_losses = recorder.task_losses.detach()
    loss_tracker(model).update_state(loss, sample_weight=_batch_size(x))
    with torch.no_grad():
        scale = _loss_scale(model)
    scaled_loss = loss.float() * scale
    variables = model.trainable_variables[:]
    values = [v.value for v in variables]

    def grad(target, sources, retain=True):
        return list(
            torch.autograd.grad(target, sources, retain_graph=retain, allow_unused=True)
        )

    if plan == "norms":
        shared = [v.value for v in model.shared_layer.trainable_variables]
        norms = torch.stack(
            [_global_norm(grad(l.float() * scale, shared)) for l in recorder.task_loss_list]
        )
        gradients = grad(scaled_loss, values, retain=False)
        with torch.no_grad():
            model.optimizer.apply(gradients, variables)
            _update_norms(model, task_losses, norms.detach() / scale)
    elif plan == "parameters":
        task_grads = [grad(o.float() * scale, values) for o in recorder.objective_list]
        additional_grads = None
        if recorder.additional_loss is not None:
            additional_grads = grad(recorder.additional_loss.float() * scale, values)
        with torch.no_grad():
            gradients = _parameter_gradients(
                model, variables, task_grads, additional_grads, task_losses, scale
            )
            model.optimizer.apply(gradients, variables)
    else:
        dz = [grad(o.float() * scale, [z])[0] for o in recorder.objective_list]
        with torch.no_grad():
            correction = _representation_correction(model, z, dz, task_losses, scale)
        gradients = list(
            torch.autograd.grad(
                [scaled_loss, z],
                values,
                grad_outputs=[torch.ones_like(scaled_loss), correction],
                allow_unused=True,
            )
        )
        with torch.no_grad():
            model.optimizer.apply(gradients, variables)
    return model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)


# JAX ---------------------------------------------------------------------------


def _jax_train_step(model, state, data):
    import jax
    import jax.numpy as jnp

    trainable, non_trainable, optimizer_variables, metrics_variables = state
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    plan = _plan(model)
    fixed = list(zip(model.non_trainable_variables, non_trainable)) + list(
        zip(model.metrics_variables, metrics_variables)
    )
    with keras.StatelessScope(
        state_mapping=list(zip(model.optimizer.variables, optimizer_variables))
    ):
        scale = _loss_scale(model)

    def stateless(trainable_values, run):
        mapping = list(zip(model.trainable_variables, trainable_values)) + fixed
        with keras.StatelessScope(state_mapping=mapping, collect_losses=True) as scope:
            result = run()
        new_non_trainable = [
            _current(scope, v, old)
            for v, old in zip(model.non_trainable_variables, non_trainable)
        ]
        new_metrics = [
            _current(scope, v, old)
            for v, old in zip(model.metrics_variables, metrics_variables)
        ]
        return result, new_non_trainable, new_metrics

    def forward(trainable_values, offset=None):
        def run():
            if plan == "representation":
                z, y_pred = _split_forward(model, x, offset)
            else:
                z, y_pred = None, _forward(model, x)
            loss = model.compute_loss(
                x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
            )
            recorder = model._recorder
            per_task = (
                recorder.task_loss_list if plan == "norms" else recorder.objective_list
            )
            additional = recorder.additional_loss
            has_additional = additional is not None
            if additional is None:
                additional = jnp.zeros((), "float32")
            outputs = (
                jnp.stack([jnp.asarray(t, "float32") for t in per_task]),
                jnp.asarray(additional, "float32"),
                jnp.asarray(loss, "float32"),
            )
            if plan == "representation":
                outputs = outputs + (z,)
            flags["has_additional"] = has_additional
            return outputs, (loss, y_pred, recorder.task_losses)

        (outputs, extra), new_non_trainable, new_metrics = stateless(trainable_values, run)
        loss, y_pred, task_losses = extra
        return outputs, (loss, y_pred, task_losses, new_non_trainable, new_metrics)

    flags = {}
    if plan == "representation":

        def trunk_only(trainable_values):
            def run():
                return model._split.trunk(keras.tree.flatten(x), training=True)

            return stateless(trainable_values, run)[0]

        spec = jax.eval_shape(trunk_only, trainable)
        offset = jnp.zeros(spec.shape, spec.dtype)
        outputs, pullback, extra = jax.vjp(forward, trainable, offset, has_aux=True)
    else:
        outputs, pullback, extra = jax.vjp(forward, trainable, has_aux=True)
    loss, y_pred, task_losses, non_trainable, metrics_variables = extra
    num_tasks = outputs[0].shape[0]
    eye = jnp.eye(num_tasks, dtype="float32") * scale

    def cotangent(targets, additional=0.0, total=0.0, z=None):
        result = (targets, jnp.asarray(additional, "float32"), jnp.asarray(total, "float32"))
        return result if z is None else result + (z,)

    zero_z = None if plan != "representation" else jnp.zeros_like(outputs[3])
    task_rows = jax.vmap(lambda row: pullback(cotangent(row, z=zero_z)))(eye)
    mapping = list(zip(model.non_trainable_variables, non_trainable))
    variables = model.trainable_variables
    with keras.StatelessScope(state_mapping=mapping) as scope:
        if plan == "norms":
            shared_ids = {id(v) for v in model.shared_layer.trainable_variables}
            index = [i for i, v in enumerate(variables) if id(v) in shared_ids]
            norms = jax.vmap(lambda g: _global_norm([g[i] for i in index]))(task_rows[0])
            (gradients,) = pullback(cotangent(jnp.zeros((num_tasks,)), total=scale))
            _update_norms(model, task_losses, norms / scale)
        elif plan == "parameters":
            rows = task_rows[0]
            task_grads = [[g[t] for g in rows] for t in range(num_tasks)]
            additional_grads = None
            if flags["has_additional"]:
                (additional_grads,) = pullback(
                    cotangent(jnp.zeros((num_tasks,)), additional=scale)
                )
            gradients = _parameter_gradients(
                model, variables, task_grads, additional_grads, task_losses, scale
            )
        else:
            z = outputs[3]
            dz = [task_rows[1][t] for t in range(num_tasks)]
            correction = _representation_correction(model, z, dz, task_losses, scale)
            gradients, _ = pullback(
                cotangent(jnp.zeros((num_tasks,)), total=scale, z=correction)
            )
    non_trainable = [scope.get_current_value(v) for v in model.non_trainable_variables]
    trainable, optimizer_variables = model.optimizer.stateless_apply(
        optimizer_variables, gradients, trainable
    )
    logs, metrics_variables = update_metrics_variables(
        model, metrics_variables, loss, x, y, y_pred, sample_weight
    )
    return logs, (trainable, non_trainable, optimizer_variables, metrics_variables)


def _current(scope, variable, old):
    value = scope.get_current_value(variable)
    return old if value is None else value
