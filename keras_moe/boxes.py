"""Pure helpers on axis-aligned boxes, written with `keras.ops` only.

Boxes are normalised `[y1, x1, y2, x2]` corners in `[0, 1]` (the keras_cv
`"rel_yxyx"` format): `(y1, x1)` is the top-left corner, `(y2, x2)` the
bottom-right one, as fractions of the image height and width. Every function
works elementwise over boxes of shape `(..., 4)`.
"""

import numpy as np
from keras import ops

from keras_moe.utils.tensors import concrete_values

# The smallest denominator: zero-area boxes give finite values and finite
# gradients, and non-degenerate boxes are not biased (identical boxes have
# IoU exactly 1).
EPSILON = 1e-7

_CORNERS = ("y1", "x1", "y2", "x2")


def _corners(boxes):
    boxes = ops.convert_to_tensor(boxes)
    return boxes[..., 0], boxes[..., 1], boxes[..., 2], boxes[..., 3]


def area(boxes):
    """Area `(y2 - y1) * (x2 - x1)` of boxes `(..., 4)`, `(...)`.

    An inverted side (`y2 < y1` or `x2 < x1`) counts as length 0.
    """
    y1, x1, y2, x2 = _corners(boxes)
    return ops.relu(y2 - y1) * ops.relu(x2 - x1)


def _overlap(a, b):
    """Intersection, union and enclosing-box areas of two sets of boxes."""
    ay1, ax1, ay2, ax2 = _corners(a)
    by1, bx1, by2, bx2 = _corners(b)
    inter_h = ops.relu(ops.minimum(ay2, by2) - ops.maximum(ay1, by1))
    inter_w = ops.relu(ops.minimum(ax2, bx2) - ops.maximum(ax1, bx1))
    intersection = inter_h * inter_w
    union = area(a) + area(b) - intersection
    enclose_h = ops.relu(ops.maximum(ay2, by2) - ops.minimum(ay1, by1))
    enclose_w = ops.relu(ops.maximum(ax2, bx2) - ops.minimum(ax1, bx1))
    return intersection, union, enclose_h * enclose_w


def iou(a, b, epsilon=EPSILON):
    """Intersection over union of boxes `a` and `b`, elementwise.

    `IoU(A, B) = |A n B| / max(|A u B|, epsilon)`, in `[0, 1]`; two zero-area
    boxes have IoU 0 (not NaN).

    Args:
        a, b: boxes `(..., 4)` (broadcastable), `[y1, x1, y2, x2]`.
        epsilon: the smallest denominator (for zero-area boxes).

    Returns:
        `(...)`, the IoU of each pair.

    Example:

    >>> import numpy as np
    >>> a = np.array([[0.0, 0.0, 0.5, 0.5]], "float32")
    >>> b = np.array([[0.0, 0.25, 0.5, 0.75]], "float32")
    >>> [round(float(v), 4) for v in np.asarray(iou(a, b))]
    [0.3333]
    """
    intersection, union, _ = _overlap(a, b)
    return intersection / ops.maximum(union, epsilon)


def giou(a, b, epsilon=EPSILON):
    """Generalised intersection over union of boxes `a` and `b`, elementwise.

    `GIoU(A, B) = IoU(A, B) - |C \\ (A u B)| / |C|`, where `C` is the
    smallest box enclosing both. It lies in `(-1, 1]`: 1 for identical
    boxes, and unlike IoU it keeps decreasing as disjoint boxes move apart
    (negative), so `1 - GIoU` gives a gradient even without overlap.

    Args:
        a, b: boxes `(..., 4)` (broadcastable), `[y1, x1, y2, x2]`.
        epsilon: the smallest denominator (for zero-area boxes).

    Returns:
        `(...)`, the GIoU of each pair.

    Example:

    >>> import numpy as np
    >>> a = np.array([[0.0, 0.0, 0.25, 0.25]], "float32")
    >>> b = np.array([[0.75, 0.75, 1.0, 1.0]], "float32")
    >>> [round(float(v), 4) for v in np.asarray(giou(a, b))]
    [-0.875]

    References:
        Rezatofighi et al. Generalized Intersection over Union: A Metric and
        a Loss for Bounding Box Regression (CVPR 2019).
    """
    intersection, union, enclosing = _overlap(a, b)
    return intersection / ops.maximum(union, epsilon) - (
        enclosing - union
    ) / ops.maximum(enclosing, epsilon)


