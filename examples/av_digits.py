"""
Title: Multimodal experts: audio-visual digits with one pool of sparse experts
Author: keras_moe contributors
Date created: 2026/12/05
Last modified: 2026/12/05
Description: Image patch tokens (MNIST) and audio frame tokens (spoken digits,
`keras.layers.MelSpectrogram`) share the experts of `SparseMoE` blocks, with
per-modality routing statistics and balancing (LIMoE); a digit head and a
speaker head; a clean and a hard (degraded) setting; missing-modality
inference; a two-input SavedModel.
Accelerator: None (CPU: 1-2 minutes per model, about 5 for all four)

Run it (any backend; the data files are in `../shared/data` relative to the
project root):

    python examples/av_digits.py --setting clean
    python examples/av_digits.py --setting hard --seed 1
    python examples/av_digits.py --setting hard --models moe_fusion --group-balance-weight 0.01
    KERAS_BACKEND=jax python examples/av_digits.py --models moe_fusion,dense_fusion

## The task

The AV-MNIST setup (Vielzeuf et al. 2018): every MNIST image is paired with a
recording of the same digit spoken by one of 6 speakers (Free Spoken Digit
Dataset). The model predicts the **digit** (both modalities know it) and the
**speaker** (only the audio knows it). Training pairs are drawn afresh every
epoch; test pairs once, with a fixed seed. The audio is split by the
recording's index (recordings 5-9 of every digit and speaker are the test
part, 10-49 train), never by random rows, so no test recording is heard in
training.

Clean data is easy: either modality alone gets about 0.99. The `hard`
setting degrades both so that neither is enough alone (the AV-MNIST protocol
of the literature): each image is projected onto the principal components
that hold 25% of the training images' variance, and each recording is mixed
with white noise at a low signal-to-noise ratio. The parameters are the
constants `HARD_IMAGE_ENERGY` and `HARD_AUDIO_SNR_DB` below
(docs/multimodal.md has the single-modality accuracies they give).

## The models

```
image (28x28) -> small CNN -> 4x4 = 16 patch tokens  --+
                                                      +--> + position, + modality embedding
audio (8000)  -> MelSpectrogram -> Conv1D x2 -> 16 frame tokens (padding masked) --+
    -> 2 x [attention over the joint 32 tokens ; SparseMoE over every token]
    -> masked mean of the image tokens ; masked mean of the audio tokens
    -> digit head (10, both means)     speaker head (6, the audio mean)
```

Four models with the same active compute per token:

- `moe_fusion`: the above; each `SparseMoE` has 8 experts of hidden width
  128 and sends each token to one of them (top-1, as Switch and LIMoE do);
  the router sees every token of both modalities (`groups=` gives each
  token its modality, for the modality x expert statistics) and the
  global Switch loss balances the experts. `--group-balance-weight` adds a
  per-modality Switch loss that balances each modality on its own; it is
  off by default: here, where neither modality crowds the other out, it
  cost accuracy (docs/multimodal.md measures it on and off).
- `dense_fusion`: the same with one dense feed-forward layer of width 128
  in place of each `SparseMoE`: exactly the compute of the one active
  expert (`--k`, `--expert-hidden` and `--shared-experts` change both
  models alike: the dense width is `(k + shared) * expert_hidden`).
- `image_only`, `audio_only`: the dense model on one modality's tokens.
"""

import argparse
import importlib.util
import logging
import os
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, "..", "shared", "data")
IMAGES = os.path.join(SHARED, "mnist_small.npz")
AUDIO = os.path.join(SHARED, "fsdd_spoken_digits.npz")

MODELS = ("image_only", "audio_only", "dense_fusion", "moe_fusion")
MODALITIES = ("image", "audio")  # group id = index here
SAMPLES = 8000  # 1 s at 8 kHz
SAMPLE_RATE = 8000
IMAGE_TOKENS = 16  # 4 x 4 patches
AUDIO_TOKENS = 16  # 63 mel frames, two stride-2 convolutions
SAMPLES_PER_AUDIO_TOKEN = 512  # 4 mel frames of 128 samples
TEST_RECORDINGS = range(5, 10)  # recording_index of the test part
NUM_SPEAKERS = 6

# The hard setting (chosen so that each modality alone scores about
# 0.6-0.85 on the digit; measured values in docs/multimodal.md).
HARD_IMAGE_ENERGY = 0.25  # share of the training images' variance kept
HARD_AUDIO_SNR_DB = -6.0  # white noise over each recording's valid samples
TEST_SEED = 12345  # test pairs and test noise: drawn once

