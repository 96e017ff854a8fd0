"""Group normalisation that checks its arguments, computes in float32 and, on CPU, runs as one fused kernel with
the scale-shift and SiLU that follow it in the U-Net blocks."""
import mindspore as ms
from mindspore import nn, ops

from ..kernels import cpu_library
from ..kernels.group_norm import GroupNormKernels


class GroupNorm(nn.GroupNorm):
    """`nn.GroupNorm` (Wu & He 2018) in float32, optionally followed by a scale-shift and SiLU.

    construct(x, scale=None, shift=None, silu=False): x (B, C, *spatial) -> GroupNorm(x), then
    `* (1 + scale) + shift` when scale and shift (B, C, 1, 1) are given (the time conditioning of the U-Net blocks,
    "FiLM"), then SiLU when `silu`; the result has x's shape and dtype.

    Mean and variance over a group lose too many digits in float16, a known trouble spot for mixed precision
    (improved-diffusion's GroupNorm32 does the same cast), so the computation is float32 whatever x's dtype. On the
    CPU backend the whole of it is one kernel forward and one backward (`ms_ddpm.kernels`: MindSpore 2.8's CPU
    GroupNorm, broadcast Mul / Add and SiLU cost several times PyTorch's); elsewhere, or when the kernels cannot be
    built, MindSpore's ops compute the same.
    """

    def __init__(self, num_groups, num_channels, eps=1e-5):
        if num_groups < 1 or num_channels % num_groups != 0:
            divisors = [g for g in range(1, num_channels + 1) if num_channels % g == 0]
            raise ValueError(
                f"GroupNorm: {num_channels} channels are not divisible by {num_groups} groups; "
                f"choose the number of groups from {divisors} or change the channel widths."
            )
        super().__init__(num_groups, num_channels, eps=eps)
        library = cpu_library()
        self.kernels = None if library is None else GroupNormKernels(str(library.path), num_groups, eps)

    def construct(self, x, scale=None, shift=None, silu=False):
        if x.shape[1] != self.num_channels:
            raise ValueError(f"GroupNorm: expected {self.num_channels} channels, got input of shape {x.shape}")
        x32 = x.astype(ms.float32)
        if self.kernels is not None:
            return self.kernels(x32, self.gamma, self.beta, scale, shift, silu).astype(x.dtype)
        y = super().construct(x32)
        if scale is not None:
            y = y * (scale.astype(ms.float32) + 1) + shift.astype(ms.float32)
        if silu:
            y = ops.silu(y)
        return y.astype(x.dtype)
