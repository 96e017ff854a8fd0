"""DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
Models"; equation and algorithm numbers refer to it).

The probability-flow ODE of a VP diffusion, written for the data prediction x_theta and the half-log-SNR
lambda_t = log(alpha_t / sigma_t), has the exact solution (Eq. 9)
    x_t = (sigma_t / sigma_s) x_s + sigma_t int_{lambda_s}^{lambda_t} e^lambda x_theta(x_lambda, lambda) dlambda
DPM-Solver++(2M) (Algorithm 2) takes x_theta linear in lambda from the last two network calls (multistep).

Paper symbols -> code: alpha_t = sqrt(alpha_bar_t) -> alpha_t; sigma_t = sqrt(1 - alpha_bar_t) -> sigma_t;
lambda_t -> lam; h_i = lambda_{t_i} - lambda_{t_{i-1}} -> h; r_i = h_{i-1} / h_i -> r; D_i -> D.

Conventions of diffusers' `DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2)`, which the
tests match to 1e-5:
  * timesteps: "linspace" takes round(linspace(0, T - 1, N + 1)) without its final 0; "leading" takes
    0, k, ..., N k with k = T // (N + 1), without the 0; "trailing" as `spaced_timesteps` (see `dpm_solver_timesteps`).
  * final_sigmas_type="zero": after the last timestep the solver steps to sigma = 0 (the data), and that step is
    first order (lower_order_final), so the sample is the last data prediction x_theta. The paper's Algorithm 2
    ends with a second-order step at a small t_M = eps instead; the first-order final step is what Lu et al.
    recommend for few steps (Sec. 5) and diffusers does by default.
  * the first step is first order (DPM-Solver++1 = DDIM, Eq. 10), as in Algorithm 2.
  * `karras_sigmas` (`use_karras_sigmas=True`): the solver steps through the N noise levels of Karras et al. 2022,
    Eq. 5 (rho 7), between the smallest and largest training sigma = sqrt((1 - alpha_bar) / alpha_bar), whatever
    the spacing; alpha_t = 1 / sqrt(sigma^2 + 1), sigma_t = sigma alpha_t there, and the network gets the level's
    timestep rounded to an integer (`sigma_timesteps`), repeats kept.
Deliberate differences: diffusers has no static clipping (only dynamic thresholding); here the data prediction is
clipped to [-1, 1] when `diffusion.clip_denoised` (Lu et al. Sec. 3.2 motivate x_theta by exactly such
thresholding), so the diffusers comparison uses clip_denoised=False. Repeated timesteps (only possible when
N > T / 2) are dropped instead of giving a zero-length step. With Karras sigmas on the cosine schedule diffusers
truncates the fractional timesteps instead of rounding them; here they are rounded for every schedule.
"""
import numpy as np

from ..schedules import TIMESTEP_SPACINGS, karras_sigmas, sigma_timesteps, timestep_sigmas
from ..utils import check_choice
from .base import Sampler, SamplerOutput


