"""Task weighting and gradient balancing for multi-task models.

A task weighting decides how the `T` task losses of a training step move
the shared parameters. `keras_moe.models.MultiTaskModel(...,
task_weighting=...)` takes one by name or as an object, inside the
ordinary `compile`/`fit`, on TensorFlow, JAX and PyTorch:

- loss-based (they only see the losses; as cheap as the plain step):
  `"fixed"` (`"ew"`), `"uncertainty"`, `"dwa"`, `"rlw"`, `"gls"`,
  `"imtl_l"`, `"famo"`;
- gradient-norm based: `"gradnorm"` (`T` extra backward passes to the last
  shared layer);
- gradient-based (they combine the `(T, P)` matrix of task gradients on
  the shared parameters, or on a shared representation):
  `"mgda"`, `"pcgrad"`, `"graddrop"`, `"gradvac"`, `"cagrad"`,
  `"imtl_g"`, `"imtl"`, `"nash_mtl"`, `"aligned_mtl"`, `"upgrad"`,
  `"db_mtl"`.

Each method is a Keras layer in its own module (its state is variables
that save and reload with the model); the gradient methods' cores are
pure functions on a `(T, P)` gradient matrix or its `T x T` Gram matrix
(`mgda_weights`, `pcgrad_weights`, ...), usable on their own. See
`docs/task_weighting.md` for the method table, the costs and a benchmark.
"""

import keras

from keras_moe.weighting.aligned_mtl import (
    AlignedMTL,
    aligned_mtl_balance,
    aligned_mtl_direction,
    aligned_mtl_weights,
)
from keras_moe.weighting.base import (
    REGISTRY,
    GradientWeighting,
    TaskWeighting,
    WeightedGradientWeighting,
    gram_matrix,
)
from keras_moe.weighting.cagrad import CAGrad, cagrad_direction, cagrad_weights
from keras_moe.weighting.db_mtl import DBMTL, db_mtl_direction
from keras_moe.weighting.dwa import DWA
from keras_moe.weighting.famo import FAMO
from keras_moe.weighting.fixed import FixedWeighting
from keras_moe.weighting.gls import GLS
from keras_moe.weighting.graddrop import GradDrop, graddrop_direction
from keras_moe.weighting.gradnorm import GRADNORM_OPTIMIZERS, GradNorm
from keras_moe.weighting.gradvac import GradVac, gradvac_weights
from keras_moe.weighting.imtl import IMTL, IMTLG, IMTLL, imtl_g_weights
from keras_moe.weighting.mgda import (
    MGDA,
    mgda_direction,
    mgda_weights,
    min_norm_weights,
)
from keras_moe.weighting.nash_mtl import NashMTL, nash_direction, nash_weights
from keras_moe.weighting.pcgrad import (
    PCGrad,
    pcgrad_direction,
    pcgrad_projections,
    pcgrad_weights,
)
from keras_moe.weighting.rlw import RLW
from keras_moe.weighting.uncertainty import UncertaintyWeighting
from keras_moe.weighting.upgrad import UPGrad, upgrad_direction, upgrad_weights

# Every string `MultiTaskModel(task_weighting=...)` accepts ("ew" is
# another name of "fixed").
WEIGHTINGS = tuple(REGISTRY)


def get(identifier):
    """A `TaskWeighting` from `None` (fixed), a registered name (see
    `WEIGHTINGS`; case and `-` / `_` do not matter), a weighting instance,
    or its serialized config."""
    if identifier is None:
        return FixedWeighting()
    if isinstance(identifier, TaskWeighting):
        return identifier
    if isinstance(identifier, dict):
        try:
            weighting = keras.saving.deserialize_keras_object(identifier)
        except Exception as error:  # noqa: BLE001 - unknown class, bad argument
            # Keras wraps a constructor's error in layers of context; the
            # innermost one names the argument.
            cause = str(error).rsplit("Exception encountered: ", 1)[-1]
            raise ValueError(
                f"task_weighting could not be deserialized: {cause} "
                f"Received: task_weighting={identifier!r}"
            ) from error
        if isinstance(weighting, TaskWeighting):
            return weighting
    if isinstance(identifier, str):
        key = identifier.lower().replace("-", "_")
        if key in REGISTRY:
            return REGISTRY[key]()
    raise ValueError(
        f"task_weighting must be one of {list(WEIGHTINGS)}, None, or a "
        "TaskWeighting instance (e.g. GradNorm(alpha=1.0)). Received: "
        f"task_weighting={identifier!r}"
    )


__all__ = [
    "AlignedMTL",
    "CAGrad",
    "DBMTL",
    "DWA",
    "FAMO",
    "FixedWeighting",
    "GLS",
    "GRADNORM_OPTIMIZERS",
    "GradDrop",
    "GradNorm",
    "GradVac",
    "GradientWeighting",
    "IMTL",
    "IMTLG",
    "IMTLL",
    "MGDA",
    "NashMTL",
    "PCGrad",
    "RLW",
    "TaskWeighting",
    "UPGrad",
    "UncertaintyWeighting",
    "WEIGHTINGS",
    "WeightedGradientWeighting",
    "aligned_mtl_balance",
    "aligned_mtl_direction",
    "aligned_mtl_weights",
    "cagrad_direction",
    "cagrad_weights",
    "db_mtl_direction",
    "get",
    "graddrop_direction",
    "gradvac_weights",
    "gram_matrix",
    "imtl_g_weights",
    "mgda_direction",
    "mgda_weights",
    "min_norm_weights",
    "nash_direction",
    "nash_weights",
    "pcgrad_direction",
    "pcgrad_projections",
    "pcgrad_weights",
    "upgrad_direction",
    "upgrad_weights",
]