# Training: batch size, peak learning rate (AdamW, cosine decay), and the
# share of fusion training pairs that lose their image (and another share
# their audio) so that the fusion models also learn from one modality.
BATCH_SIZE = 128
LEARNING_RATE = 3e-3
MODALITY_DROPOUT = 0.1


def model_list(text):
    names = MODELS if text == "all" else tuple(n.strip() for n in text.split(",") if n)
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown models {unknown}; choose from {MODELS}")
    return names


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--setting", choices=("clean", "hard"), default="clean")
    parser.add_argument("--images", default=IMAGES,
                        help="an .npz with x_train/y_train/x_test/y_test (default: "
                             "../shared/data/mnist_small.npz)")
    parser.add_argument("--audio", default=AUDIO,
                        help="an .npz with audio/length/digit/speaker/recording_index "
                             "(default: ../shared/data/fsdd_spoken_digits.npz)")
    parser.add_argument("--test-images", default=None,
                        help="a separate test .npz with x_test/y_test")
    parser.add_argument("--test-audio", default=None,
                        help="a separate test .npz with audio/length/digit/speaker "
                             "(then all of --audio is training audio)")
    parser.add_argument("--models", type=model_list, default=MODELS,
                        help="comma-separated, or 'all' (default)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--group-balance-weight", type=float, default=0.0,
                        help="weight of the per-modality Switch loss (0: off)")
    parser.add_argument("--experts", type=int, default=8,
                        help="routed experts per SparseMoE")
    parser.add_argument("--k", type=int, default=1, help="experts per token")
    parser.add_argument("--expert-hidden", type=int, default=128,
                        help="hidden width of each expert")
    parser.add_argument("--shared-experts", type=int, default=0,
                        help="experts every token uses (DeepSeekMoE-style)")
    parser.add_argument("--local-entropy-weight", type=float, default=0.0,
                        help="LIMoE's per-token entropy loss")
    parser.add_argument("--global-entropy-weight", type=float, default=0.0,
                        help="LIMoE's per-modality global entropy loss")
    parser.add_argument("--train-size", type=int, default=None,
                        help="use the first N training images (smoke tests)")
    parser.add_argument("--test-size", type=int, default=None,
                        help="use the first N test images (smoke tests)")
    parser.add_argument("--output-dir", default="runs/av_digits",
                        help="routing plots and the SavedModel go here")
    return parser.parse_args(argv)


# The arguments are read before Keras is imported, so that `--help` and a
# mistyped flag answer at once instead of after the backend has loaded.
if __name__ == "__main__":
    ARGS = parse_args()

# TensorFlow's C++ log lines (oneDNN notices, CPU features) say nothing about
# this example: hide them unless you chose a log level. They are written
# while TensorFlow's libraries load, so stderr is pointed at /dev/null
# meanwhile (an import error is still printed: stderr is back by then).
# Keras loads TensorFlow, when it is installed, on the first `model.save`
# under every backend: under JAX and PyTorch it is loaded here, quietly.
if "TF_CPP_MIN_LOG_LEVEL" not in os.environ:
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    _stderr, _devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(_devnull, 2)
    try:
        import keras

        if importlib.util.find_spec("tensorflow") is not None:
            import tensorflow  # noqa: F401
    finally:
        os.dup2(_stderr, 2)
        os.close(_stderr)
        os.close(_devnull)

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import layers, ops  # noqa: E402

from keras_moe.layers import SparseMoE  # noqa: E402

"""
## Data: images, recordings, and how they are split

`mnist_small.npz` has 10,000 training and 2,000 test images;
`fsdd_spoken_digits.npz` has 2,700 recordings (int16, zero-padded to one
second, with their valid `length`). `--test-images` / `--test-audio` point
at separate test files instead (then all of `--audio` is training audio).
"""


def require(path, flag):
    if not os.path.exists(path):
        raise SystemExit(
            f"{flag} {path}: no such file. The default data files are "
            "../shared/data/mnist_small.npz and "
            "../shared/data/fsdd_spoken_digits.npz relative to the project root."
        )


def load_images(path, test_path=None):
    """`(x_train, y_train), (x_test, y_test)`: uint8 (n, 28, 28), int digits."""
    require(path, "--images")
    with np.load(path) as data:
        train = (data["x_train"], data["y_train"].astype("int32"))
        test = (data["x_test"], data["y_test"].astype("int32"))
    if test_path:
        require(test_path, "--test-images")
        with np.load(test_path) as data:
            test = (data["x_test"], data["y_test"].astype("int32"))
    return train, test


