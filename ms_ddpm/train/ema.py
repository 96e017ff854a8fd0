"""Exponential moving average of the weights, used for sampling (Ho et al. 2020, Appendix B: decay 0.9999)."""
import mindspore as ms
from mindspore import nn, ops

from ..kernels import cpu_library
from ..kernels.multi_tensor import multi_tensor_kernels

_map = ops.HyperMap()


def _average(one_minus_d, ema, w):
    # d ema + (1 - d) w as ema + (1 - d)(w - ema): three kernels per weight instead of six
    w = w if w.dtype == ms.float32 else w.astype(ms.float32)
    return ops.assign_add(ema, (w - ema) * one_minus_d)


class EMA(nn.Cell):
    """theta_ema <- d theta_ema + (1 - d) theta after an update, with d = min(decay, (1 + n) / (10 + n)) when
    `warmup` (n = number of EMA updates so far; the TensorFlow ExponentialMovingAverage `num_updates` rule), so the
    average is not dominated by the random initialisation early in training.

    The averaged weights are Parameters named "ema.<name>" (saved in the checkpoint beside the model's) and a
    counter "ema.num_updates".
    """

    def __init__(self, network, decay=0.9999, warmup=True):
        super().__init__()
        if not 0 <= decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.ema_weights = ms.ParameterTuple(
            [ms.Parameter(p.value().astype(ms.float32).copy(), name="ema." + p.name, requires_grad=False)
             for p in network.trainable_params()]
        )
        self.num_updates = ms.Parameter(ms.Tensor(0, ms.int32), name="ema.num_updates", requires_grad=False)
        # on CPU all weights' averages in one kernel, in place (kernels/multi_tensor.py)
        self.multi_tensor = multi_tensor_kernels(cpu_library(), network.trainable_params())

    def current_decay(self):
        if not self.warmup:
            return ms.Tensor(self.decay, ms.float32)
        n = self.num_updates.astype(ms.float32)
        return ops.minimum(ms.Tensor(self.decay, ms.float32), (1 + n) / (10 + n))

    def construct(self, weights):
        """One EMA step towards `weights` (the network's trainable parameters, in order); returns the decay used.
        `TrainStep` calls it inside its compiled step, after the optimizer update."""
        d = self.current_decay()
        if self.multi_tensor is not None:
            self.multi_tensor.lerp_(1 - d, *self.ema_weights, *weights)
        else:
            # one HyperMap, not a Python loop: a loop over the parameters unrolls into the compiled step (train/step.py)
            _map(ops.partial(_average, 1 - d), self.ema_weights, weights)
        ops.assign_add(self.num_updates, ms.Tensor(1, ms.int32))
        return d

    def copy_to(self, network):
        """Load the averaged weights into `network` (a model of the same architecture)."""
        for ema, p in zip(self.ema_weights, network.trainable_params()):
            p.set_data(ema.value().astype(p.dtype))
