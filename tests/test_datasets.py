"""`keras_moe.datasets.multi_mnist`: two digits per canvas, deterministic,
the labels of the digits placed, and on the real MNIST file when present."""

import os

import numpy as np
import pytest

from keras_moe.datasets import multi_mnist

SHARED_MNIST = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data",
    "mnist_small.npz",
)


def digits(count=6, size=28, seed=0):
    """Random images with distinct labels (each label names its image)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (count, size, size)).astype("uint8"), np.arange(count) * 10


def placed(image, top, left, canvas=36):
    out = np.zeros((canvas, canvas), "float32")
    out[top : top + image.shape[0], left : left + image.shape[1]] = image / 255.0
    return out


def test_each_canvas_is_two_digits_at_their_corners_and_deterministic():
    images, labels = digits()
    x, left, right = multi_mnist(images, labels, num_examples=12, seed=3,
                                 output_size=None)
    assert x.shape == (12, 36, 36, 1) and x.dtype == np.float32
    assert left.dtype == np.int32 and np.all(left != right)
    shifts = range(5)
    for canvas, a, b in zip(x[..., 0], left // 10, right // 10):
        # Some offsets in 0..4 from the top-left corner (left digit) and
        # the bottom-right one (right digit) rebuild the canvas exactly.
        found = any(
            np.allclose(
                canvas,
                np.maximum(placed(images[a], dy, dx), placed(images[b], 8 - ey, 8 - ex)),
            )
            for dy in shifts for dx in shifts for ey in shifts for ex in shifts
        )
        assert found
    again = multi_mnist(images, labels, num_examples=12, seed=3, output_size=None)
    np.testing.assert_array_equal(again[0], x)
    other = multi_mnist(images, labels, num_examples=12, seed=4, output_size=None)
    assert not np.array_equal(other[0], x)


def test_resizes_and_uses_every_image_once_by_default():
    images, labels = digits(count=8)
    x, left, right = multi_mnist(images, labels, seed=0)
    assert x.shape == (8, 28, 28, 1)
    assert sorted(left) == sorted(labels)  # each image once as the left digit
    assert 0.0 <= x.min() and x.max() <= 1.0
    # Floats in [0, 1] give the same canvases as uint8 / 255.
    floats = multi_mnist(images.astype("float32") / 255.0, labels, seed=0)
    np.testing.assert_allclose(floats[0], x, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(max_shift=9), "fit on the canvas"),
        (dict(num_examples=0), "num_examples=0"),
        (dict(canvas_size=20), "fit on the canvas"),
    ],
)
def test_argument_errors(kwargs, message):
    images, labels = digits()
    with pytest.raises(ValueError, match=message):
        multi_mnist(images, labels, **kwargs)
    with pytest.raises(ValueError, match="one class per image"):
        multi_mnist(images, labels[:3])


def test_on_the_real_mnist_file():
    if not os.path.exists(SHARED_MNIST):
        pytest.skip(f"the shared MNIST file is not present: {SHARED_MNIST}")
    with np.load(SHARED_MNIST) as data:
        x, left, right = multi_mnist(data["x_test"], data["y_test"], seed=0)
    assert x.shape == (2000, 28, 28, 1)
    assert np.mean(left == right) < 0.2  # random partners: ~10% share a class
    assert np.bincount(left, minlength=10).min() == 200  # every test image once
