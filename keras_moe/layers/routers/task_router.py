"""Task-level routing: every token of a task goes to the task's experts."""

import keras
import numpy as np
from keras import ops

from keras_moe.layers import _routing_ids
from keras_moe.utils import validation as check
from keras_moe.layers.routers.base import Router, RoutingResult
from keras_moe.ops import balancing, selection
from keras_moe.utils.tensors import softmax


@keras.saving.register_keras_serializable(package="keras_moe")
class TaskRouter(Router):
    """Task-MoE router: a learned expert choice per task, not per token.

    Task-level MoE (Kudugunta et al. 2021) routes on the task (e.g. the
    language pair) instead of the token, so that each task uses a fixed
    subset of experts and its sub-network can be extracted for serving. A
    learned logit table `L` `(num_tasks, E)` gives, for every token of task
    `t`:

    `p = softmax(L[t])`, `I = top_k(p)`, `w_j = p_{I_j} / sum_{i in I} p_i`

    The renormalisation applies only for `k > 1`; with `k = 1` the weight is
    the raw probability `p_{I_1}`, so that the task loss trains the table (as
    in Switch). `task_experts(t)` returns `I` for task `t`.

    Task ids come with the call as `routing_inputs=` (one per token;
    `SparseMoE` also accepts one per example and broadcasts them). Ids
    outside `[0, num_tasks)`: on eager inputs the call raises a `ValueError`
    naming them; inside a compiled function (`tf.function`, `jax.jit`), where
    a value cannot be checked, the tokens of such ids get NaN weights and
    probabilities, so the outputs and the loss become NaN rather than
    silently wrong (stop training with `keras.callbacks.TerminateOnNaN`).

    In training it adds `load_balance_weight * L_balance` (the Switch loss
    over the tokens of the batch, `keras_moe.ops.load_balancing_loss`) with
    `add_loss`; the value is also returned.

    Args:
        num_experts: `E`.
        num_tasks: number of tasks `T`.
        k: experts per task, `1 <= k <= E`.
        load_balance_weight: weight of the load-balancing loss (default 0:
            tasks are few and their balance is usually left free).
        kernel_initializer: initializer of the `(T, E)` logit table
            (default: normal with standard deviation 0.1).
        **kwargs: base `Layer` arguments; `dtype` defaults to `"float32"`.

    Call arguments:
        inputs: `(..., d)` tokens (only their shape is used).
        routing_inputs: `(...)` integer task ids, one per token.
        training: whether to add the loss.
        mask: optional bool, one per token: tokens that count in the
            load-balancing loss.

    Returns:
        A `RoutingResult` with `expert_index` `(..., k)` int32, `combine_weights`
        `(..., k)`, `probs` `(..., E)`, `logits` `(..., E)` and the scalar
        unweighted `load_balance_loss`.

    Example:

    >>> import keras
    >>> import numpy as np
    >>> router = TaskRouter(num_experts=8, num_tasks=3, k=2)
    >>> tasks = np.array([0, 2, 2, 1], "int32")
    >>> routing = router(np.zeros((4, 16), "float32"), routing_inputs=tasks)
    >>> index = keras.ops.convert_to_numpy(routing["expert_index"])
    >>> bool((index[1] == router.task_experts(2)).all())
    True

    References:
        Kudugunta et al. Beyond Distillation: Task-level Mixture-of-Experts
        for Efficient Inference (Findings of EMNLP 2021).
    """

    needs_routing_inputs = True
    routing_fields = ("logits", "load_balance_loss")

    def __init__(
        self,
        num_experts,
        num_tasks,
        k=1,
        load_balance_weight=0.0,
        kernel_initializer=None,
        **kwargs,
    ):
        super().__init__(num_experts, k=k, **kwargs)
        self.num_tasks = check.positive_int(
            "num_tasks", num_tasks, maximum=check.MAX_TASK_IDS
        )
        self.load_balance_weight = check.non_negative_float(
            "load_balance_weight", load_balance_weight
        )
        self.kernel_initializer = check.initializer(
            "kernel_initializer",
            kernel_initializer or keras.initializers.RandomNormal(stddev=0.1),
        )

    def build(self, input_shape):
        if self.built:  # e.g. deserialized built, then built again by SparseMoE
            return
        check.token_input_shape(type(self).__name__, input_shape)
        self.task_logits = self.add_weight(
            name="task_logits",
            shape=(self.num_tasks, self.num_experts),
            initializer=self.kernel_initializer,
        )

    def _task_routing(self):
        """Per task: probs `(T, E)`, expert index and weights `(T, k)`."""
        logits = ops.cast(self.task_logits, self.compute_dtype)
        probs = softmax(logits, axis=-1)
        weights, index = selection.top_k(probs, self.k)
        if self.k > 1:
            weights = weights / ops.sum(weights, axis=-1, keepdims=True)
        return logits, probs, index, weights

    def _check_task_ids(self, ids):
        values = _routing_ids.concrete_values(ids)
        if values is None:
            return
        bad = values[(values < 0) | (values >= self.num_tasks)]
        if bad.size:
            raise ValueError(
                f"{self.name}: task ids must be in [0, num_tasks). Received: "
                f"ids {sorted(set(bad.tolist()))[:10]} with "
                f"num_tasks={self.num_tasks}"
            )

    def call(self, inputs, routing_inputs=None, training=None, mask=None):
        _routing_ids.require_ids(self, inputs, routing_inputs)
        ids = _routing_ids.as_int32(routing_inputs)
        self._check_task_ids(ids)
        valid = ops.logical_and(
            ops.greater_equal(ids, 0), ops.less(ids, self.num_tasks)
        )
        safe_ids = ops.where(valid, ids, 0)
        logits, probs, index, weights = self._task_routing()
        nan = ops.convert_to_tensor(float("nan"), dtype=self.compute_dtype)
        invalid = ops.expand_dims(ops.logical_not(valid), -1)

        def gather(table, poison):
            rows = ops.take(table, safe_ids, axis=0)
            return ops.where(invalid, nan, rows) if poison else rows

        expert_index = gather(index, poison=False)
        combine_weights = gather(weights, poison=True)
        token_probs = gather(probs, poison=True)
        token_logits = gather(logits, poison=True)
        balance = balancing.load_balancing_loss(
            ops.reshape(token_probs, (-1, self.num_experts)),
            ops.reshape(expert_index, (-1, self.k)),
            self.num_experts,
            mask=mask,
        )
        routing = RoutingResult(
            expert_index=expert_index,
            combine_weights=combine_weights,
            probs=token_probs,
            logits=token_logits,
            load_balance_loss=balance,
        )
        self.add_weighted_losses(
            routing, training, {"load_balance_loss": self.load_balance_weight}
        )
        return routing

    def task_experts(self, task_id=None):
        """The experts of task `task_id`, `(k,)` int32 NumPy, best first (or
        of every task, `(num_tasks, k)`, when `task_id` is None)."""
        if not self.built:
            raise ValueError(
                f"{self.name} is not built yet: call it (or the model) once "
                "before asking for task_experts."
            )
        index = np.asarray(ops.convert_to_numpy(self._task_routing()[2]), "int32")
        if task_id is None:
            return index
        if (
            isinstance(task_id, bool)
            or not isinstance(task_id, (int, np.integer))
            or not 0 <= task_id < self.num_tasks
        ):
            raise ValueError(
                "task_id must be an integer in [0, num_tasks). Received: "
                f"task_id={task_id!r}, num_tasks={self.num_tasks}"
            )
        return index[int(task_id)]

    def get_config(self):
        config = super().get_config()
        config.update(
            num_tasks=self.num_tasks,
            load_balance_weight=self.load_balance_weight,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
        )
        return config
