"""Shrinking a trained MoE model: measure expert usage, prune experts, distil.

- `expert_usage(model, data)`: every MoE layer's per-expert load, summed
  over a whole dataset (a layer's `routing_stats()` only hold the last
  batch); `weight_bytes(model)` measures a model (`usage.py`).
- `select_experts(model, keep, usage)` / `prune_experts(model, keep, usage)`:
  a new model in which the chosen MoE layers keep their most-used experts
  (`pruning.py`).
- `Distiller(student, teacher)`: trains a (dense) student on the labels and
  on a teacher's outputs, inside `compile`/`fit`; `distillation_loss`
  (`distillation.py`).
- int8 quantisation is Keras' own `model.quantize("int8")`, which every
  `Experts` bank implements (see `keras_moe.layers.Experts`);
  `weight_bytes(model, experts_only=True)` measures what it saves.

See docs/compression.md.
"""

from keras_moe.compression.distillation import (
    DISTILLATION_LOSSES,
    Distiller,
    distillation_loss,
)
from keras_moe.compression.pruning import prune_experts, select_experts
from keras_moe.compression.usage import expert_usage, weight_bytes

__all__ = [
    "DISTILLATION_LOSSES",
    "Distiller",
    "distillation_loss",
    "expert_usage",
    "prune_experts",
    "select_experts",
    "weight_bytes",
]
