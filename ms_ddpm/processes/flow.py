"""Rectified flow / flow matching (Liu et al. 2022, "Flow Straight and Fast"; Lipman et al. 2023; in the form of
Stable Diffusion 3, Esser et al. 2024, "Scaling Rectified Flow Transformers"; equation numbers refer to Esser et al.):

    x_t = (1 - t) x_0 + t eps,  t in (0, 1)                                     (Eq. 3 with the RF path, Sec. 3.1)
    the network regresses the velocity u = eps - x_0 = d x_t / dt               (conditional flow matching, Eq. 4)

Training draws t uniformly or logit-normal, t = sigmoid(m + s n), n ~ N(0, 1) (Sec. 3.1, "Logit-Normal
Sampling"; SD3's default m = 0, s = 1); the network sees 1000 t, as SD3's transformer (diffusers'
`num_train_timesteps`). Sampling integrates dx/dt = u from t = 1 (pure noise) to 0 on diffusers'
`FlowMatchEulerDiscreteScheduler` grid, shifted by t' = shift t / (1 + (shift - 1) t) (Sec. 5.3.2, "Resolution-
dependent shifting of timestep schedules"), which spends more steps at high noise for shift > 1.
"""
from dataclasses import dataclass

import numpy as np
from mindspore import ops

from ..utils import check_choice
from .base import Process, denoiser_coefficients, per_sample, standard_normal_quantile

TIME_SAMPLINGS = ("uniform", "logit_normal")
#: the network's time input is TIME_SCALE t (SD3 and diffusers' num_train_timesteps)
TIME_SCALE = 1000


@dataclass
class FlowConfig:
    """diffusion keys of process flow."""

    time_sampling: str = "logit_normal"  # how training draws t: uniform | logit_normal (SD3's choice, Sec. 5.1)
    logit_mean: float = 0.0  # m of t = sigmoid(m + s n) (SD3: 0)
    logit_std: float = 1.0  # s (SD3: 1)
    shift: float = 1.0  # sampling grid shift t' = shift t / (1 + (shift - 1) t); SD3 at 1024^2: 3

    def __post_init__(self):
        check_choice("diffusion.time_sampling", self.time_sampling, TIME_SAMPLINGS)
        if not (self.logit_std > 0 and self.shift > 0):
            raise ValueError(f"logit_std and shift must be > 0, got {self.logit_std}, {self.shift}")


def shifted(t, shift):
    """SD3's time shift (Sec. 5.3.2), as diffusers' flow-matching schedulers apply it."""
    return shift * t / (1.0 + (shift - 1.0) * t)


class RectifiedFlow(Process):
    """The rectified-flow process; see the module doc. The Euler family runs it in its own frame (s = t)."""

    name = "flow"
    prediction = "velocity"
    sigma_frame = False
    config_class = FlowConfig
    default_sampler = "euler"  # SD3's

    def __init__(self, time_sampling="logit_normal", logit_mean=0.0, logit_std=1.0, shift=1.0, clip_denoised=True):
        super().__init__(clip_denoised)
        FlowConfig(time_sampling, logit_mean, logit_std, shift)  # checks the values
        self.time_sampling = time_sampling
        self.logit_mean, self.logit_std, self.shift = float(logit_mean), float(logit_std), float(shift)

    @classmethod
    def from_config(cls, settings, clip_denoised):
        s = settings
        return cls(s.time_sampling, s.logit_mean, s.logit_std, s.shift, clip_denoised)

    def training_time(self, u):
        if self.time_sampling == "uniform":
            return u
        return ops.sigmoid(self.logit_mean + self.logit_std * standard_normal_quantile(u))

    def training_terms(self, x_start, t, noise):
        t_b = per_sample(t, x_start)
        return (1.0 - t_b) * x_start + t_b * noise, TIME_SCALE * t, noise - x_start, None

    def ode_grid(self, num_steps, timestep_spacing, karras):
        """diffusers' `FlowMatchEulerDiscreteScheduler` grid: N times from 1 to shifted(1 / 1000), linear, then
        shifted (again: diffusers shifts the shifted ends' linspace), float32; network times 1000 t."""
        if timestep_spacing != "linspace" or karras:
            raise ValueError("the flow grid is diffusers' FlowMatchEulerDiscreteScheduler's: drop timestep_spacing "
                             "and karras_sigmas")
        t_min = shifted(np.float32(1.0 / TIME_SCALE), self.shift)
        levels = shifted(np.linspace(1.0, t_min, num_steps), self.shift).astype(np.float32).astype(np.float64)
        return TIME_SCALE * levels, np.append(levels, 0.0), 1.0

    def level_time(self, level):
        return TIME_SCALE * level

    def denoiser(self, level):
        c_skip, c_out = denoiser_coefficients("velocity", 1.0 - level, level)
        return c_skip, c_out, None
