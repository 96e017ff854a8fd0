"""Threefry-2x32-20 as one CPU kernel (`csrc/threefry.cc`) for the training step's draws (`train/randomness.py`),
which MindSpore's int64 ops compute in about 130 kernels. The same integers, so the same t and dropped labels with and
without it, and the same noise to float32 rounding."""
import mindspore as ms
from mindspore import nn, ops
from mindspore.ops import CustomRegOp, DataType


class ThreefryKernel(nn.Cell):
    """`(key, c0, c1) -> (x0, x1)` as `randomness.threefry2x32`, with key an int64 tensor (2,) and c0 one value
    (a 0-d or one-element int64 tensor) for every counter of c1."""

    def __init__(self, library):
        super().__init__()
        reg = (CustomRegOp("Threefry2x32").input(0, "key").input(1, "c0").input(2, "c1").output(0, "x0")
               .output(1, "x1").dtype_format(*[DataType.I64_Default] * 5).target("CPU").get_op_info())
        self.op = ops.Custom(f"{library}:Threefry2x32", out_shape=lambda key, c0, c1: (c1, c1),
                             out_dtype=(ms.int64, ms.int64), func_type="aot", reg_info=reg)

    def construct(self, key, c0, c1):
        return self.op(key, c0.reshape((1,)), c1)
