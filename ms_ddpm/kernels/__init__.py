"""CPU kernels of our own, where MindSpore 2.8's CPU kernels are slow (docs/performance.md).

C++ sources in `csrc/`, compiled on first use with the system compiler and cached (`build.py`), run as
`ops.Custom(func_type="aot")` kernels with hand-written gradients. Only on the CPU backend: on Ascend and GPU, and
on a CPU where the library cannot be built (with a one-line warning), the models use MindSpore's native ops, with
the same numbers to float32 rounding.
"""
import mindspore as ms

from .build import KernelBuildError, Library, load


def cpu_library():
    """The kernel `Library` when the current device is the CPU and the library loads; None otherwise.
    Models ask once, when they are built, so the device must be set before (as `ms.set_device` requires anyway)."""
    if ms.get_context("device_target") != "CPU":
        return None
    return load()


__all__ = ["KernelBuildError", "Library", "cpu_library", "load"]