def _audio_part(data, rows=None):
    rows = slice(None) if rows is None else rows
    return {
        "audio": data["audio"][rows],
        "length": data["length"][rows].astype("int32"),
        "digit": data["digit"][rows].astype("int32"),
        "speaker": data["speaker"][rows].astype("int32"),
    }


def load_audio(path, test_path=None):
    """`(train, test)` dicts of `audio` int16 (n, 8000), `length`, `digit`,
    `speaker`. Without `test_path`, split by `recording_index`."""
    require(path, "--audio")
    with np.load(path) as data:
        data = {key: data[key] for key in data.files}
    if test_path:
        require(test_path, "--test-audio")
        with np.load(test_path) as test:
            test = {key: test[key] for key in test.files}
        return _audio_part(data), _audio_part(test)
    is_test = np.isin(data["recording_index"], list(TEST_RECORDINGS))
    return _audio_part(data, ~is_test), _audio_part(data, is_test)


"""
## The hard setting

Images: the training images' principal components, sorted by variance; each
image keeps the mean plus its projection on the fewest leading components
that hold `HARD_IMAGE_ENERGY` of the variance (with MNIST, 4 components). The
basis comes from the training images only.

Audio: white Gaussian noise over each recording's valid samples (the
padding stays silent, so the padding mask still holds), scaled to
`HARD_AUDIO_SNR_DB` against that recording's own power. Training noise is
drawn afresh for every pair; test noise once, with `TEST_SEED`.
"""


def pca_projector(x_train, energy):
    """`(mean, basis, kept)`: the leading components holding `energy` of the
    variance of the flattened images (`basis` `(784, c)`)."""
    x = x_train.reshape(len(x_train), -1).astype("float64") / 255.0
    mean = x.mean(axis=0)
    centred = x - mean
    values, vectors = np.linalg.eigh(centred.T @ centred / len(x))
    order = np.argsort(values)[::-1]
    values, vectors = values[order], vectors[:, order]
    share = np.cumsum(values) / values.sum()
    count = int(np.searchsorted(share, energy) + 1)
    return mean, vectors[:, :count], float(share[count - 1])


def project_images(images, mean, basis):
    x = images.reshape(len(images), -1).astype("float64") / 255.0
    kept = mean + ((x - mean) @ basis) @ basis.T
    return np.clip(255.0 * kept, 0, 255).astype("float32").reshape(images.shape)


def add_noise(audio, lengths, snr_db, rng):
    """`audio` float (n, S) plus white noise on its first `lengths` samples
    at `snr_db` against each row's power there."""
    valid = np.arange(audio.shape[1])[None, :] < lengths[:, None]
    power = np.sum(np.square(audio) * valid, axis=1) / np.maximum(lengths, 1)
    scale = np.sqrt(power / 10.0 ** (snr_db / 10.0)).astype("float32")
    noise = rng.standard_normal(audio.shape, dtype="float32")
    return audio + noise * scale[:, None] * valid


"""
## Pairs: every image gets a recording of its digit

The training set is a `keras.utils.PyDataset` that pairs every image with a
random recording of the same digit, afresh every epoch (batch `i` of epoch
`t` uses a generator seeded by `(seed, t, i)`: reproducible). With
`modality_dropout=p`, a share `p` of the training pairs lose their image and
another share `p` their audio (all zeros; the speaker loss of a pair
without audio is weighted 0): that is how the fusion models learn to
predict from one modality, and what makes missing-modality inference work
without retraining.
"""


def pair_recordings(digits, audio_digits, rng):
    """For every digit in `digits`, the row of a random recording of it."""
    rows = np.empty(len(digits), "int64")
    for digit in range(10):
        wanted = np.flatnonzero(digits == digit)
        pool = np.flatnonzero(audio_digits == digit)
        if len(wanted) and not len(pool):
            raise ValueError(f"No recording of the digit {digit} to pair with")
        rows[wanted] = rng.choice(pool, size=len(wanted))
    return rows


