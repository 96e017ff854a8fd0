"""GroupNorm fused with the FiLM scale-shift and SiLU that follow it, as `ops.Custom` AOT kernels with gradients.

The C++ side is `csrc/group_norm.cc`. The forward kernel returns y and the per-(image, group) mean and 1/std,
which its gradient kernel reuses (one pass over the data to recompute the pre-activation, one to write dx).
"""
from functools import lru_cache

import mindspore as ms
import numpy as np
from mindspore import nn, ops
from mindspore.ops import CustomRegOp, DataType


def _reg_info(n_inputs, n_outputs, op_name="Custom"):
    """Registration of a float32 CPU kernel with `n_outputs` outputs (MindSpore needs it for several outputs).
    MindSpore keeps the first registration of a kernel function per `op_name`: a function called with different
    numbers of inputs needs a name per count."""
    reg = CustomRegOp(op_name)
    for i in range(n_inputs):
        reg = reg.input(i, f"x{i}")
    for i in range(n_outputs):
        reg = reg.output(i, f"y{i}")
    return reg.dtype_format(*[DataType.F32_Default] * (n_inputs + n_outputs)).target("CPU").get_op_info()


@lru_cache(maxsize=None)
def _forward_op(library, film, silu):
    """The forward Custom op of one variant, with its bprop; shared by every GroupNorm."""
    name = "GroupNorm" + ("Film" if film else "") + ("Silu" if silu else "")
    n_film = 2 if film else 0
    backward = ops.Custom(
        f"{library}:{name}Backward",
        out_shape=lambda dy, x, mean, rstd, gamma, beta, *film_shapes: (x, gamma, beta, *film_shapes),
        out_dtype=(ms.float32,) * (3 + n_film), func_type="aot", reg_info=_reg_info(6 + n_film, 3 + n_film),
    )

    if film:
        def bprop(x, gamma, beta, scale, shift, eps, out, dout):
            dx, dgamma, dbeta, dscale, dshift = backward(dout[0], x, out[1], out[2], gamma, beta, scale, shift)
            return dx, dgamma, dbeta, dscale, dshift, ops.zeros_like(eps)
    else:
        def bprop(x, gamma, beta, eps, out, dout):
            dx, dgamma, dbeta = backward(dout[0], x, out[1], out[2], gamma, beta)
            return dx, dgamma, dbeta, ops.zeros_like(eps)

    return ops.Custom(
        f"{library}:{name}Forward",
        out_shape=lambda x, *rest: (x, (x[0], rest[-1][0]), (x[0], rest[-1][0])),  # rest[-1]: eps, (groups,)
        out_dtype=(ms.float32,) * 3, func_type="aot", bprop=bprop, reg_info=_reg_info(4 + n_film, 3),
    )


class GroupNormKernels(nn.Cell):
    """act(GroupNorm(x) * (1 + scale) + shift) by the fused CPU kernels, computed in float32, returned float32.

    construct(x, gamma, beta, scale, shift, silu): x (B, C, *spatial), gamma and beta (C,), scale and shift None or
    B x C values ((B, C) or (B, C, 1, 1)), silu a Python bool; returns y shaped like x.
    """

    def __init__(self, library, num_groups, eps):
        super().__init__()
        # eps repeated per group: see csrc/group_norm.cc (the groups must show in the inputs' shapes)
        self.eps = ms.Tensor(np.full(num_groups, eps, np.float32))
        self.plain = _forward_op(library, False, False)
        self.silu = _forward_op(library, False, True)
        self.film = _forward_op(library, True, False)
        self.film_silu = _forward_op(library, True, True)

    def construct(self, x, gamma, beta, scale, shift, silu):
        # float32 casts here, not only in the caller: mixed precision (amp O2) casts a Cell's inputs to float16 on
        # entry. The kernels read raw memory, so PyNative's views (the scale and shift halves of one chunked
        # tensor, a transpose) are copied out first; in graph mode contiguous() is a no-op.
        x, gamma, beta = x.astype(ms.float32).contiguous(), gamma.astype(ms.float32), beta.astype(ms.float32)
        if scale is None:
            op = self.silu if silu else self.plain
            return op(x, gamma, beta, self.eps)[0]
        op = self.film_silu if silu else self.film
        scale, shift = scale.astype(ms.float32).contiguous(), shift.astype(ms.float32).contiguous()
        return op(x, gamma, beta, scale, shift, self.eps)[0]
