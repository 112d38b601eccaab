"""Old path of `keras_moe.utils.validation` (issue 20 moved it there: it
serves losses, metrics, weighting, callbacks and compression, not only
layers). Kept while the router modules still import it from here; new code
imports `keras_moe.utils.validation`."""

from keras_moe.utils.validation import *  # noqa: F401,F403