class PairedDigits(keras.utils.PyDataset):
    """`({"image": ..., "audio": ...}, {"digit": ..., "speaker": ...})`
    batches of freshly paired training examples (only the `inputs` the
    model takes)."""

    def __init__(self, images, digits, audio, batch_size, seed, inputs=MODALITIES,
                 snr_db=None, modality_dropout=0.0, **kwargs):
        super().__init__(**kwargs)
        self.images, self.digits, self.audio = images, digits, audio
        self.waves = audio["audio"].astype("float32") / 32768.0
        self.batch_size, self.seed, self.inputs = batch_size, seed, tuple(inputs)
        self.snr_db, self.modality_dropout = snr_db, modality_dropout
        self.epoch = 0
        self._draw()

    def _draw(self):
        rng = np.random.default_rng((self.seed, self.epoch))
        self.order = rng.permutation(len(self.images))
        self.pairs = pair_recordings(self.digits, self.audio["digit"], rng)

    def on_epoch_end(self):
        self.epoch += 1
        self._draw()

    def __len__(self):  # whole batches only: one shape to compile
        return max(1, len(self.images) // self.batch_size)

    def __getitem__(self, index):
        rows = self.order[index * self.batch_size:(index + 1) * self.batch_size]
        rng = np.random.default_rng((self.seed, self.epoch, index))
        recordings = self.pairs[rows]
        image = self.images[rows].astype("float32")
        audio = self.waves[recordings]
        if self.snr_db is not None:
            audio = add_noise(audio, self.audio["length"][recordings], self.snr_db, rng)
        if self.modality_dropout:
            u = rng.random(len(rows))
            image[u < self.modality_dropout] = 0.0
            audio[(u >= self.modality_dropout) & (u < 2 * self.modality_dropout)] = 0.0
        x = {"image": image, "audio": audio}
        y = {"digit": self.digits[rows],
             "speaker": self.audio["speaker"][recordings]}
        if not self.modality_dropout:
            return {name: x[name] for name in self.inputs}, y
        # Without its audio a pair says nothing about the speaker: no loss.
        heard = np.any(audio != 0, axis=1).astype("float32")
        weights = {"digit": np.ones(len(rows), "float32"), "speaker": heard}
        return {name: x[name] for name in self.inputs}, y, weights


def make_test_pairs(images, digits, audio, snr_db=None):
    """The test pairs, drawn once with `TEST_SEED`: `(x dict, y dict)`."""
    rng = np.random.default_rng(TEST_SEED)
    recordings = pair_recordings(digits, audio["digit"], rng)
    waves = audio["audio"][recordings].astype("float32") / 32768.0
    if snr_db is not None:
        waves = add_noise(waves, audio["length"][recordings], snr_db, rng)
    x = {"image": images.astype("float32"), "audio": waves}
    y = {"digit": digits, "speaker": audio["speaker"][recordings]}
    return x, y


"""
## Tokens of two modalities, and their masks

A missing modality is all zeros: `ModalityMask` marks an image's 16 tokens
valid when the image has a non-zero pixel, and a recording's frame tokens
valid up to its last non-zero sample (the zero padding, and a missing
recording, are masked). The masks reach the attention, the `SparseMoE`
(masked tokens take no expert, no capacity, and count in no loss or
statistic) and the pooling. So the model needs nothing but the two inputs,
and serves with one missing.
"""


@keras.saving.register_keras_serializable(package="keras_moe_examples")
class ModalityMask(layers.Layer):
    """`(B, tokens)` bool: which tokens of a modality hold data.

    `samples_per_token=None` (images): all tokens of an example are valid
    iff the example has a non-zero value. An integer (audio): token `t` is
    valid iff `t * samples_per_token` is before the last non-zero sample.
    """

    def __init__(self, tokens, samples_per_token=None, **kwargs):
        super().__init__(**kwargs)
        self.tokens = tokens
        self.samples_per_token = samples_per_token

    def call(self, inputs):
        x = ops.reshape(inputs, (ops.shape(inputs)[0], -1))
        nonzero = ops.not_equal(x, 0)
        if self.samples_per_token is None:
            present = ops.any(nonzero, axis=-1, keepdims=True)
            return ops.broadcast_to(present, (ops.shape(x)[0], self.tokens))
        position = ops.arange(1, ops.shape(x)[1] + 1, dtype="int32")[None, :]
        length = ops.max(ops.where(nonzero, position, 0), axis=-1, keepdims=True)
        start = ops.arange(self.tokens, dtype="int32")[None, :] * self.samples_per_token
        return ops.less(start, length)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.tokens)

    def compute_output_spec(self, inputs):
        return keras.KerasTensor((inputs.shape[0], self.tokens), dtype="bool")

    def get_config(self):
        return {**super().get_config(), "tokens": self.tokens,
                "samples_per_token": self.samples_per_token}


