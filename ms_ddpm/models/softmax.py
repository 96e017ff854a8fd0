"""The softmax every attention of ms_ddpm's networks uses (the U-Nets' self-attention, the transformer blocks'
self- and cross-attention)."""
import mindspore as ms
from mindspore import nn, ops


class Softmax(nn.Cell):
    """Softmax over the last axis, computed in float32, with its gradient's row sums done as a matrix product on CPU.

    The gradient is y * (dy - sum(y * dy)) (the softmax Jacobian); MindSpore's CPU ReduceSum over a last axis of
    32 to 784 pixels costs several times a product with a column of ones (docs/performance.md). Other devices sum
    with a reduction: on the Ascend 910A the default precision mode may run a float32 product in float16
    (docs/ascend.md). The device is the one set when the network is built (`ms_ddpm.runtime.set_runtime`).
    """

    def __init__(self):
        super().__init__()
        self.row_sums_by_matmul = ms.get_context("device_target") == "CPU"

    def construct(self, x):
        return ops.softmax(x.astype(ms.float32), axis=-1).astype(x.dtype)

    def bprop(self, x, out, dout):
        y, dy = out.astype(ms.float32), dout.astype(ms.float32)
        if self.row_sums_by_matmul:
            row_sums = ops.matmul(y * dy, ops.ones((x.shape[-1], 1), ms.float32))
        else:
            row_sums = ops.sum(y * dy, dim=-1, keepdim=True)
        return ((y * (dy - row_sums)).astype(x.dtype),)