def validate_boxes(boxes, name="boxes"):
    """Checks that `boxes` are valid normalised `[y1, x1, y2, x2]` boxes.

    The last dimension must be 4 (checked whenever it is known). When the
    values are concrete (NumPy arrays, eager tensors) every box must also be
    finite, inside `[0, 1]` (up to `1e-6`) and have `y1 <= y2`, `x1 <= x2`.
    Inside a traced function (`tf.function`, `jax.jit`: the default of
    `fit` on TensorFlow and JAX) or on symbolic tensors the values are not
    known and only the shape is checked; torch and `run_eagerly=True` check
    the values on every call.

    Args:
        boxes: a tensor or array `(..., 4)`.
        name: what to call the boxes in error messages.

    Returns:
        `boxes`, unchanged.

    Raises:
        ValueError: naming the first offending box (its index and value).

    Example:

    >>> import numpy as np
    >>> validate_boxes(np.array([[0.5, 0.1, 0.2, 0.9]]), name="y_true")
    Traceback (most recent call last):
        ...
    ValueError: y_true must be boxes [y1, x1, y2, x2] with y1 <= y2 and x1 <= x2. Received: y_true[0] = [0.5, 0.1, 0.2, 0.9] has y2 < y1
    """
    shape = tuple(getattr(boxes, "shape", np.shape(boxes)))
    if not shape or (shape[-1] is not None and shape[-1] != 4):
        raise ValueError(
            f"{name} must have shape (..., 4), [y1, x1, y2, x2] per box. "
            f"Received: {name} with shape {shape}"
        )
    values = concrete_values(boxes)
    if values is None or values.size == 0:
        return boxes
    lead = values.shape[:-1]
    raw = values.reshape(-1, 4)
    values = raw.astype("float64")

    def number(v):
        # The shortest text that reads back as the value in its own dtype.
        if np.issubdtype(np.asarray(v).dtype, np.floating):
            return np.format_float_positional(v, unique=True, trim="-")
        return str(v)

    def where(flat_index):
        index = np.unravel_index(flat_index, lead) if lead else ()
        box = ", ".join(number(v) for v in raw[flat_index])
        return f"{name}[{', '.join(str(int(i)) for i in index)}] = [{box}]"

    bad = ~np.isfinite(values).all(axis=1)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(
            f"{name} must be finite. Received: {where(i)} is not finite"
        )
    outside = ((values < -1e-6) | (values > 1 + 1e-6)).any(axis=1)
    if outside.any():
        i = int(np.argmax(outside))
        j = int(np.argmax((values[i] < -1e-6) | (values[i] > 1 + 1e-6)))
        raise ValueError(
            f"{name} must be normalised boxes with coordinates in [0, 1] "
            "(divide pixel coordinates by the image height and width). "
            f"Received: {where(i)} has {_CORNERS[j]}={number(raw[i, j])} "
            "outside [0, 1]"
        )
    inverted = (values[:, 2] < values[:, 0]) | (values[:, 3] < values[:, 1])
    if inverted.any():
        i = int(np.argmax(inverted))
        which = "y2 < y1" if values[i, 2] < values[i, 0] else "x2 < x1"
        raise ValueError(
            f"{name} must be boxes [y1, x1, y2, x2] with y1 <= y2 and "
            f"x1 <= x2. Received: {where(i)} has {which}"
        )
    return boxes