@keras.saving.register_keras_serializable(package="keras_moe_examples")
class LogMel(layers.Layer):
    """`(B, samples)` waveform -> `(B, frames, mel bins)` log mel energies.

    `keras.layers.MelSpectrogram` with its own dB scale off: that scale clips
    at the batch's maximum minus `top_db`, so an example's features would
    depend on the rest of its batch. `log(mel + 1e-6)` does not.
    """

    def __init__(self, num_mel_bins=40, fft_length=256, sequence_stride=128,
                 sampling_rate=SAMPLE_RATE, **kwargs):
        super().__init__(**kwargs)
        self.num_mel_bins, self.fft_length = num_mel_bins, fft_length
        self.sequence_stride, self.sampling_rate = sequence_stride, sampling_rate
        self.mel = layers.MelSpectrogram(
            fft_length=fft_length, sequence_stride=sequence_stride,
            sampling_rate=sampling_rate, num_mel_bins=num_mel_bins,
            min_freq=20.0, max_freq=sampling_rate / 2, power_to_db=False,
        )

    def call(self, inputs):
        mel = self.mel(inputs)  # (B, mel bins, frames)
        return ops.transpose(ops.log(mel + 1e-6), (0, 2, 1))

    def compute_output_shape(self, input_shape):
        frames = input_shape[1] // self.sequence_stride + 1
        return (input_shape[0], frames, self.num_mel_bins)

    def get_config(self):
        return {**super().get_config(), "num_mel_bins": self.num_mel_bins,
                "fft_length": self.fft_length,
                "sequence_stride": self.sequence_stride,
                "sampling_rate": self.sampling_rate}


@keras.saving.register_keras_serializable(package="keras_moe_examples")
class JointTokens(layers.Layer):
    """Concatenates the modalities' token sequences, adds a learned position
    embedding per modality and a learned modality embedding, and returns
    `(tokens (B, T, d), mask (B, T), groups (B, T) int32)`; `groups` is each
    token's modality id (its index in `MODALITIES`), for `SparseMoE`."""

    def __init__(self, modalities, **kwargs):
        super().__init__(**kwargs)
        self.modalities = list(modalities)

    def build(self, tokens_shape, masks_shape=None):
        dim = tokens_shape[0][-1]
        init = keras.initializers.RandomNormal(stddev=0.02)
        self.positions = [
            self.add_weight(name=f"{m}_position", shape=(s[1], dim), initializer=init)
            for m, s in zip(self.modalities, tokens_shape)
        ]
        self.modality_embedding = self.add_weight(
            name="modality_embedding", shape=(len(self.modalities), dim),
            initializer=init)
        self.ids = [MODALITIES.index(m) for m, s in zip(self.modalities, tokens_shape)
                    for _ in range(s[1])]

    def call(self, tokens, masks):
        parts = [
            t + ops.expand_dims(ops.convert_to_tensor(p), 0)
            + ops.reshape(self.modality_embedding[i], (1, 1, -1))
            for i, (t, p) in enumerate(zip(tokens, self.positions))
        ]
        x = ops.concatenate(parts, axis=1)
        mask = ops.concatenate([ops.cast(m, "bool") for m in masks], axis=1)
        ids = ops.convert_to_tensor(np.array(self.ids, "int32")[None])
        groups = ops.broadcast_to(ids, ops.shape(mask))
        return x, mask, groups

    def compute_output_spec(self, tokens, masks):
        batch, dim = tokens[0].shape[0], tokens[0].shape[-1]
        length = sum(t.shape[1] for t in tokens)
        return (keras.KerasTensor((batch, length, dim), dtype=self.compute_dtype),
                keras.KerasTensor((batch, length), dtype="bool"),
                keras.KerasTensor((batch, length), dtype="int32"))

    def get_config(self):
        return {**super().get_config(), "modalities": self.modalities}


@keras.saving.register_keras_serializable(package="keras_moe_examples")
class MaskedMean(layers.Layer):
    """The mean of the valid tokens `start:stop` of `(B, T, d)`; zeros when
    none is valid (a missing modality), never NaN."""

    def __init__(self, start, stop, **kwargs):
        super().__init__(**kwargs)
        self.start, self.stop = start, stop

    def call(self, inputs, mask=None):
        x = inputs[:, self.start:self.stop]
        valid = ops.cast(mask[:, self.start:self.stop], x.dtype)[..., None]
        total = ops.sum(ops.where(valid > 0, x, 0.0), axis=1)
        return total / ops.maximum(ops.sum(valid, axis=1), 1.0)

    def compute_mask(self, inputs, mask=None):
        return None

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])

    def get_config(self):
        return {**super().get_config(), "start": self.start, "stop": self.stop}


"""
## The model

Each modality's encoder makes 16 tokens of width `dim`; the joint sequence
goes through `blocks` pre-norm blocks of attention (over both modalities:
that is where they meet) and a token-wise feed-forward layer, which is a
`SparseMoE` in `moe_fusion`. Its router sees image and audio tokens alike;
`groups=` tells the layer which is which, for the modality x expert table
(`routing_stats()["group_expert_load"]`, plotted by `RoutingMonitor`) and
the optional per-modality Switch loss (`group_balance_weight`). The
digit head reads the masked mean of each modality's tokens; the speaker
head reads the audio tokens' mean only (the image knows no speaker; through
the attention, the audio tokens have still seen the image).
"""


