"""Group normalisation that checks its arguments and always computes in float32."""
import mindspore as ms
from mindspore import nn


class GroupNorm(nn.GroupNorm):
    """`nn.GroupNorm` (Wu & He 2018) that runs in float32 whatever the input dtype.

    Mean and variance over a group lose too many digits in float16, a known trouble spot for mixed precision
    (improved-diffusion's GroupNorm32 does the same cast). The output is cast back to the input dtype.
    """

    def __init__(self, num_groups, num_channels, eps=1e-5):
        if num_groups < 1 or num_channels % num_groups != 0:
            divisors = [g for g in range(1, num_channels + 1) if num_channels % g == 0]
            raise ValueError(
                f"GroupNorm: {num_channels} channels are not divisible by {num_groups} groups; "
                f"choose the number of groups from {divisors} or change the channel widths."
            )
        super().__init__(num_groups, num_channels, eps=eps)

    def construct(self, x):
        return super().construct(x.astype(ms.float32)).astype(x.dtype)
