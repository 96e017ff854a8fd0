"""Stride-1 "same" convolutions (1x1, 3x3) as `ops.Custom` AOT kernels (`csrc/conv2d.cc`) with their gradient:
one kernel forward (bias and weight standardisation included) and one backward (input, kernel and bias gradients
together, where MindSpore runs Conv2DBackpropInput, Conv2DBackpropFilter, BiasAddGrad and the standardisation's
ops)."""
from functools import lru_cache

import mindspore as ms
from mindspore import nn, ops

from .group_norm import _reg_info

KERNEL_SIZES = (1, 3)


# variant -> (has bias, weight-standardised); the U-Nets use these three
VARIANTS = {"Conv2d": (True, False), "Conv2dNoBias": (False, False), "Conv2dStandardized": (True, True)}


@lru_cache(maxsize=None)
def _forward_op(library, variant):
    """The forward Custom op of one variant with its bprop, shared by every convolution of that variant."""
    bias, standardize = VARIANTS[variant]
    n_grads = 2 + bias
    backward = ops.Custom(
        f"{library}:{variant}Backward",
        out_shape=lambda dy, x, w, *rest: (x, w, (w[0],))[:n_grads],
        out_dtype=(ms.float32,) * n_grads, func_type="aot", reg_info=_reg_info(3 + standardize, n_grads),
    )

    if standardize:
        def bprop(x, w, b, eps, out, dout):
            dx, dw, db = backward(dout, x, w, eps)
            return dx, dw, db, ops.zeros_like(eps)
    elif bias:
        def bprop(x, w, b, out, dout):
            return backward(dout, x, w)
    else:
        def bprop(x, w, out, dout):
            return backward(dout, x, w)

    return ops.Custom(
        f"{library}:{variant}Forward",
        out_shape=lambda x, w, *rest: (x[0], w[0], x[2], x[3]),
        out_dtype=ms.float32, func_type="aot", bprop=bprop, reg_info=_reg_info(2 + bias + standardize, 1),
    )


class Conv2dKernels(nn.Cell):
    """conv2d(x, w) + bias by the CPU kernels, float32, stride 1, padding kernel_size // 2.

    construct(x, weight, bias, eps): x (B, Ci, H, W), weight (Co, Ci, k, k) with k in KERNEL_SIZES, bias (Co,)
    (ignored by "Conv2dNoBias"), eps a float32 (1,) tensor (used by "Conv2dStandardized") -> (B, Co, H, W).
    """

    def __init__(self, library, variant):
        super().__init__()
        self.op = _forward_op(library, variant)
        self.has_bias, self.standardize = VARIANTS[variant]

    def construct(self, x, weight, bias, eps):
        args = (x.astype(ms.float32).contiguous(), weight.astype(ms.float32))  # see GroupNormKernels
        if self.has_bias:
            args += (bias.astype(ms.float32),)
        if self.standardize:
            args += (eps,)
        return self.op(*args)
