"""ms_ddpm: denoising diffusion probabilistic models in MindSpore.

The names below are imported on first use, so that `import ms_ddpm.utils` or `ms_ddpm.config` does not load
MindSpore (scripts/benchmark.py describes the machine before its PyTorch yardstick, which must not run on MindSpore's
OpenMP runtime).
"""
import importlib

__version__ = "0.1.0"
_EXPORTS = {
    "GaussianDiffusion": "processes", "create_process": "processes", "DiffusionLoss": "losses", "Unet": "models",
    "DDPMUNet": "models", "DDPMSampler": "samplers", "DDIMSampler": "samplers", "create_sampler": "samplers",
    "get_beta_schedule": "schedules", "ClassifierFreeGuidance": "guidance", "DiffusionPipeline": "pipeline",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ms_ddpm' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


def __dir__():
    return sorted(list(globals()) + __all__)