def conv_bn(x, filters, kernel, strides, conv=layers.Conv2D):
    # BatchNorm momentum 0.9, not Keras' 0.99: a run has a few hundred steps,
    # and at 0.99 the moving variance still holds 0.99**312 = 4% of its
    # initial 1 after 4 epochs, against a true variance of about 0.001 for
    # the first image convolution: inference then sees activations 6x too
    # small and predicts one class (measured: 0.10 test accuracy against
    # 0.65 in training mode).
    x = conv(filters, kernel, strides=strides, padding="same", use_bias=False)(x)
    return layers.ReLU()(layers.BatchNormalization(momentum=0.9)(x))


def image_tokens(image, dim):
    x = layers.Rescaling(1 / 255.0)(image)
    x = layers.Reshape((28, 28, 1))(x)
    x = conv_bn(x, 32, 3, 2)   # 14 x 14
    x = conv_bn(x, 64, 3, 2)   # 7 x 7
    x = conv_bn(x, dim, 3, 2)  # 4 x 4
    return layers.Reshape((IMAGE_TOKENS, dim), name="image_tokens")(x)


def audio_tokens(audio, dim):
    x = LogMel(name="log_mel")(audio)             # (B, 63, 40)
    x = conv_bn(x, 64, 5, 2, conv=layers.Conv1D)  # 32 frames
    x = conv_bn(x, dim, 3, 2, conv=layers.Conv1D)  # 16 frames
    return layers.Identity(name="audio_tokens")(x)


def build_model(name, dim=64, blocks=2, heads=4, experts=8, k=1, expert_hidden=128,
                group_balance_weight=0.0, local_entropy_weight=0.0,
                global_entropy_weight=0.0, shared_experts=0, seed=0):
    """One of `MODELS`. Every feed-forward layer costs
    `(k + shared_experts) * expert_hidden` hidden units per token: the `k`
    routed and the shared experts of `moe_fusion`, or one dense layer."""
    modalities = {"image_only": ("image",), "audio_only": ("audio",)}.get(
        name, MODALITIES)
    inputs, tokens, masks = {}, [], []
    if "image" in modalities:
        inputs["image"] = keras.Input((28, 28), name="image")
        tokens.append(image_tokens(inputs["image"], dim))
        masks.append(ModalityMask(IMAGE_TOKENS, name="image_mask")(inputs["image"]))
    if "audio" in modalities:
        inputs["audio"] = keras.Input((SAMPLES,), name="audio")
        tokens.append(audio_tokens(inputs["audio"], dim))
        masks.append(ModalityMask(AUDIO_TOKENS, SAMPLES_PER_AUDIO_TOKEN,
                                  name="audio_mask")(inputs["audio"]))
    x, mask, groups = JointTokens(modalities, name="joint")(tokens, masks)
    for b in range(1, blocks + 1):
        h = layers.LayerNormalization(name=f"block{b}_attention_norm")(x)
        h = layers.MultiHeadAttention(heads, dim // heads, name=f"block{b}_attention")(
            h, h, query_mask=mask, value_mask=mask)
        x = layers.Add()([x, h])
        h = layers.LayerNormalization(name=f"block{b}_ffn_norm")(x)
        if name == "moe_fusion":
            h = SparseMoE(
                num_experts=experts, hidden_dim=expert_hidden, k=k,
                # Dropless in training and inference: nothing is dropped when
                # one modality crowds an expert, and a prediction never
                # depends on the rest of the batch.
                capacity_factor=None, eval_capacity_factor=None,
                num_groups=len(MODALITIES), group_names=list(MODALITIES),
                group_balance_weight=group_balance_weight,
                local_entropy_weight=local_entropy_weight,
                global_entropy_weight=global_entropy_weight,
                num_shared_experts=shared_experts, seed=seed + b,
                name=f"block{b}_moe",
            )(h, mask=mask, groups=groups)
        else:
            h = layers.Dense((k + shared_experts) * expert_hidden, activation="gelu",
                             name=f"block{b}_ffn_in")(h)
            h = layers.Dense(dim, name=f"block{b}_ffn_out")(h)
        x = layers.Add()([x, h])
    x = layers.LayerNormalization(name="final_norm")(x)
    pooled, start = [], 0
    for modality, count in zip(modalities, [t.shape[1] for t in tokens]):
        pooled.append(MaskedMean(start, start + count, name=f"{modality}_pool")(
            x, mask=mask))
        start += count
    features = pooled[0] if len(pooled) == 1 else layers.Concatenate()(pooled)
    voice = pooled[modalities.index("audio")] if "audio" in modalities else features
    outputs = {
        "digit": layers.Dense(10, activation="softmax", name="digit")(
            layers.Dropout(0.1)(features)),
        "speaker": layers.Dense(NUM_SPEAKERS, activation="softmax", name="speaker")(
            layers.Dropout(0.1)(voice)),
    }
    return keras.Model(inputs, outputs, name=name)


