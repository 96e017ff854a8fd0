"""The random inputs of a training step, drawn on the device inside the compiled step: the timesteps t (NCSN: the
level indices; continuous processes: their float time), the noise, and which class labels are dropped.

A counter-based generator (Salmon et al. 2011, "Parallel Random Numbers: As Easy as 1, 2, 3"): Threefry-2x32 with
20 rounds maps a key (the run's seed) and a counter to 64 random bits, and keeps no state besides the counter. The
draws of optimizer step s are thus a function of (seed, s) alone: a resumed run draws what the uninterrupted one drew,
GRAPH_MODE and PYNATIVE_MODE compute the same integers, and the checkpoint needs no generator state. (MindSpore
2.8's seeded device generators, `mindspore.Generator` with `mint.randn` / `mint.randint`, have no CPU kernels; its
stateful random ops, StandardNormal or UniformInt, keep a state that can be neither saved nor restored.)

Counter layout: sample i of step s's global batch (rank-major, then micro-batch, then position in the micro-batch)
uses the counters (s, i K + k), k < K = 1 + ceil(C H W / 2). Counter k = 0 gives t and the label-drop uniform,
each later one two normals (Box & Muller 1958). Continuous time comes from the same bits as integer t: a uniform in
(0, 1) that the process maps to its time (`Process.training_time`: inverse CDFs, one draw per sample), so runs
with integer timesteps draw what they drew before. A sample's draws therefore do not depend on how the global batch is
split over ranks and micro-batches: ranks draw different noise, and 2 ranks x 2 micro-batches of 4 draw what one
device draws for a batch of 16.

Integers are uint32 values held in int64 tensors (MindSpore has no uint32 arithmetic on every backend), reduced
modulo 2^32 after each addition.
"""
import math

import mindspore as ms
from mindspore import nn, ops

from ..kernels import cpu_library
from ..kernels.threefry import ThreefryKernel

_MASK = 0xFFFFFFFF
_PARITY = 0x1BD11BDA  # Threefish's key-schedule constant
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))  # Random123's rotation constants of Threefry-2x32


def _rotate_left(x, r):
    return ops.bitwise_or(ops.bitwise_and(ops.bitwise_left_shift(x, r), _MASK), ops.bitwise_right_shift(x, 32 - r))


def threefry2x32(key, c0, c1):
    """Threefry-2x32-20 (Salmon et al. 2011; Random123's `threefry2x32`): key (k0, k1), Python ints < 2^32;
    c0, c1: int64 tensors of values in [0, 2^32), broadcast together -> (x0, x1), int64 tensors of uint32 values.

    20 rounds of x0 += x1; x1 = rotl(x1, R) ^ x0, with the key injected every 4 rounds."""
    k0, k1 = key
    ks = (k0, k1, k0 ^ k1 ^ _PARITY)
    x0 = ops.bitwise_and(c0 + ks[0], _MASK)
    x1 = ops.bitwise_and(c1 + ks[1], _MASK)
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            x0 = ops.bitwise_and(x0 + x1, _MASK)
            x1 = ops.bitwise_xor(_rotate_left(x1, r), x0)
        s = i + 1  # key injection s
        x0 = ops.bitwise_and(x0 + ks[s % 3], _MASK)
        x1 = ops.bitwise_and(x1 + (ks[(s + 1) % 3] + s), _MASK)
    return x0, x1


def _uniform(bits):
    """uint32 values -> float32 uniform in [0, 1) from their top 24 bits (exact in float32)."""
    return ops.bitwise_right_shift(bits, 8).astype(ms.float32) * (2.0**-24)


def _open_uniform(bits):
    """uint32 values -> float32 uniform in (0, 1): the top 24 bits, centred in their bin (never 0 or 1, so an
    inverse CDF of it is finite)."""
    return (ops.bitwise_right_shift(bits, 8).astype(ms.float32) + 0.5) * (2.0**-24)


def _sample_size(shape):
    """C H W of a batch `shape` (B, C, H, W) (a loop: graph mode compiles it, not math.prod)."""
    n = 1
    for d in shape[1:]:
        n *= d
    return n


def counters_per_sample(shape):
    """K: the counters one sample of a batch of `shape` (B, C, H, W) uses."""
    return 1 + (_sample_size(shape) + 1) // 2


class TrainingDraws(nn.Cell):
    """`(step, first, shape, labels) -> (t, noise, cond)`: the random inputs of one micro-batch of `shape`
    (B, C, H, W) at optimizer step `step` (int scalar tensor), whose first sample is sample `first` (int scalar
    tensor) of the step's global batch.

    t (B,) int32 uniform in [0, num_labels) (Ho et al. 2020, Algorithm 1; NCSN: the level indices), as
    floor(u32 * num_labels / 2^32); with num_labels None, float32 `training_time(u)` of a uniform u in (0, 1)
    (a continuous process's draw of its time: EDM's log-normal sigma, flow's t); noise (B, C, H, W) float32
    standard normal by Box-Muller on two 24-bit uniforms (|noise| < 5.8: the tail beyond it, probability 8e-9,
    is cut); cond: the labels (B,) or None, each label replaced by `null_label` with probability `drop_prob` (Ho &
    Salimans 2021, Algorithm 1).
    A step's global batch may hold at most 2^32 / K samples (K = `counters_per_sample(shape)`).
    """

    def __init__(self, seed, num_labels, drop_prob=0.0, null_label=None, training_time=None):
        super().__init__()
        if (num_labels is None) == (training_time is None):
            raise ValueError("give the number of integer labels, or a continuous process's training_time")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
            raise ValueError(f"train.seed must be an integer in [0, 2**64), got {seed!r}")
        if drop_prob > 0 and null_label is None:
            raise ValueError("label dropout needs the null label")
        self.key = (seed & _MASK, seed >> 32)
        # on CPU the generator is one kernel of ours instead of ~130 of MindSpore's, with the same integers
        library = cpu_library()
        self.threefry = None if library is None else ThreefryKernel(str(library.path))
        self.key_tensor = ms.Tensor(self.key, ms.int64)
        self.num_labels = None if num_labels is None else int(num_labels)
        self.training_time = training_time
        self.drop_prob = float(drop_prob)
        self.null_label = null_label

    def construct(self, step, first, shape, labels=None):
        b = shape[0]
        k = counters_per_sample(shape)
        sample = ops.arange(b, dtype=ms.int64) + first.astype(ms.int64)
        counter = sample.reshape(b, 1) * k + ops.arange(k, dtype=ms.int64)  # (B, K)
        if self.threefry is not None:
            x0, x1 = self.threefry(self.key_tensor, step.astype(ms.int64), counter)
        else:
            x0, x1 = threefry2x32(self.key, step.astype(ms.int64), counter)
        if self.num_labels is None:
            t = self.training_time(_open_uniform(x0[:, 0]))
        else:
            t = ops.bitwise_right_shift(x0[:, 0] * self.num_labels, 32).astype(ms.int32)
        radius = ops.sqrt(-2.0 * ops.log(1.0 - _uniform(x0[:, 1:])))  # 1 - u in (0, 1]: the log is finite
        angle = (2 * math.pi) * _uniform(x1[:, 1:])
        noise = ops.stack((radius * ops.cos(angle), radius * ops.sin(angle)), axis=-1).reshape(b, -1)
        noise = noise[:, :_sample_size(shape)].reshape(shape)
        if labels is not None and self.drop_prob > 0:
            drop = _uniform(x1[:, 0]) < self.drop_prob
            labels = ops.where(drop, ms.Tensor(self.null_label, ms.int32), labels.astype(ms.int32))
        return t, noise, labels
