"""Preemption: SIGTERM (how clusters preempt a job) or SIGINT (Ctrl-C) during `Trainer.train` lets the current
optimizer step finish; the trainer then writes a checkpoint of it and raises `Preempted`, and `--resume` continues
exactly. In a distributed job the ranks agree on the step to stop at (`StopSignals.agreed`), rank 0 writes the
checkpoint while the others wait (`StopSignals.synchronize`), and every rank stops there.
"""
import signal
import threading

import mindspore as ms
import numpy as np
from mindspore import ops


class Preempted(RuntimeError):
    """Training stopped on a signal after step `step`, whose checkpoint (written by rank 0) is `checkpoint`."""

    def __init__(self, signum, step, checkpoint):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint {checkpoint}")


class SumOverRanks:
    """x -> the sum of x over all ranks, compiled: MindSpore 2.8's op-by-op `comm_func.all_reduce` has no CPU kernel
    ("Create kernelmod for op InnerCommAllReduce failed")."""

    def __init__(self):
        self.all_reduce = ops.AllReduce()
        self._sum = ms.jit(self._sum_impl)

    def _sum_impl(self, x):
        return self.all_reduce(x)

    def __call__(self, x):
        return self._sum(x)


class StopSignals:
    """While active (a context manager), SIGTERM and SIGINT only record that a stop was asked for, so the loop can
    finish its step and write a checkpoint; a second signal gets the previous behaviour back (stop at once).

    Outside the main thread Python cannot handle signals, and nothing is changed.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)  # the order of the flags in `agreed`

    def __init__(self, group_size=1):
        self.group_size = group_size
        self.received = None
        self.previous = {}
        self.sum_over_ranks = SumOverRanks() if group_size > 1 else None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}

    def _handle(self, signum, frame):
        # no print here: a handler that writes while the interrupted code writes the same stream raises
        self.received = signum
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def agreed(self):
        """The signal to stop on now, or None: on one device the one received; with several ranks, which each
        receive a signal at another moment, one all-reduce of a flag per signal (SIGTERM first), so every rank
        stops after the same step and all exit with the same status."""
        if self.group_size == 1:
            return self.received
        # float32 sums: the only reduction and dtypes (with float16) of MindSpore's CPU AllReduce
        flags = np.array([self.received == s for s in self.SIGNALS], np.float32)
        total = self.sum_over_ranks(ms.Tensor(flags)).asnumpy()
        return next((s for s, n in zip(self.SIGNALS, total) if n > 0), None)

    def synchronize(self):
        """Return on every rank once all have called it: the ranks other than 0 wait here while rank 0 writes the
        checkpoint, so a launcher that stops the job when one rank exits cannot stop rank 0 mid-write."""
        if self.group_size > 1:
            self.sum_over_ranks(ms.Tensor(np.zeros(len(self.SIGNALS), np.float32))).asnumpy()