"""
## Training and evaluation

AdamW with a short warm-up and a cosine decay; the two tasks' losses are
summed. The fusion models train with `modality_dropout` (default 0.1 per
modality). Accuracy is measured on the test pairs with both modalities,
and, for the fusion models, with one of them missing (zeros).
"""


def compile_model(model, steps, learning_rate):
    warmup = min(100, steps // 5)
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, max(1, steps - warmup), warmup_target=learning_rate,
        warmup_steps=warmup)
    model.compile(
        optimizer=keras.optimizers.AdamW(schedule, weight_decay=1e-4),
        loss={"digit": "sparse_categorical_crossentropy",
              "speaker": "sparse_categorical_crossentropy"},
        metrics={"digit": ["accuracy"], "speaker": ["accuracy"]},
    )


class EpochLine(keras.callbacks.Callback):
    """One short line per epoch instead of Keras' line of every metric."""

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.time()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        print(f"  epoch {epoch + 1:>2}/{self.params['epochs']} "
              f"{time.time() - self.started:4.0f} s | loss {logs.get('loss', float('nan')):.3f}"
              f" | digit accuracy {logs.get('digit_accuracy', float('nan')):.3f}"
              f" | speaker accuracy {logs.get('speaker_accuracy', float('nan')):.3f}",
              flush=True)


def accuracies(model, x, y, batch_size):
    inputs = {name: x[name] for name in model.input}
    predictions = model.predict(inputs, batch_size=batch_size, verbose=0)
    return {task: float(np.mean(np.argmax(predictions[task], -1) == y[task]))
            for task in ("digit", "speaker")}


def modality_expert_tables(model, x, batch_size):
    """Per MoE block, the `(modalities, experts)` share of each modality's
    test-token assignments that goes to each expert."""
    tables = {}
    for layer in model.layers:
        if not isinstance(layer, SparseMoE):
            continue
        block = layer.name.split("_")[0]
        probe = keras.Model(model.input, [model.get_layer(f"{block}_ffn_norm").output,
                                          *model.get_layer("joint").output[1:]])
        h, mask, groups = probe.predict(x, batch_size=batch_size, verbose=0)
        _, routing = layer(h, mask=mask, groups=groups, return_routing=True)
        tables[layer.name] = keras.ops.convert_to_numpy(routing["group_expert_load"])
    return tables


def print_table(name, table):
    lines = [f"{name}: share of each modality's test-token assignments per expert (%)",
             "modality " + " ".join(f"{e:>4d}" for e in range(table.shape[1]))]
    for modality, row in zip(MODALITIES, table):
        lines.append(f"{modality:<8} " + " ".join(f"{100 * v:4.0f}" for v in row))
    print("\n".join(lines))
    return lines


"""
## Export: one SavedModel, two named inputs

`keras_moe.export_saved_model` writes a SavedModel whose `serving_default`
signature takes `image` (float, `(batch, 28, 28)`, 0-255) and `audio`
(float, `(batch, 8000)`, in [-1, 1], zero-padded) and returns `digit` and
`speaker` probabilities, from every backend (on torch through a TensorFlow
subprocess that imports this file for its layers). A missing modality is
sent as zeros, as for the Keras model.
"""


def export_and_check(model, export_dir, x):
    from keras_moe import export_saved_model

    export_saved_model(model, export_dir, modules=[os.path.abspath(__file__)])
    import tensorflow as tf

    artifact = tf.saved_model.load(export_dir)  # keep it: it owns the variables
    serve = artifact.signatures["serving_default"]
    names = sorted(serve.structured_input_signature[1])
    served = serve(image=tf.constant(x["image"]), audio=tf.constant(x["audio"]))
    expected = model.predict(x, verbose=0)
    diff = max(float(np.max(np.abs(np.asarray(served[t]) - expected[t])))
               for t in ("digit", "speaker"))
    print(f"Exported SavedModel to {export_dir}: inputs {names}; serving max "
          f"|difference| = {diff:.2e}")
    assert names == ["audio", "image"], names
    assert diff < 1e-4, diff
    return diff


