"""Noise (beta) schedules of the forward process q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I), and the
spacings by which samplers pick a subset of the training timesteps (`spaced_timesteps`).

All schedules are computed in NumPy float64 and returned as arrays of shape (T,); callers turn them into tensors
at the edge. The names and formulas match diffusers' `DDPMScheduler(beta_schedule=...)`, which the tests check:

| ms_ddpm     | paper                                           | diffusers           |
| ----------- | ----------------------------------------------- | ------------------- |
| linear      | Ho et al. 2020, Sec. 4                          | "linear"            |
| cosine      | Nichol & Dhariwal 2021, Eq. 17, betas <= 0.999  | "squaredcos_cap_v2" |
| quadratic   | annotated-diffusion tutorial                    | "scaled_linear"     |
| sigmoid     | annotated-diffusion tutorial (GeoDiff)          | "sigmoid"           |

The linear schedule is NOT rescaled for T != 1000: beta runs from `beta_start` to `beta_end` whatever T is, as in
the DDPM paper, the annotated-diffusion tutorial and diffusers. improved-diffusion instead multiplies both ends by
1000 / T so that alpha_bar_T stays as small as at T = 1000; pass `beta_start=0.1 / T, beta_end=20 / T` for that.
This matters for short chains: with T = 200 and the default ends, alpha_bar_T = 0.13, so x_T still carries a
third of the signal's amplitude and sampling from pure noise starts off-distribution.
"""
import math

import numpy as np

from .utils import check_choice

SCHEDULES = ("linear", "cosine", "quadratic", "sigmoid")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def linear_beta_schedule(num_timesteps, beta_start=1e-4, beta_end=0.02):
    """Betas evenly spaced from `beta_start` to `beta_end` (Ho et al. 2020, Sec. 4)."""
    return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)


def cosine_beta_schedule(num_timesteps, s=0.008, max_beta=0.999):
    """alpha_bar(t) = cos^2(((t/T + s) / (1 + s)) * pi/2) (Nichol & Dhariwal 2021, Eq. 17).

    beta_t = 1 - alpha_bar(t+1) / alpha_bar(t), clipped at `max_beta` to avoid the singularity at t = T.
    """

    def alpha_bar(t):
        return np.cos((t + s) / (1 + s) * math.pi / 2) ** 2

    t = np.arange(num_timesteps, dtype=np.float64)
    betas = 1 - alpha_bar((t + 1) / num_timesteps) / alpha_bar(t / num_timesteps)
    return np.minimum(betas, max_beta)


def quadratic_beta_schedule(num_timesteps, beta_start=1e-4, beta_end=0.02):
    """Betas evenly spaced in sqrt(beta), then squared."""
    return np.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=np.float64) ** 2


def sigmoid_beta_schedule(num_timesteps, beta_start=1e-4, beta_end=0.02):
    """Betas following a sigmoid over [-6, 6], scaled to [beta_start, beta_end]."""
    x = np.linspace(-6, 6, num_timesteps, dtype=np.float64)
    return 1 / (1 + np.exp(-x)) * (beta_end - beta_start) + beta_start


def get_beta_schedule(name, num_timesteps, beta_start=1e-4, beta_end=0.02):
    """Betas of the named schedule, shape (num_timesteps,), float64. The cosine schedule ignores the end points."""
    check_choice("beta_schedule", name, SCHEDULES)
    if not isinstance(num_timesteps, int) or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be a positive integer, got {num_timesteps!r}")
    if name == "cosine":
        return cosine_beta_schedule(num_timesteps)
    if not 0 < beta_start < beta_end < 1:
        raise ValueError(f"need 0 < beta_start < beta_end < 1, got beta_start={beta_start}, beta_end={beta_end}")
    return {"linear": linear_beta_schedule, "quadratic": quadratic_beta_schedule, "sigmoid": sigmoid_beta_schedule}[
        name
    ](num_timesteps, beta_start, beta_end)


def spaced_timesteps(num_train_timesteps, num_inference_steps, spacing):
    """Descending integer timesteps; spacings as Table 2 of Lin et al. 2024 ("Common Diffusion Noise Schedules and
    Sample Steps are Flawed") and diffusers:
        leading:  0, k, 2k, ... with k = T // N (DDIM paper's uniform skip; never visits t = T-1 when N < T)
        trailing: T-1, T-1-T/N, ... rounded (always starts from the noisiest step)
        linspace: round(linspace(0, T-1, N))
    """
    check_choice("timestep_spacing", spacing, TIMESTEP_SPACINGS)
    if not isinstance(num_inference_steps, (int, np.integer)) or not 1 <= num_inference_steps <= num_train_timesteps:
        raise ValueError(
            f"num_inference_steps must be an integer from 1 to the {num_train_timesteps} training timesteps, "
            f"got {num_inference_steps!r}"
        )
    if spacing == "leading":
        steps = np.arange(num_inference_steps) * (num_train_timesteps // num_inference_steps)
        return steps[::-1].astype(np.int64)
    if spacing == "trailing":
        return np.round(np.arange(num_train_timesteps, 0, -num_train_timesteps / num_inference_steps)).astype(np.int64) - 1
    return np.linspace(0, num_train_timesteps - 1, num_inference_steps).round()[::-1].astype(np.int64)
