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

The samplers of Karras et al. 2022 ("Elucidating the Design Space of Diffusion-Based Generative Models") see a
VP chain through its noise levels sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), the std of the noise in
x_t / sqrt(alpha_bar_t) = x_0 + sigma_t eps (their Table 1, VP column): `timestep_sigmas` and `sigma_timesteps`
convert between the two views as diffusers does, and `karras_sigmas` is their step grid (Eq. 5).
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


def spaced_timesteps(num_train_timesteps, num_inference_steps, spacing, integer=True):
    """Descending integer timesteps; spacings as Table 2 of Lin et al. 2024 ("Common Diffusion Noise Schedules and
    Sample Steps are Flawed") and diffusers:
        leading:  0, k, 2k, ... with k = T // N (DDIM paper's uniform skip; never visits t = T-1 when N < T)
        trailing: T-1, T-1-T/N, ... rounded (always starts from the noisiest step)
        linspace: round(linspace(0, T-1, N))
    `integer=False` leaves linspace's points unrounded (float64), as diffusers' Euler and Heun schedulers do: their
    noise levels interpolate between the training timesteps (`timestep_sigmas`).
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
    steps = np.linspace(0, num_train_timesteps - 1, num_inference_steps)[::-1].copy()
    return steps.round().astype(np.int64) if integer else steps


def _training_sigmas(alphas_cumprod):
    """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) at the training timesteps t = 0 .. T-1."""
    return np.sqrt((1.0 - alphas_cumprod) / alphas_cumprod)


def timestep_sigmas(alphas_cumprod, timesteps):
    """Noise levels sigma(t) = sqrt((1 - alpha_bar_t) / alpha_bar_t) at (possibly fractional) timesteps, linear in
    sigma between the training timesteps (diffusers' `np.interp`), float64."""
    sigmas = _training_sigmas(alphas_cumprod)
    return np.interp(np.asarray(timesteps, dtype=np.float64), np.arange(len(sigmas)), sigmas)


def sigma_timesteps(alphas_cumprod, sigmas):
    """The fractional timesteps of noise levels `sigmas`: linear in log sigma between the two training timesteps
    around each (diffusers' `_sigma_to_t`), clamped to [0, T - 1], float64. Their network input when the levels are
    off the training grid, as Karras sigmas are."""
    log_sigmas = np.log(_training_sigmas(alphas_cumprod))
    log_sigma = np.log(np.maximum(np.asarray(sigmas, dtype=np.float64), 1e-10))
    # the last training timestep at or below each level, kept one short of the end to leave a neighbour above
    low = np.clip(np.searchsorted(log_sigmas, log_sigma, side="right") - 1, 0, len(log_sigmas) - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0.0, 1.0)
    return low + w


def karras_sigmas(sigma_min, sigma_max, num_steps, rho=7.0):
    """The step grid of Karras et al. 2022, Eq. 5, largest first (float64, `num_steps` levels):
        sigma_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,  i = 0 .. N-1
    rho = 7 (their choice, Sec. 3) spends more steps at low noise, where the ODE curves most."""
    ramp = np.linspace(0.0, 1.0, num_steps)
    max_inv_rho, min_inv_rho = sigma_max ** (1.0 / rho), sigma_min ** (1.0 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
