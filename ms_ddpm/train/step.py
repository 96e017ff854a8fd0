"""The training step: loss, gradients, loss scaling, overflow skip, clipping, optimizer update.

This is MindSpore 2.x's documented mixed-precision pattern (value_and_grad + jit + loss scaler + a finite check): a
step whose gradients are not all finite changes no weight, and the dynamic scaler lowers its scale; after
`scale_window` good steps in a row it raises it again (Micikevicius et al. 2018, "Mixed Precision Training", Sec. 3.2).

Two Ascend hazards shape it. On Atlas training devices (910A, and 910B in saturation mode) `amp.all_finite` reads
and clears the device's overflow flag instead of checking values, so each micro-batch's gradients are checked when
they are made and the results kept (ANDed) across the micro-steps of an update; a check at the update alone would
miss an overflow of an earlier micro-batch. And gradients are all-reduced once per update, after accumulation,
not on every micro-step. Elsewhere `all_finite` checks values, two kernels per gradient tensor; with one
micro-batch per update the step reads finiteness off the gradient norm it computes anyway.

Every per-parameter operation (norm, clipping, accumulation) maps over the gradient tuple with `HyperMap`: a
Python loop over the ~170 gradients of even a tiny U-Net unrolls into the graph before compilation and tripled the
first step's compile time on CPU (70 s against 26 s for the tests' tiny U-Net; docs/performance.md).

The step keeps the host out of the loop (on an NPU the device would idle while the host works): it draws t, noise
and label dropout itself (`randomness.TrainingDraws`, from a step counter on the device), folds the EMA update in,
and counts non-finite steps on the device, so a loop that reads nothing back between its logging steps only feeds
the data in.
"""
import mindspore as ms
from mindspore import amp, nn, ops

from ..kernels import cpu_library
from ..kernels.multi_tensor import multi_tensor_kernels

_map = ops.HyperMap()


def _float32(x):
    # a Cast to the dtype a tensor already has still runs a kernel in the compiled graph
    return x if x.dtype == ms.float32 else x.astype(ms.float32)


def _square_sum(g):
    return ops.reduce_sum(ops.square(_float32(g)))


def _scale(coef, g):
    # in float32: coef folds 1 / loss scale into the clipping factor and can be below float16's normal range
    return g * coef if g.dtype == ms.float32 else (g.astype(ms.float32) * coef).astype(g.dtype)


def _accumulate(acc, g):
    return ops.assign_add(acc, _float32(g))


def _divide(count, acc):
    return acc.value() / count


def _empty(acc):
    return ops.assign(acc, ops.zeros_like(acc))


class DataParallelReduce(nn.Cell):
    """The data-parallel reduction of one update: `(grads, finite) -> (mean of the ranks' grads, finite on every
    rank)`. The flags are reduced too because each rank's own overflow checks (the device flag on Ascend) saw only
    its own gradients, and all ranks must skip or take the same updates. MindSpore's CPU backend reduces by sum only,
    hence the count of ranks that overflowed."""

    def __init__(self, parameters, group_size):
        super().__init__()
        self.grads = nn.DistributedGradReducer(parameters, mean=True, degree=group_size)
        self.flags = ops.AllReduce()

    def construct(self, grads, finite):
        overflowed = self.flags(ops.logical_not(finite).astype(ms.float32).reshape((1,)))
        return self.grads(grads), overflowed[0] == 0


