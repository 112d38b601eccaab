"""Per-backend training steps that also measure per-task gradient norms.

Keras has no backend-agnostic gradient op, so GradNorm's
`g_t = ||grad_W L_t||` (W: the shared layer's trainable weights) is computed
here, once per backend, in a copy of Keras 3's `train_step` for that backend
extended by the per-task gradients and the weighting's `update`. The model
must be a `keras_moe.models.MultiTaskModel`: its `compute_loss` leaves the
step's `(T,)` task losses in `model._recorder.task_losses`.

- TensorFlow: a persistent `GradientTape` (graph or XLA, as `fit` compiles).
- JAX: one `jax.vjp` of Keras' stateless loss; the total gradient and the
  `T` task gradients are pullbacks of it (the task ones vmapped).
- PyTorch: `torch.autograd.grad` on each task loss, then `backward()`.
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
        f"GradNorm's per-task gradients are not implemented for the "
        f"{backend!r} backend (TensorFlow, JAX and PyTorch are)."
    )


def _shared_variables(model):
    return list(model.shared_layer.trainable_variables)


def _global_norm(gradients):
    squares = [ops.sum(ops.square(g)) for g in gradients if g is not None]
    if not squares:
        return ops.zeros((), "float32")
    return ops.sqrt(ops.sum(ops.stack([ops.cast(s, "float32") for s in squares])))


def _batch_size(x):
    return ops.shape(next(i for i in keras.tree.flatten(x) if i is not None))[0]


def _forward(model, x):
    if "training" in model.call_signature_parameters:
        return model(x, training=True)
    return model(x)


def _tensorflow_train_step(model, data):
    import tensorflow as tf

    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    with tf.GradientTape(persistent=True) as tape:
        y_pred = _forward(model, x)
        loss = model.compute_loss(
            x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
        )
        task_losses = model._recorder.task_losses
        per_task = model._recorder.task_loss_list  # sliced inside the tape
        loss_tracker(model).update_state(
            _unscale_for_replicas(loss), sample_weight=_batch_size(x)
        )
        if model.optimizer is not None:
            loss = model.optimizer.scale_loss(loss)
    shared = _shared_variables(model)
    norms = tf.stack(
        [
            _global_norm(tape.gradient(task_loss, shared))
            for task_loss in per_task
        ]
    )
    trainable_weights = model.trainable_weights
    gradients = tape.gradient(loss, trainable_weights)
    del tape
    model.optimizer.apply_gradients(zip(gradients, trainable_weights))
    model.task_weighting.update(task_losses, norms)
    return model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)


def _unscale_for_replicas(loss):
    """Under `tf.distribute` Keras' losses are divided by the number of
    replicas; the logged loss is multiplied back, as Keras' train_step
    does."""
    import tensorflow as tf

    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    if replicas > 1:
        loss = loss * ops.cast(replicas, loss.dtype)
    return loss


def _torch_train_step(model, data):
    import torch

    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    y_pred = _forward(model, x)
    model.zero_grad()
    loss = model.compute_loss(
        x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
    )
    task_losses = model._recorder.task_losses
    loss_tracker(model).update_state(loss, sample_weight=_batch_size(x))
    shared = [v.value for v in _shared_variables(model)]
    norms = []
    for task_loss in model._recorder.task_loss_list:
        gradients = torch.autograd.grad(
            task_loss, shared, retain_graph=True, allow_unused=True
        )
        norms.append(_global_norm(gradients))
    norms = torch.stack(norms)
    if model.optimizer is not None:
        loss = model.optimizer.scale_loss(loss)
    loss.backward()
    trainable_weights = model.trainable_weights[:]
    gradients = [v.value.grad for v in trainable_weights]
    with torch.no_grad():
        model.optimizer.apply(gradients, trainable_weights)
        model.task_weighting.update(task_losses.detach(), norms.detach())
    return model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)


def _jax_train_step(model, state, data):
    import jax
    import jax.numpy as jnp

    trainable, non_trainable, optimizer_variables, metrics_variables = state
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    shared_ids = {id(v) for v in _shared_variables(model)}
    shared_index = [
        i for i, v in enumerate(model.trainable_variables) if id(v) in shared_ids
    ]

    def loss_and_task_losses(trainable_values):
        loss, aux = model.compute_loss_and_updates(
            trainable_values,
            non_trainable,
            metrics_variables,
            x,
            y,
            sample_weight,
            training=True,
            optimizer_variables=optimizer_variables,
        )
        return (loss, model._recorder.task_losses), aux

    (loss, task_losses), pullback, aux = jax.vjp(
        loss_and_task_losses, trainable, has_aux=True
    )
    (gradients,) = pullback((jnp.ones_like(loss), jnp.zeros_like(task_losses)))

    def task_gradient_norm(cotangent):
        (task_gradients,) = pullback((jnp.zeros_like(loss), cotangent))
        return _global_norm([task_gradients[i] for i in shared_index])

    eye = jnp.eye(task_losses.shape[0], dtype=task_losses.dtype)
    norms = jax.vmap(task_gradient_norm)(eye)
    unscaled_loss, y_pred, non_trainable, metrics_variables = aux

    trainable, optimizer_variables = model.optimizer.stateless_apply(
        optimizer_variables, gradients, trainable
    )
    mapping = list(zip(model.non_trainable_variables, non_trainable))
    with keras.StatelessScope(state_mapping=mapping) as scope:
        model.task_weighting.update(task_losses, norms)
    non_trainable = [
        scope.get_current_value(v) for v in model.non_trainable_variables
    ]
    logs, metrics_variables = update_metrics_variables(
        model, metrics_variables, unscaled_loss, x, y, y_pred, sample_weight
    )
    return logs, (trainable, non_trainable, optimizer_variables, metrics_variables)
