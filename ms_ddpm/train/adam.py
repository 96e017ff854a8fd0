"""Adam with its update as one CPU kernel over all weights."""
from mindspore import nn, ops

from ..kernels import cpu_library
from ..kernels.multi_tensor import multi_tensor_kernels


class MultiTensorAdam(nn.Adam):
    """`nn.Adam` (Kingma & Ba 2015) whose update is one kernel over all weights (`kernels/multi_tensor.py`) instead
    of one per weight tensor: 217 kernel launches fewer per step for the quick start's U-Net. The same Parameters
    (moments, beta powers, step count: checkpoints load into either optimizer) and the arithmetic of MindSpore's CPU
    Adam kernel. Build it with `adam()`."""

    def __init__(self, params, learning_rate, kernels):
        super().__init__(params, learning_rate=learning_rate)
        self.kernels = kernels

    def construct(self, gradients):
        # nn.Adam.construct without the options this class is not built with (weight decay, gradient
        # centralisation, loss scale, sparse gradients, groups)
        lr = self.get_lr()
        self.assignadd(self.global_step, self.global_step_increase_tensor)
        beta1_power = self.beta1_power * self.beta1
        self.beta1_power = beta1_power
        beta2_power = self.beta2_power * self.beta2
        self.beta2_power = beta2_power
        h = ops.concat([x.reshape((1,)) for x in (lr, self.beta1, self.beta2, self.eps, beta1_power, beta2_power)])
        self.kernels.adam_(h, *self._parameters, *self.moment1, *self.moment2, *gradients)
        return True


def adam(params, learning_rate):
    """Adam over `params` (a list of Parameters): `MultiTensorAdam` where the CPU kernels take them, else `nn.Adam`."""
    kernels = multi_tensor_kernels(cpu_library(), params)
    if kernels is None:
        return nn.Adam(params, learning_rate=learning_rate)
    return MultiTensorAdam(params, learning_rate, kernels)
