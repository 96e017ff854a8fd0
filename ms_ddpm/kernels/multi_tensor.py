"""The training step's per-weight arithmetic over all weights at once (`csrc/multi_tensor.cc`): the gradients'
squared norm, the clipping product, the Adam update and the EMA's interpolation (the last two in place), one kernel
each instead of one to three per weight tensor. Not differentiated: they run after the gradients are taken.
"""
import mindspore as ms
from mindspore import nn, ops

from .group_norm import _reg_info


class MultiTensorKernels(nn.Cell):
    """The four kernels for one tuple of `n` float32 tensors (the trainable weights, their gradients, the EMA's
    copies), each called with the tensors unpacked:

        square_sum(*g) -> scalar                  sum_i sum(g_i ** 2)
        scale(c, *g) -> (c g_1, ..., c g_n)       c: float32 of shape (1,)
        lerp_(c, *a, *b)                          a_i <- a_i + c (b_i - a_i) in place, a: Parameters;
                                                  c: float32 of shape (1,)
        adam_(h, *w, *m, *v, *g)                  one Adam step of the Parameters w, m, v in place,
                                                  h = (lr, beta1, beta2, eps, beta1^t, beta2^t)

    The in-place kernels are marked as having side effects, so that the graph keeps them and orders them among the
    Parameters' other reads and writes (in the training step: Adam's update, then the EMA's).
    """

    def __init__(self, library, n):
        super().__init__()
        self.single = n == 1  # one output is a tensor, not a tuple (a tuple of one cannot be a kernel's output)
        out_dtype = ms.float32 if self.single else (ms.float32,) * n
        self._square_sum = ops.Custom(f"{library}:MultiTensorSquareSum", out_shape=lambda *shapes: (1,),
                                      out_dtype=ms.float32, func_type="aot", reg_info=_reg_info(n, 1, f"SquareSum{n}"))
        self._scale = ops.Custom(f"{library}:MultiTensorScale",
                                 out_shape=lambda c, *shapes: shapes[0] if self.single else shapes,
                                 out_dtype=out_dtype, func_type="aot", reg_info=_reg_info(1 + n, n, f"Scale{n}"))
        self._lerp_ = ops.Custom(f"{library}:MultiTensorLerpInPlace", out_shape=lambda *shapes: (1,),
                                 out_dtype=ms.float32, func_type="aot", reg_info=_reg_info(1 + 2 * n, 1, f"Lerp{n}"))
        self._adam_ = ops.Custom(f"{library}:MultiTensorAdamInPlace", out_shape=lambda *shapes: (1,),
                                 out_dtype=ms.float32, func_type="aot", reg_info=_reg_info(1 + 4 * n, 1, f"Adam{n}"))
        for op in (self._lerp_, self._adam_):
            op.add_prim_attr("side_effect_mem", True)

    def square_sum(self, *tensors):
        return self._square_sum(*tensors)[0]

    def scale(self, c, *tensors):
        out = self._scale(c.reshape((1,)), *tensors)
        return (out,) if self.single else out

    def lerp_(self, c, *tensors):
        self._lerp_(c.reshape((1,)), *tensors)

    def adam_(self, h, *tensors):
        self._adam_(h, *tensors)


def multi_tensor_kernels(library, parameters):
    """`MultiTensorKernels` for `parameters` when the CPU kernel `library` is loaded and every parameter is a float32
    array (the kernels read float32 only, and MindSpore hands a custom kernel's 0-d outputs back as Python floats);
    None otherwise, for the native ops."""
    if library is None or any(p.dtype != ms.float32 or p.ndim == 0 for p in parameters):
        return None
    return MultiTensorKernels(str(library.path), len(parameters))