def dpm_solver_timesteps(num_train_timesteps, num_inference_steps, spacing):
    """Descending integer timesteps as diffusers' DPMSolverMultistepScheduler.set_timesteps picks them.

    The grid has N + 1 points ending at 0 and drops that 0 (linspace, leading): the last step goes from the smallest
    timestep kept straight to the data.
    """
    check_choice("timestep_spacing", spacing, TIMESTEP_SPACINGS)
    T, N = num_train_timesteps, num_inference_steps
    if not isinstance(N, (int, np.integer)) or not 1 <= N <= T:
        raise ValueError(f"num_inference_steps must be an integer from 1 to the {T} training timesteps, got {N!r}")
    if spacing == "linspace":
        steps = np.linspace(0, T - 1, N + 1).round()[::-1][:-1]
    elif spacing == "leading":
        steps = (np.arange(0, N + 1) * (T // (N + 1))).round()[::-1][:-1]
    else:
        steps = np.arange(T, 0, -T / N).round() - 1
    return np.unique(steps.astype(np.int64))[::-1].copy()


class DPMSolverSampler(Sampler):
    """DPM-Solver++(2M), data-prediction multistep solver of the probability-flow ODE (Algorithm 2).

    Deterministic. From timestep s to t < s, with x0_i the data prediction at the i-th call:
        first step:  x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) x0_s                           (Eq. 10)
        afterwards:  D = (1 + 1/(2r)) x0_s - 1/(2r) x0_prev,  x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) D
        last step:   onto the data, sigma_t = 0: x_0 = x0_s (first order)
    `step` keeps the previous data prediction and a call counter (call the steps in order, as `sample` does); a
    call at the first timestep starts afresh.

    Args:
        diffusion: a `GaussianDiffusion` (any objective; the output is turned into x_0).
        timestep_spacing: see `dpm_solver_timesteps`; default "linspace", as diffusers.
        karras_sigmas: step through the noise levels of Karras et al. Eq. 5 (module doc).
    """

    stochastic = False

    def __init__(self, diffusion, timestep_spacing="linspace", karras_sigmas=False):
        self._previous = None
        self.karras_sigmas = bool(karras_sigmas)
        super().__init__(diffusion, timestep_spacing)

    def set_timesteps(self, num_inference_steps):
        """Pick the timesteps and `self.sigmas`, the noise level sqrt((1 - alpha_bar) / alpha_bar) of each and a
        final 0 (the data)."""
        timesteps = dpm_solver_timesteps(self.num_train_timesteps, num_inference_steps, self.timestep_spacing)
        alphas_cumprod = self.process.alphas_cumprod
        sigmas = timestep_sigmas(alphas_cumprod, timesteps)
        if self.karras_sigmas:
            sigma_range = timestep_sigmas(alphas_cumprod, [0, self.num_train_timesteps - 1])
            sigmas = karras_sigmas(*sigma_range, num_inference_steps)
            timesteps = sigma_timesteps(alphas_cumprod, sigmas).round().astype(np.int64)
        self.timesteps = timesteps
        self.sigmas = np.append(sigmas, 0.0)
        self.num_inference_steps = len(self.timesteps)
        self._previous = None
        self._step_index = 0

    def _alpha_sigma_lambda(self, sigma):
        """alpha_t, sigma_t and lambda_t = log(alpha_t / sigma_t) in float64 at noise level sigma = sigma_t /
        alpha_t; sigma 0 is the data (lambda = inf)."""
        alpha = 1.0 / (sigma**2 + 1.0) ** 0.5
        return alpha, sigma * alpha, (-np.log(sigma) if sigma > 0 else np.inf)

    def step(self, model_output, timestep, sample, noise=None):
        # 1. which call this is; this and the next level's alpha, sigma, lambda (the data after the last)
        if timestep == self.timesteps[0]:
            self._step_index = 0
        k = self._step_index
        self._check_call(timestep, self.timesteps[k] if k < len(self.timesteps) else None)
        self._step_index = k + 1
        alpha_s, sigma_s, lam_s = self._alpha_sigma_lambda(float(self.sigmas[k]))
        alpha_t, sigma_t, lam_t = self._alpha_sigma_lambda(float(self.sigmas[k + 1]))
        # 2. data prediction x_theta(x_s, s), clipped when the diffusion says so
        x0 = self.predicted_x0(model_output, sample, alpha_s**2)
        if k == 0:
            self._previous = None
        # 3. last step: first order onto sigma = 0, where e^{-h} = 0 and the update is x0 itself
        if sigma_t == 0:
            prev_sample = x0
        else:
            h = lam_t - lam_s
            phi = float(-alpha_t * np.expm1(-h))  # -alpha_t (e^{-h} - 1)
            if self._previous is None:
                # 4. first step: DPM-Solver++1 (Eq. 10, = DDIM)
                D = x0
            else:
                # 5. second order: D from the last two data predictions, r = h_{i-1} / h_i (Algorithm 2, line 5)
                lam_prev, x0_prev = self._previous
                r = float((lam_s - lam_prev) / h)
                D = (1.0 + 0.5 / r) * x0 - (0.5 / r) * x0_prev
            prev_sample = float(sigma_t / sigma_s) * sample + phi * D
        self._previous = (lam_s, x0)
        return SamplerOutput(prev_sample, x0)
