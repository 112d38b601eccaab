"""Multi-task data sets built from arrays you already have (no download).

`multi_mnist` builds MultiMNIST (Sener and Koltun, 2018), the two-task
benchmark of the multi-objective MTL literature, from any MNIST-shaped
arrays (e.g. `keras.datasets.mnist.load_data()` or a local `.npz`).
NumPy only.
"""

import numpy as np

from keras_moe.utils import validation as check


def _resize_matrix(source, target):
    """`(target, source)` bilinear interpolation weights (pixel centres,
    edges clamped), as image resizers with `align_corners=False` use."""
    matrix = np.zeros((target, source), "float64")
    positions = (np.arange(target) + 0.5) * (source / target) - 0.5
    positions = np.clip(positions, 0.0, source - 1.0)
    low = np.floor(positions).astype(int)
    high = np.minimum(low + 1, source - 1)
    frac = positions - low
    matrix[np.arange(target), low] += 1.0 - frac
    matrix[np.arange(target), high] += frac
    return matrix


def multi_mnist(
    images,
    labels,
    num_examples=None,
    seed=0,
    canvas_size=36,
    max_shift=4,
    output_size=28,
):
    """MultiMNIST: two digits on one canvas, one task per digit.

    Every example puts two different images of `images` on a black
    `canvas_size x canvas_size` canvas: the *left* digit with its top-left
    corner at `(dy, dx)` and the *right* one with its bottom-right corner
    at `(canvas_size - dy', canvas_size - dx')`, all four offsets drawn
    uniformly from `0..max_shift`; where the digits overlap, the brighter
    pixel wins (pixel-wise maximum). The canvas is then resized
    (bilinear) to `output_size x output_size`. With the defaults (28x28
    digits, a 36x36 canvas, shifts up to 4 pixels, back to 28x28) the two
    digits overlap on a large part of the image, as in Sener and Koltun's
    construction. The tasks are the classes of the left and of the right
    digit.

    The left digits are the input images in a random order (all of them
    once, when `num_examples` is the number of images; sampled with
    replacement beyond), each paired with another image drawn at random.
    The result depends only on the arrays and `seed`.

    Args:
        images: `(N, H, W)` or `(N, H, W, 1)` digit images (uint8 0-255 or
            floats in [0, 1]), `H, W <= canvas_size`.
        labels: `(N,)` integer classes.
        num_examples: how many examples to build (default `N`).
        seed: seed of the pairing and the offsets.
        canvas_size: side of the canvas the digits are placed on.
        max_shift: largest offset of a digit from its corner, in pixels.
        output_size: side of the returned images (`None`: `canvas_size`).

    Returns:
        `(x, y_left, y_right)`: `x` float32 `(num_examples, output_size,
        output_size, 1)` in [0, 1]; the labels int32 `(num_examples,)`.

    Example:

    >>> import numpy as np
    >>> digits = np.zeros((4, 28, 28), "uint8")
    >>> digits[:, 10:18, 10:18] = 255
    >>> x, left, right = multi_mnist(digits, np.arange(4), seed=0)
    >>> x.shape, x.dtype.name, bool(np.all(left != right))
    ((4, 28, 28, 1), 'float32', True)

    References:
        Sener, Koltun. Multi-Task Learning as Multi-Objective Optimization.
        NeurIPS 2018. Sabour, Frosst, Hinton. Dynamic Routing Between
        Capsules. NeurIPS 2017 (the overlaid-digit construction).
    """
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim != 3:
        raise ValueError(
            "images must have shape (N, H, W) or (N, H, W, 1). Received: "
            f"images.shape={images.shape}"
        )
    count, height, width = images.shape
    if labels.shape != (count,):
        raise ValueError(
            "labels must have one class per image. Received: "
            f"labels.shape={labels.shape}, images.shape={images.shape}"
        )
    if count < 2:
        raise ValueError(f"multi_mnist needs at least 2 images. Received: {count}")
    num_examples = count if num_examples is None else check.positive_int(
        "num_examples", num_examples
    )
    canvas_size = check.positive_int("canvas_size", canvas_size)
    max_shift = check.non_negative_int("max_shift", max_shift)
    if max(height, width) + max_shift > canvas_size:
        raise ValueError(
            "The digits and their shifts must fit on the canvas: "
            "max(H, W) + max_shift <= canvas_size. Received: "
            f"images of {height}x{width}, max_shift={max_shift}, "
            f"canvas_size={canvas_size}"
        )
    output_size = canvas_size if output_size is None else check.positive_int(
        "output_size", output_size
    )
    pixels = images.astype("float32")
    if np.issubdtype(images.dtype, np.integer):
        pixels /= 255.0
    rng = np.random.default_rng(seed)
    left = rng.permutation(count)
    if num_examples > count:
        left = np.concatenate([left, rng.integers(0, count, num_examples - count)])
    left = left[:num_examples]
    # A partner different from the left digit: a shift by 1..N-1.
    right = (left + rng.integers(1, count, num_examples)) % count
    shifts = rng.integers(0, max_shift + 1, size=(num_examples, 4))
    canvas = np.zeros((num_examples, canvas_size, canvas_size), "float32")
    for n in range(num_examples):
        dy, dx, ey, ex = shifts[n]
        canvas[n, dy : dy + height, dx : dx + width] = pixels[left[n]]
        top, side = canvas_size - height - ey, canvas_size - width - ex
        window = canvas[n, top : top + height, side : side + width]
        np.maximum(window, pixels[right[n]], out=window)
    if output_size != canvas_size:
        resize = _resize_matrix(canvas_size, output_size)
        canvas = np.einsum("oi,nij,pj->nop", resize, canvas, resize)
    x = np.clip(canvas, 0.0, 1.0).astype("float32")[..., None]
    return x, labels[left].astype("int32"), labels[right].astype("int32")


__all__ = ["multi_mnist"]
