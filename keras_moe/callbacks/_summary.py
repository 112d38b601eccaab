"""TensorBoard summaries without a hard TensorFlow dependency."""


import numpy as np



def _require_tensorflow(log_dir):
    try:
        import tensorflow as tf
    except ImportError as error:
        raise ImportError(
            "RoutingMonitor(log_dir=...) writes TensorBoard summaries with "
            "tf.summary and needs TensorFlow (on every Keras backend): "
            "`pip install keras-moe[tensorflow]` (or tensorflow-cpu). "
            f"Received: log_dir={log_dir!r} ({error})"
        ) from error
    return tf


class _SummaryWriter:
    """TensorBoard event files written with TensorFlow alone.

    `tf.summary.scalar` and `tf.summary.image` need the `tensorboard`
    package; `tf.summary.write` (TensorFlow core) does not. The summaries
    carry the metadata of TensorBoard's scalar and image plugins, so
    TensorBoard shows them as its own scalars and images.
    """

    def __init__(self, log_dir):
        self.tf = _require_tensorflow(log_dir)
        with self.tf.device("/cpu:0"):
            self.writer = self.tf.summary.create_file_writer(log_dir)

    def _metadata(self, plugin, data_class):
        from tensorflow.core.framework import summary_pb2

        metadata = summary_pb2.SummaryMetadata(data_class=data_class)
        metadata.plugin_data.plugin_name = plugin
        return metadata

    def scalars(self, values, step):
        """Writes `{tag: float}` at `step`."""
        from tensorflow.core.framework import summary_pb2

        tf = self.tf
        metadata = self._metadata("scalars", summary_pb2.DATA_CLASS_SCALAR)
        with tf.device("/cpu:0"), self.writer.as_default(step=step):
            for tag, value in values.items():
                tf.summary.write(tag, tf.constant(float(value), "float32"),
                                 metadata=metadata)
        self.writer.flush()

    def image(self, tag, png, step):
        """Writes one PNG image (bytes) at `step`."""
        from tensorflow.core.framework import summary_pb2

        tf = self.tf
        width = int.from_bytes(png[16:20], "big")  # the PNG's IHDR chunk
        height = int.from_bytes(png[20:24], "big")
        tensor = tf.constant([str(width).encode(), str(height).encode(), png])
        metadata = self._metadata("images", summary_pb2.DATA_CLASS_BLOB_SEQUENCE)
        with tf.device("/cpu:0"), self.writer.as_default(step=step):
            tf.summary.write(tag, tensor, metadata=metadata)
        self.writer.flush()

    def matrix_png(self, matrix, cell=16):
        """A grey PNG of a matrix (one `cell` x `cell` square per entry,
        white = the largest value), for heat maps without matplotlib."""
        matrix = np.asarray(matrix, "float64")
        scaled = matrix / max(float(matrix.max()), 1e-12)
        pixels = (255 * np.kron(scaled, np.ones((cell, cell)))).astype("uint8")
        return self.tf.io.encode_png(pixels[:, :, None]).numpy()

    def close(self):
        self.writer.flush()
        self.writer.close()


def _safe_name(name):
    """`name` with every character but letters, digits, `.`, `_`, `-`
    replaced by `_` (for file names and TensorBoard tags)."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in str(name))
