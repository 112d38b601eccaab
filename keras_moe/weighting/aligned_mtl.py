"""Aligned-MTL: independent component alignment (Senushkin et al., 2023)."""

import keras
from keras import ops

from keras_moe.weighting.base import WeightedGradientWeighting, register

_FLOAT32_EPS = 1.1920929e-07


def aligned_mtl_balance(gram):
    """Aligned-MTL's balancing matrix: with `G G^T = V diag(lambda) V^T`,
    `B = sqrt(lambda_min) V diag(lambda)^-1/2 V^T` over the eigenvalues
    above `max(lambda) T eps` (the numerical rank).

    The aligned gradients `B G` have the Gram matrix
    `lambda_min V_r V_r^T`: all their singular values equal (condition
    number 1 on the span of the task gradients).
    """
    gram = ops.cast(gram, "float32")
    t = gram.shape[0]
    eigenvalues, eigenvectors = ops.eigh(gram)
    tolerance = ops.max(eigenvalues) * t * _FLOAT32_EPS
    kept = eigenvalues > tolerance
    smallest = ops.min(ops.where(kept, eigenvalues, ops.max(eigenvalues)))
    inverse_root = ops.where(kept, 1.0 / ops.sqrt(ops.where(kept, eigenvalues, 1.0)), 0.0)
    return ops.sqrt(ops.maximum(smallest, 0.0)) * ops.matmul(
        eigenvectors * inverse_root[None, :], ops.transpose(eigenvectors)
    )


def aligned_mtl_weights(gram):
    """Aligned-MTL's weights `B^T 1`: the update is the sum of the aligned
    gradients `B G` (see `aligned_mtl_balance`)."""
    return ops.sum(aligned_mtl_balance(gram), axis=0)


def aligned_mtl_direction(grads):
    """Aligned-MTL's update of the `(T, P)` task gradients."""
    grads = ops.cast(grads, "float32")
    gram = ops.matmul(grads, ops.transpose(grads))
    return ops.matmul(aligned_mtl_weights(gram), grads)


@register("aligned_mtl")
@keras.saving.register_keras_serializable(package="keras_moe")
class AlignedMTL(WeightedGradientWeighting):
    """Aligned-MTL: rescale the principal components of the task gradients
    to one common size, removing both conflict and dominance.

    With the eigendecomposition `G G^T = V diag(lambda) V^T`, the aligned
    task gradients are `B G` with
    `B = sqrt(lambda_min) V diag(lambda)^-1/2 V^T`: their Gram matrix is
    `lambda_min I` on the span of the gradients (condition number 1, the
    paper's stability criterion), and the update is their sum,
    `d = 1^T B G`. Eigenvalues below `max(lambda) T eps` count as zero.

    Cost: `T` backward passes (or `T` head passes and one trunk pass in
    representation mode) and a `T x T` eigendecomposition.

    Args:
        **kwargs: base `Layer` arguments.

    Example:

    >>> import numpy as np
    >>> grads = np.array([[3.0, 0.0], [0.0, 1.0]], "float32")
    >>> aligned = AlignedMTL()
    >>> aligned.build((2,))
    >>> update = keras.ops.convert_to_numpy(aligned.combine(grads, np.ones(2)))
    >>> [round(float(x), 4) for x in update]
    [1.0, 1.0]

    References:
        Senushkin, Patakin, Kuznetsov, Konushin. Independent Component
        Alignment for Multi-Task Learning. CVPR 2023.
    """

    def gram_weights(self, gram, task_losses):
        return aligned_mtl_weights(gram)
