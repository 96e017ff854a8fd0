"""Heun's second-order sampler (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative
Models", Algorithms 1 and 2), as diffusers' `HeunDiscreteScheduler` (ddpm) and `FlowMatchHeunDiscreteScheduler`
(flow) run it, and for EDM with the paper's stochastic churn (Algorithm 2).

The frame, grid and conventions are those of `ms_ddpm.samplers.euler` (module doc there): the ODE
dx/ds = (x - D(x; s)) / s on levels s_0 > ... > s_{N-1} > s_N = 0.
"""
import math

import mindspore as ms
import numpy as np

from .euler import EulerSampler


class HeunSampler(EulerSampler):
    """Heun's method (Algorithm 1; with `s_churn` > 0, Algorithm 2). From s_i to s_{i+1}:
        s_hat = s_i (1 + gamma_i),  x_hat = x + sqrt(s_hat^2 - s_i^2) S_noise z      (churn, lines 4-6)
        x_e = x_hat + h d(x_hat, s_hat),  h = s_{i+1} - s_hat                         (Euler predictor, line 8)
        x'  = x_hat + h/2 [d(x_hat, s_hat) + d(x_e, s_{i+1})]                         (correction, line 11)
            = (x_hat + x_e) / 2 + h/2 d(x_e, s_{i+1})
    with gamma_i = min(S_churn / N, sqrt(2) - 1) where S_tmin <= s_i <= S_tmax, else 0 (gamma 0 everywhere:
    Algorithm 1, deterministic). The step onto s_N = 0 is Euler's alone (line 9): 2N - 1 network calls for N levels.

    `self.timesteps` follows diffusers: every timestep after the first appears twice, [t_0, t_1, t_1, ...,
    t_{N-1}, t_{N-1}], one `step` call each: at even calls the Euler predictor (its prev_sample is x_e), at odd calls
    the correction, whose prev_sample is x_{i+1} with the next level's churn added, so the next predictor sees
    x_hat. `self.sigmas` likewise holds each level the network sees, [s_hat_0, s_1, s_hat_1, ..., s_{N-1},
    s_hat_{N-1}, 0]. The first level's churn is added to x_T by `start` (in `sample_progressive`); a loop written for
    diffusers' schedulers starts from N(0, s_hat_0^2 I) instead, the same distribution. Each call is one fused step in
    graph mode; `update_arguments` hands the correction the x_hat it started from.

    Args (beside `EulerSampler`'s): s_churn, s_tmin, s_tmax, s_noise: Algorithm 2's S_churn, S_tmin, S_tmax, S_noise
    (the paper's ImageNet-64 values: 80, 0.05, 50, 1.003); churn needs a sigma-frame process (ddpm, edm).
    """

    def __init__(self, process, timestep_spacing="linspace", karras_sigmas=False, s_churn=0.0, s_tmin=0.0,
                 s_tmax=float("inf"), s_noise=1.0):
        if not (s_churn >= 0 and s_noise > 0 and 0 <= s_tmin <= s_tmax):
            raise ValueError(f"need s_churn >= 0, s_noise > 0 and 0 <= s_tmin <= s_tmax, got {s_churn}, {s_noise}, "
                             f"{s_tmin}, {s_tmax}")
        if s_churn > 0 and not process.sigma_frame:
            raise ValueError(f"s_churn: the churn of Algorithm 2 adds noise in the sigma frame, which process "
                             f"{process.name!r} does not sample in; drop s_churn")
        self.s_churn, self.s_tmin, self.s_tmax = float(s_churn), float(s_tmin), float(s_tmax)
        self.s_noise = float(s_noise)
        self.stochastic = self.s_churn > 0
        super().__init__(process, timestep_spacing, karras_sigmas)

    def _set_grid(self, timesteps, sigmas, init_noise_sigma):
        levels = sigmas[:-1]
        gamma = np.where((self.s_tmin <= levels) & (levels <= self.s_tmax),
                         min(self.s_churn / len(levels), math.sqrt(2.0) - 1.0), 0.0)
        hats = levels * (1.0 + gamma)
        # the network time of a churned level is the process's; an unchurned one keeps the grid's own
        hat_times = np.where(gamma > 0, self.process.level_time(hats), timesteps)
        calls = np.stack([hats, np.append(levels[1:], 0.0)], axis=1).reshape(-1)[:-1]  # s_hat_0, s_1, s_hat_1, ...
        times = np.stack([hat_times, np.append(timesteps[1:], 0.0)], axis=1).reshape(-1)[:-1]
        self._churn = (hats**2 - levels**2) ** 0.5 * self.s_noise  # the std each level's churn adds
        super()._set_grid(times, np.append(calls, 0.0), init_noise_sigma)

    def start(self, x_T, rng):
        """x_hat_0: the first level's churn added to x_T (Algorithm 2, lines 4-6 at i = 0)."""
        std = float(self._churn[0])
        if std == 0:
            return x_T
        return x_T + std * ms.Tensor(rng.standard_normal(x_T.shape, dtype=np.float32))

    def coefficients(self, timestep):
        """Host-side scalars of this call, in float64: (c_skip, c_out, level the network sees, step on its
        derivative, weight of x_hat in the result, std of the churn added to the result)."""
        k = self._call_index(timestep)
        sigma = float(self.sigmas[k])
        if k % 2 == 0:
            # 1. Euler predictor from s_hat_i to s_{i+1}: x_e = x_hat + h d(x_hat, s_hat_i)
            dt, start_weight, churn = float(self.sigmas[k + 1]) - sigma, 0.0, 0.0
        else:
            # 2. correction at s_{i+1}: x' = (x_hat + x_e) / 2 + h/2 d(x_e, s_{i+1}), then the churn of level i+1
            dt, start_weight, churn = 0.5 * (sigma - float(self.sigmas[k - 1])), 0.5, float(self._churn[k // 2 + 1])
        return (*self.process.denoiser(sigma)[:2], sigma, dt, start_weight, churn)

    def update_arguments(self, timestep, sample):
        if self._step_index % 2 == 0:
            self._start = sample  # x_hat, which the correction averages with x_e
        return super().update_arguments(timestep, sample) + (self._start,)

    def update(self, model_output, sample, noise, c_skip, c_out, sigma, dt, start_weight, churn, start):
        """Either stage given `update_arguments` (floats and x_hat, or 0-d tensors and x_hat inside a compiled
        step)."""
        # 1. denoised sample and ODE derivative at this call's level (Algorithm 2, lines 7 and 10)
        x0 = self.denoise(model_output, sample, c_skip, c_out)
        derivative = (sample - x0) / sigma
        # 2. predictor: x_hat + h d (start_weight 0); correction: (x_hat + x_e) / 2 + h/2 d(x_e) (start_weight 1/2)
        prev_sample = start_weight * start + (1.0 - start_weight) * sample + derivative * dt
        # 3. the next level's churn (Algorithm 2, lines 5-6), after a correction
        if self.stochastic:
            prev_sample = prev_sample + churn * noise
        return prev_sample, x0
