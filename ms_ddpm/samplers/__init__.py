"""Samplers of the reverse process, all with the interface of `Sampler`."""
from ..utils import check_choice
from .base import Sampler, SamplerOutput, spaced_timesteps
from .ddim import DDIMSampler
from .ddpm import DDPMSampler

SAMPLERS = {"ddpm": DDPMSampler, "ddim": DDIMSampler}


def create_sampler(name, diffusion, **kwargs):
    """Build a sampler by name (one of SAMPLERS) for `diffusion`; kwargs go to its constructor."""
    return SAMPLERS[check_choice("sampler", name, SAMPLERS)](diffusion, **kwargs)


__all__ = ["Sampler", "SamplerOutput", "spaced_timesteps", "DDPMSampler", "DDIMSampler", "SAMPLERS", "create_sampler"]
