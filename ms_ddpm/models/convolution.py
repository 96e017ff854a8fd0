"""2-D convolution that runs as one of ms_ddpm's CPU kernels where it can (`ms_ddpm.kernels.conv2d`)."""
import mindspore as ms
from mindspore import nn, ops

from ..kernels import cpu_library
from ..kernels.conv2d import KERNEL_SIZES, Conv2dKernels


def _stride1_same(conv):
    """Whether an nn.Conv2d is a stride-1, undilated, ungrouped "same" convolution with a kernel the CPU kernels
    have (1x1, or 3x3 padded by 1 on every side)."""
    k = conv.kernel_size[0]
    pads = conv.padding if isinstance(conv.padding, tuple) else (conv.padding,) * 4
    same = conv.pad_mode == "same" or (conv.pad_mode == "pad" and pads == (k // 2,) * 4) or (
        conv.pad_mode == "valid" and k == 1)
    return (conv.kernel_size == (k, k) and k in KERNEL_SIZES and same and conv.stride == (1, 1)
            and conv.dilation == (1, 1) and conv.group == 1)


class Conv2d(nn.Conv2d):
    """`nn.Conv2d` (same arguments, same parameter names) computed by the CPU kernels when it is a stride-1 "same"
    convolution with a 1x1 or 3x3 kernel and its input is float32 (MindSpore 2.8's CPU convolution and its
    gradients are several times slower; docs/performance.md); by MindSpore's own convolution otherwise: other
    devices, other shapes, float16 under mixed precision, no kernel library.

    `standardize_eps`: standardise the kernel per output channel with this epsilon before use (Qiao et al. 2019;
    the U-Net's `WeightStandardizedConv2d`), inside the kernel. Needs a bias.
    construct(x): (B, in_channels, H, W) -> (B, out_channels, H', W').
    """

    def __init__(self, in_channels, out_channels, kernel_size, has_bias=True, standardize_eps=None, **kwargs):
        super().__init__(in_channels, out_channels, kernel_size, has_bias=has_bias, **kwargs)
        if standardize_eps is not None and not has_bias:
            raise ValueError("Conv2d: a weight-standardised convolution needs has_bias=True")
        library = cpu_library()
        self.kernels = None
        if library is not None and library.convolutions and _stride1_same(self):
            variant = "Conv2d" if has_bias else "Conv2dNoBias"
            self.kernels = Conv2dKernels(str(library.path),
                                         variant if standardize_eps is None else "Conv2dStandardized")
        self.standardize_eps = ms.Tensor([standardize_eps or 0.0], ms.float32)

    def construct(self, x):
        if self.kernels is not None and x.dtype == ms.float32:
            return self.kernels(x, self.weight, self.bias, self.standardize_eps)
        return super().construct(x)


def conv2d(in_channels, out_channels, kernel_size, groups=1, has_bias=True):
    """A stride-1 'same' convolution initialised like PyTorch's Conv2d (a CPU kernel where it can be)."""
    return Conv2d(
        in_channels, out_channels, kernel_size, pad_mode="pad", padding=kernel_size // 2, group=groups,
        has_bias=has_bias,
    )
