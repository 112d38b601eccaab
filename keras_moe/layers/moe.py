"""Old module of `SparseMoE`, now `keras_moe.layers.sparse_moe` (issue 20:
files named by what they hold). Kept so that `from keras_moe.layers.moe
import SparseMoE` keeps working; import it from `keras_moe.layers`."""

from keras_moe.layers.sparse_moe import SparseMoE  # noqa: F401
