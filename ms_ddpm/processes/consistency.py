"""Consistency models (Song et al. 2023, "Consistency Models"; equation, section and algorithm numbers refer to it):
a network f(x, sigma) that maps any point of a probability-flow ODE trajectory of EDM's process x = x_0 + sigma eps
to the trajectory's origin, so one call generates (Algorithm 1).

The boundary condition f(x, sigma_min) = x is built into the parametrisation (Sec. 3, Eq. 5; Appendix C, with
epsilon = sigma_min):
    f(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma))
    c_skip = sigma_data^2 / ((sigma - sigma_min)^2 + sigma_data^2)
    c_out  = (sigma - sigma_min) sigma_data / sqrt(sigma^2 + sigma_data^2)
    c_in   = 1 / sqrt(sigma^2 + sigma_data^2)                        (EDM's)
    c_noise = 1000 ln(sigma) / 4                                       (the authors' code; diffusers' `sigma_to_t`)
and its levels are the N-level Karras grid (Eq. 5 of Karras et al. 2022) from sigma_max to sigma_min, on which
multistep sampling picks its points (`ms_ddpm.samplers.ConsistencySampler`, equal to diffusers'
`CMStochasticIterativeScheduler`).

Consistency distillation and consistency training (Algorithms 2 and 3) are not built: a consistency model is
sampled here, not trained, and the trainer refuses the process in one line.
"""
from dataclasses import dataclass

import numpy as np
from mindspore import ops

from ..schedules import karras_sigmas
from .base import Process


@dataclass
class ConsistencyConfig:
    """diffusion keys of process consistency (Song et al. 2023, Appendix C; their ImageNet-64 and LSUN values)."""

    sigma_min: float = 0.002  # epsilon of the boundary condition, the smallest level
    sigma_max: float = 80.0  # T, the largest level, the prior's std
    sigma_data: float = 0.5  # std of the data
    rho: float = 7.0  # the grid's spacing
    num_levels: int = 40  # N, the levels of the discretised trajectory (diffusers' num_train_timesteps)

    def __post_init__(self):
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}")
        if not (self.sigma_data > 0 and self.rho > 0):
            raise ValueError(f"sigma_data and rho must be > 0, got {self.sigma_data}, {self.rho}")
        if isinstance(self.num_levels, bool) or not isinstance(self.num_levels, int) or self.num_levels < 2:
            raise ValueError(f"num_levels must be an int >= 2, got {self.num_levels!r}")


class ConsistencyModel(Process):
    """The consistency-model parametrisation on EDM's process; see the module doc. Time is sigma itself."""

    name = "consistency"
    prediction = "denoiser"  # F, read through the boundary-condition parametrisation
    config_class = ConsistencyConfig
    default_sampler = "consistency"
    trained_by_denoising = False

    def __init__(self, sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, rho=7.0, num_levels=40, clip_denoised=True):
        super().__init__(clip_denoised)
        ConsistencyConfig(sigma_min, sigma_max, sigma_data, rho, num_levels)  # checks the values
        self.sigma_min, self.sigma_max, self.sigma_data = float(sigma_min), float(sigma_max), float(sigma_data)
        self.rho, self.num_levels = float(rho), num_levels
        self.prior_std = self.sigma_max

    @classmethod
    def from_config(cls, settings, clip_denoised):
        s = settings
        return cls(s.sigma_min, s.sigma_max, s.sigma_data, s.rho, s.num_levels, clip_denoised)

    def levels(self):
        """The N levels, sigma_max first (Karras et al. 2022, Eq. 5; the authors' `karras_sample` grid)."""
        return karras_sigmas(self.sigma_min, self.sigma_max, self.num_levels, self.rho)

    def preconditioning(self, sigma):
        """(c_skip, c_out, c_in, c_noise) at sigma (module doc), for floats or tensors."""
        sd2 = self.sigma_data**2
        total = sigma**2 + sd2
        c_noise = 250.0 * (np.log(sigma) if isinstance(sigma, float) else ops.log(sigma))
        return (sd2 / ((sigma - self.sigma_min) ** 2 + sd2), (sigma - self.sigma_min) * self.sigma_data / total**0.5,
                1.0 / total**0.5, c_noise)

    def level_time(self, level):
        return 250.0 * np.log(level)

    def denoiser(self, level):
        c_skip, c_out, c_in, _ = self.preconditioning(float(level))
        return c_skip, c_out, c_in
