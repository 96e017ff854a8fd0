"""ms_ddpm: denoising diffusion probabilistic models in MindSpore."""
from .diffusion import GaussianDiffusion
from .losses import DiffusionLoss
from .models.ddpm_unet import DDPMUNet
from .models.unet import Unet
from .samplers import DDIMSampler, DDPMSampler, create_sampler
from .schedules import get_beta_schedule

__version__ = "0.1.0"
__all__ = ["GaussianDiffusion", "DiffusionLoss", "Unet", "DDPMUNet", "DDPMSampler", "DDIMSampler", "create_sampler",
           "get_beta_schedule"]