def main(args):

    keras.utils.set_random_seed(args.seed)
    (x_train, y_train), (x_test, y_test) = load_images(args.images, args.test_images)
    audio_train, audio_test = load_audio(args.audio, args.test_audio)
    x_train, y_train = x_train[: args.train_size], y_train[: args.train_size]
    x_test, y_test = x_test[: args.test_size], y_test[: args.test_size]
    snr = None
    images_train, images_test = x_train.astype("float32"), x_test
    if args.setting == "hard":
        mean, basis, kept = pca_projector(x_train, HARD_IMAGE_ENERGY)
        images_train = project_images(x_train, mean, basis)
        images_test = project_images(x_test, mean, basis)
        snr = HARD_AUDIO_SNR_DB
        print(f"hard setting: images on {basis.shape[1]} principal components "
              f"({kept:.1%} of the variance), audio at {snr:+.0f} dB SNR")
    x_eval, y_eval = make_test_pairs(images_test, y_test, audio_test, snr)
    print(f"Keras {keras.__version__}, backend {keras.backend.backend()}; "
          f"{len(x_train)} training images x {len(audio_train['digit'])} recordings, "
          f"{len(x_test)} test pairs ({len(audio_test['digit'])} recordings)")
    eval_batch = min(200, len(x_test))
    os.makedirs(args.output_dir, exist_ok=True)

    results = []
    for name in args.models:
        model = build_model(name, experts=args.experts, k=args.k,
                            expert_hidden=args.expert_hidden,
                            group_balance_weight=args.group_balance_weight,
                            local_entropy_weight=args.local_entropy_weight,
                            global_entropy_weight=args.global_entropy_weight,
                            shared_experts=args.shared_experts, seed=args.seed)
        fusion = name.endswith("fusion")
        train = PairedDigits(images_train, y_train, audio_train, BATCH_SIZE,
                             args.seed, inputs=list(model.input), snr_db=snr,
                             modality_dropout=MODALITY_DROPOUT if fusion else 0.0)
        compile_model(model, args.epochs * len(train), LEARNING_RATE)
        callbacks = []
        if name == "moe_fusion":
            try:
                from keras_moe.callbacks import RoutingMonitor

                callbacks.append(RoutingMonitor(
                    plot_dir=os.path.join(args.output_dir, "plots"), log_scalars=False))
            except ImportError:
                print("No routing plots: matplotlib is not installed.")
        print(f"\n{name}: {model.count_params():,} parameters, "
              f"{args.epochs} epochs of {len(train)} steps")
        start = time.time()
        model.fit(train, epochs=args.epochs, verbose=0, callbacks=callbacks + [EpochLine()])
        seconds = time.time() - start
        scores = accuracies(model, x_eval, y_eval, eval_batch)
        line = (f"RESULT model={name} setting={args.setting} "
                f"digit_accuracy={scores['digit']:.4f} "
                f"speaker_accuracy={scores['speaker']:.4f} "
                f"train_seconds={seconds:.0f} backend={keras.backend.backend()} "
                f"seed={args.seed}")
        print(f"{name}: test digit accuracy {scores['digit']:.4f}, speaker accuracy "
              f"{scores['speaker']:.4f}; {seconds:.0f} s of training")
        results.append(line)
        if fusion:
            for missing in MODALITIES:
                x = dict(x_eval, **{missing: np.zeros_like(x_eval[missing])})
                alone = accuracies(model, x, y_eval, eval_batch)
                line = (f"ONE_MODALITY model={name} setting={args.setting} "
                        f"zeroed={missing} digit_accuracy={alone['digit']:.4f} "
                        f"speaker_accuracy={alone['speaker']:.4f} seed={args.seed}")
                print(line)
        if name == "moe_fusion":
            lines = []
            os.makedirs(os.path.join(args.output_dir, "plots"), exist_ok=True)
            for layer_name, table in modality_expert_tables(model, x_eval, eval_batch).items():
                lines += print_table(layer_name, table) + [""]
                try:
                    from keras_moe.plotting import plot_expert_heatmap

                    plot_expert_heatmap(
                        table, list(MODALITIES),
                        os.path.join(args.output_dir, "plots", f"{layer_name}_test_modality_expert.png"),
                        title=f"{layer_name}: modality x expert (test, {args.setting})",
                        ylabel="modality")
                except ImportError:
                    pass
            with open(os.path.join(args.output_dir, "modality_expert.txt"), "w") as f:
                f.write("\n".join(lines))
            export_and_check(model, os.path.join(args.output_dir, "saved_model"),
                             {k: v[:64] for k, v in x_eval.items()})
    print("\n" + "\n".join(results))


if __name__ == "__main__":
    main(ARGS)