class TrainStep:
    """Callable `(x_start, labels=None, update=True) -> (loss, finite, grad_norm)`, one micro-batch.

    Each call draws its micro-batch's t, noise and (with labels) dropped labels on the device from `draws` at the
    step counter `micro_batches` (calls so far: step * grad_accumulation + micro-batch), which a resumed run sets
    with `start_at(step)`. With `grad_accumulation` > 1, gradients of successive calls are summed in buffers, and
    the call with `update=True` applies their mean; `update` is a Python bool, so graph mode compiles one graph for
    each value. `finite` says whether the gradients of every micro-batch of the update so far were finite.
    At each update the step also updates `ema` (after every `ema_every`-th step whose update was taken) and
    `nonfinite_steps`, the number of updates in a row whose loss or gradients were not finite.

    Args:
        loss_fn: Cell (x_start, t, noise, cond) -> scalar loss (a `DiffusionLoss` on any process, t its
            integer labels or float times, or an `AutoencoderLoss`); cond is the network's condition (class
            labels) or None. The noise has x_start's shape, or `loss_fn.noise_shape(x_start.shape)` where the loss
            defines it (the autoencoder's posterior sample is latent-shaped).
        optimizer: a MindSpore optimizer over the trainable parameters.
        loss_scaler: `amp.DynamicLossScaler` or `amp.StaticLossScaler` (scale 1 for no scaling).
        draws: the `TrainingDraws` of the run (seed, number of timesteps or levels, label dropout).
        grad_clip: global-norm bound, 0 to disable.
        reduce: a `DataParallelReduce` across data-parallel ranks, called once per update; None on one device.
        rank: this process's data-parallel rank: its micro-batches' place in the step's global batch.
        ema: the `EMA` of the weights, or None.
        jit: compile the step (graph mode); False runs it op by op (PyNative).
    """

    def __init__(self, loss_fn, optimizer, loss_scaler, draws, grad_clip=1.0, grad_accumulation=1, reduce=None,
                 rank=0, ema=None, ema_every=1, jit=True):
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.loss_scaler = loss_scaler
        self.draws = draws
        self.grad_clip = float(grad_clip)
        self.grad_accumulation = int(grad_accumulation)
        if self.grad_accumulation < 1:
            raise ValueError(f"grad_accumulation must be >= 1, got {grad_accumulation}")
        if ema_every < 1:
            raise ValueError(f"train.ema_every must be >= 1, got {ema_every}")
        self.reduce = reduce
        self.rank = int(rank)
        self.ema = ema
        self.ema_every = int(ema_every)
        self.weights = optimizer.parameters
        # on CPU the norm and the clipping product over all gradients in one kernel each (kernels/multi_tensor.py)
        self.multi_tensor = multi_tensor_kernels(cpu_library(), self.weights)
        # all_finite reads the device's overflow flag on Ascend (910A, 910B in saturation mode), where overflowed
        # values may saturate instead of becoming inf; elsewhere it checks values, as the gradient norm does
        self.overflow_flag = ms.get_context("device_target") == "Ascend"
        self.noise_shape = getattr(loss_fn, "noise_shape", None)
        self.accumulated = self.finite_so_far = None
        if self.grad_accumulation > 1:
            self.accumulated = ms.ParameterTuple(
                [ms.Parameter(ops.zeros(p.shape, ms.float32), name="grad_acc." + p.name, requires_grad=False)
                 for p in self.weights]
            )
            # the AND of the finite checks of this update's micro-batches so far
            self.finite_so_far = ms.Parameter(ms.Tensor(True), name="grad_acc.finite", requires_grad=False)
        # derived from the checkpoint's step (start_at), not saved in it
        self.micro_batches = ms.Parameter(ms.Tensor(0, ms.int32), name="train.micro_batches", requires_grad=False)
        self.nonfinite_steps = ms.Parameter(ms.Tensor(0, ms.int32), name="train.nonfinite_steps",
                                            requires_grad=False)
        if isinstance(loss_scaler, amp.DynamicLossScaler):  # default names "scale_value", "counter" say too little
            loss_scaler.scale_value.name = "loss_scaler.scale_value"
            loss_scaler.counter.name = "loss_scaler.counter"
        self.grad_fn = ms.value_and_grad(self._forward, None, self.weights, has_aux=True)
        self._step = ms.jit(self._step_impl) if jit else self._step_impl

    def start_at(self, step):
        """Continue with optimizer step `step` (0 for a new run): its draws next, and no non-finite steps counted."""
        self.micro_batches.set_data(ms.Tensor(step * self.grad_accumulation, ms.int32))
        self.nonfinite_steps.set_data(ms.Tensor(0, ms.int32))

    def _forward(self, x_start, t, noise, cond):
        loss = self.loss_fn(x_start, t, noise, cond)
        return self.loss_scaler.scale(loss), loss

    def _step_impl(self, x_start, labels, update):
        calls = self.micro_batches.value()
        step, micro = calls // self.grad_accumulation, calls % self.grad_accumulation
        batch = x_start.shape[0]
        first = (self.rank * self.grad_accumulation + micro) * batch  # rank-major, then micro-batch
        shape = x_start.shape if self.noise_shape is None else self.noise_shape(x_start.shape)
        t, noise, cond = self.draws(step, first, shape, labels)
        ops.assign_add(self.micro_batches, ms.Tensor(1, ms.int32))
        (_, loss), grads = self.grad_fn(x_start, t, noise, cond)
        if self.overflow_flag or self.grad_accumulation > 1:
            # at once: on Ascend all_finite reads (and clears) the flag these gradients set, and with accumulation
            # each micro-batch reports its own
            finite = amp.all_finite(grads)
        else:
            finite = ms.Tensor(True)  # checked below, from the gradient norm
        if self.grad_accumulation > 1:
            finite = ops.logical_and(self.finite_so_far, finite)
            _map(_accumulate, self.accumulated, grads)  # still scaled; unscaled once, at the update
            if not update:
                ops.assign(self.finite_so_far, finite)
                return loss, finite, ops.zeros((), ms.float32)
            grads = _map(ops.partial(_divide, ms.Tensor(self.grad_accumulation, ms.float32)), self.accumulated)
            _map(_empty, self.accumulated)
            ops.assign(self.finite_so_far, ms.Tensor(True))
        if self.reduce is not None:
            grads, finite = self.reduce(grads, finite)
        if self.overflow_flag:  # where all_finite reads a flag, the reduction may have overflowed
            finite = ops.logical_and(finite, amp.all_finite(grads))
        # The norm of the unscaled gradients and, from it, whether they are all finite: unscaling commutes with the
        # norm (exactly, for the dynamic scaler's powers of two), and a non-finite gradient makes the norm
        # non-finite (as does a squared scaled gradient beyond float32's range, |g| x scale > 1.8e19: the dynamic
        # scaler then halves and retries, as for any overflow). The unscaling then rides on the clipping's product.
        # On CPU this saves two finite checks and a product, five kernels per gradient tensor (docs/performance.md).
        unscale = ops.reciprocal(self.loss_scaler.scale_value)
        norm = self._global_norm(grads) * unscale
        finite = ops.logical_and(finite, ops.isfinite(norm))
        if finite:
            if self.grad_clip > 0:
                # PyTorch's clip_grad_norm_ rule, reusing the norm computed for the log
                unscale = unscale * ops.minimum(self.grad_clip / (norm + 1e-6), 1.0)
            self.optimizer(self._scaled(unscale, grads))
        self.loss_scaler.adjust(finite)
        good = ops.logical_and(finite, ops.isfinite(loss))
        ops.assign(self.nonfinite_steps, ops.select(good, ms.Tensor(0, ms.int32), self.nonfinite_steps + 1))
        if self.ema is not None:
            # step + 1: the steps taken with this one, as the loop counts them
            if ops.logical_and(finite, (step + 1) % self.ema_every == 0):
                self.ema(self.weights)
        return loss, finite, norm

    def _global_norm(self, grads):
        """sqrt(sum of squares) over all gradient tensors, in float32."""
        if self.multi_tensor is not None:
            return ops.sqrt(self.multi_tensor.square_sum(*grads))
        return ops.sqrt(ops.addn(_map(_square_sum, grads)))

    def _scaled(self, coef, grads):
        if self.multi_tensor is not None:
            return self.multi_tensor.scale(coef, *grads)
        return _map(ops.partial(_scale, coef), grads)

    def __call__(self, x_start, labels=None, update=True):
        out = self._step(x_start, labels, update)
        # Wait until this step is dispatched (not for its values: nothing is read back). MindSpore 2.8 otherwise
        # queues the calls of a loop that reads nothing back in its launch pipeline, and on CPU a queue of steps
        # runs at half speed (docs/performance.md, "Queued steps").
        out[0].wait_pipeline()
        return out

    def state_parameters(self):
        """Parameters that must be checkpointed besides the model's: optimizer moments and step, scaler state.
        The per-step learning-rate table is derived from the config and is left out."""
        own = {w.name for w in self.weights} | {"learning_rate"}
        params = [p for p in self.optimizer.get_parameters() if p.name not in own]
        if isinstance(self.loss_scaler, amp.DynamicLossScaler):
            params += [self.loss_scaler.scale_value, self.loss_scaler.counter]
        return params
