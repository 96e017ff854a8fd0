"""EDM (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models"; equation and table
numbers refer to it): x = x_0 + sigma eps, trained with ln sigma ~ N(p_mean, p_std^2) and sampled on the Karras
grid (Eq. 5) by the Euler family (`ms_ddpm.samplers.euler`, `heun`).

Preconditioning (Table 1, "Ours"): the network F is wrapped as the denoiser
    D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma))
    c_skip = sigma_data^2 / (sigma^2 + sigma_data^2)     c_out = sigma sigma_data / sqrt(sigma^2 + sigma_data^2)
    c_in   = 1 / sqrt(sigma^2 + sigma_data^2)             c_noise = ln(sigma) / 4
so that F's input and target have unit variance at every sigma. The loss lambda(sigma) ||D(x) - x_0||^2 with
lambda = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 is, written for F (Eq. 8),
    lambda c_out^2 ||F - (x_0 - c_skip x) / c_out||^2,   lambda c_out^2 = 1,
the unweighted regression of F on its "effective training target", which `training_terms` returns.
"""
from dataclasses import dataclass

import numpy as np
from mindspore import ops

from ..schedules import karras_sigmas
from .base import Process, per_sample, standard_normal_quantile


@dataclass
class EDMConfig:
    """diffusion keys of process edm (Karras et al. 2022, Table 1 and Sec. 5; their values for CIFAR-10 and
    ImageNet-64, images in [-1, 1])."""

    sigma_min: float = 0.002  # smallest sampling level
    sigma_max: float = 80.0  # largest sampling level, the prior's std
    sigma_data: float = 0.5  # std of the data
    rho: float = 7.0  # the grid's spacing, Eq. 5
    p_mean: float = -1.2  # training draws ln sigma ~ N(p_mean, p_std^2)
    p_std: float = 1.2

    def __post_init__(self):
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}")
        if not (self.sigma_data > 0 and self.rho > 0 and self.p_std > 0):
            raise ValueError(f"sigma_data, rho and p_std must be > 0, got {self.sigma_data}, {self.rho}, {self.p_std}")


class EDM(Process):
    """The EDM process and preconditioning; see the module doc. Time is sigma itself."""

    name = "edm"
    prediction = "denoiser"  # F, read through the preconditioning
    config_class = EDMConfig
    default_sampler = "heun"  # the paper's deterministic sampler (Algorithm 1)

    def __init__(self, sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, rho=7.0, p_mean=-1.2, p_std=1.2,
                 clip_denoised=True):
        super().__init__(clip_denoised)
        EDMConfig(sigma_min, sigma_max, sigma_data, rho, p_mean, p_std)  # checks the values
        self.sigma_min, self.sigma_max, self.sigma_data = float(sigma_min), float(sigma_max), float(sigma_data)
        self.rho, self.p_mean, self.p_std = float(rho), float(p_mean), float(p_std)
        self.prior_std = self.sigma_max

    @classmethod
    def from_config(cls, settings, clip_denoised):
        s = settings
        return cls(s.sigma_min, s.sigma_max, s.sigma_data, s.rho, s.p_mean, s.p_std, clip_denoised)

    def preconditioning(self, sigma):
        """(c_skip, c_out, c_in, c_noise) at sigma (Table 1), for floats or tensors."""
        sd2 = self.sigma_data**2
        total = sigma**2 + sd2
        c_noise = 0.25 * (np.log(sigma) if isinstance(sigma, float) else ops.log(sigma))
        return sd2 / total, sigma * self.sigma_data / total**0.5, 1.0 / total**0.5, c_noise

    def training_time(self, u):
        """sigma = exp(p_mean + p_std n), n ~ N(0, 1) (Sec. 5, "Training")."""
        return ops.exp(self.p_mean + self.p_std * standard_normal_quantile(u))

    def training_terms(self, x_start, sigma, noise):
        c_skip, c_out, c_in, c_noise = self.preconditioning(sigma)
        x = x_start + per_sample(sigma, x_start) * noise
        c_skip, c_out, c_in = (per_sample(c, x_start) for c in (c_skip, c_out, c_in))
        return c_in * x, c_noise, (x_start - c_skip * x) / c_out, None

    def ode_grid(self, num_steps, timestep_spacing, karras):
        """The Karras grid from sigma_max to sigma_min (Eq. 5), with or without `karras`; its network times are
        c_noise. x_T's std is diffusers' `EDMEulerScheduler`'s, sqrt(sigma_max^2 + 1) (the paper: sigma_max; 6e-5
        apart at sigma_max 80), so that its loop lands on the same numbers."""
        if timestep_spacing != "linspace":
            raise ValueError(f"timestep_spacing {timestep_spacing!r}: EDM's grid is Karras's (Eq. 5); drop it")
        levels = karras_sigmas(self.sigma_min, self.sigma_max, num_steps, self.rho)
        return self.level_time(levels), np.append(levels, 0.0), (self.sigma_max**2 + 1.0) ** 0.5

    def level_time(self, level):
        return 0.25 * np.log(level)

    def denoiser(self, level):
        c_skip, c_out, c_in, _ = self.preconditioning(float(level))
        return c_skip, c_out, c_in
