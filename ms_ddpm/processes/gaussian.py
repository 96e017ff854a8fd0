"""Gaussian diffusion (Ho et al. 2020, "Denoising Diffusion Probabilistic Models"; equation numbers refer to it).

Forward process    q(x_t | x_0)          = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)               (Eq. 4)
Posterior          q(x_{t-1} | x_t, x_0) = N(mu_tilde_t(x_t, x_0), beta_tilde_t I)                     (Eqs. 6-7)
Reverse process    p(x_{t-1} | x_t)      = N(mu_theta(x_t, t), sigma_t^2 I), sigma_t^2 in {beta_tilde_t, beta_t}, or
                   learned: log sigma_t^2 = v log beta_t + (1 - v) log beta_tilde_t   (Nichol & Dhariwal 2021, Eq. 15)

The network predicts one of three targets (`objective`):
    "eps": the noise epsilon (Ho et al. Eq. 11-14);  "x0": the clean image;
    "v":   v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0 (Salimans & Ho 2022, "Progressive Distillation", Sec. 4).

Tables are built once in NumPy float64 (as improved-diffusion does) and kept twice: as float64 arrays for the
samplers, which index them with Python integers, and as float32 tensors that the training graph gathers per sample.
The network's output is read through `ms_ddpm.processes.base.predict_x0` / `predict_eps` at
(alpha, sigma) = `vp_alpha_sigma(alpha_bar)`, floats in the samplers and tensors in the training graph.
"""
from dataclasses import dataclass

import mindspore as ms
import numpy as np
from mindspore import ops

from ..schedules import get_beta_schedule, karras_sigmas, sigma_timesteps, spaced_timesteps, timestep_sigmas
from ..utils import check_choice
from .base import Process, denoiser_coefficients, predict_x0, split_output

OBJECTIVES = ("eps", "x0", "v")
VARIANCE_TYPES = ("fixed_small", "fixed_large", "learned_range")


@dataclass
class DDPMConfig:
    """diffusion keys of process ddpm."""

    num_timesteps: int = 1000  # T, training chain length
    beta_schedule: str = "linear"  # linear | cosine | quadratic | sigmoid
    beta_start: float = 1.0e-4  # first beta (linear / quadratic / sigmoid); not rescaled with T
    beta_end: float = 0.02  # last beta
    objective: str = "eps"  # what the network predicts: eps | x0 | v
    # reverse variance: fixed_small (beta_tilde) | fixed_large (beta) | learned_range (the network outputs 2C
    # channels, the last C interpolating the log-variance between the two: Nichol & Dhariwal 2021, Eq. 15)
    variance_type: str = "fixed_small"
    loss_type: str = "l2"  # l1 | l2 | huber (smooth L1, as the annotated tutorial)
    loss_weighting: str = "none"  # none | p2 | min_snr
    min_snr_gamma: float = 5.0  # gamma of min-SNR weighting (Hang et al. 2023)
    p2_gamma: float = 1.0  # gamma of P2 weighting (Choi et al. 2022)
    p2_k: float = 1.0  # k of P2 weighting
    # lambda of L_hybrid = L_simple + lambda L_vlb (Nichol & Dhariwal 2021, Sec. 3.1), learned_range only: the bound
    # trains the variance half (the mean's gradient stopped); loss_type and loss_weighting apply to L_simple alone
    vlb_weight: float = 0.001

    def __post_init__(self):
        if self.variance_type == "learned_range" and not self.vlb_weight > 0:
            raise ValueError(f"diffusion.vlb_weight must be > 0 with variance_type learned_range (the bound is what "
                             f"trains the variance), got {self.vlb_weight}")

    def loss_options(self):
        """The keyword arguments of `ms_ddpm.losses.DiffusionLoss` these keys set."""
        return dict(loss_type=self.loss_type, weighting=self.loss_weighting, p2_gamma=self.p2_gamma, p2_k=self.p2_k,
                    min_snr_gamma=self.min_snr_gamma, vlb_weight=self.vlb_weight)


def q_posterior_coefficients(alpha_bar_t, alpha_bar_prev):
    """Coefficients of q(x_prev | x_t, x_0) for a jump from t to an earlier step `prev` (Eqs. 6-7).

    With beta = 1 - alpha_bar_t / alpha_bar_prev (the single-step beta_t when prev = t - 1, and the beta of the
    respaced chain otherwise):
        mu_tilde   = coef_x0 * x_0 + coef_xt * x_t
        coef_x0    = sqrt(alpha_bar_prev) beta / (1 - alpha_bar_t)
        coef_xt    = sqrt(1 - beta) (1 - alpha_bar_prev) / (1 - alpha_bar_t)
        beta_tilde = (1 - alpha_bar_prev) / (1 - alpha_bar_t) beta
    Works elementwise on floats and NumPy arrays. Returns (coef_x0, coef_xt, beta_tilde, beta).
    """
    beta = 1.0 - alpha_bar_t / alpha_bar_prev
    coef_x0 = np.sqrt(alpha_bar_prev) * beta / (1.0 - alpha_bar_t)
    coef_xt = np.sqrt(1.0 - beta) * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar_t)
    beta_tilde = (1.0 - alpha_bar_prev) / (1.0 - alpha_bar_t) * beta
    return coef_x0, coef_xt, beta_tilde, beta


def vp_alpha_sigma(alpha_bar):
    """(alpha, sigma) = (sqrt(alpha_bar), sqrt(1 - alpha_bar)) of a VP chain (Eq. 4), for `predict_x0` / `predict_eps`
    (floats or tensors)."""
    return alpha_bar**0.5, (1 - alpha_bar) ** 0.5


class GaussianDiffusion(Process):
    """The DDPM forward process, its posterior and the reverse-process parameterisation.

    A parameter-free Cell so that its tensor methods compile inside a training graph; the samplers use the NumPy
    tables directly.

    Args:
        betas: (T,) array of forward-process variances, e.g. from `ms_ddpm.schedules.get_beta_schedule`.
        objective: what the network predicts, one of OBJECTIVES.
        variance_type: reverse-process variance sigma_t^2, "fixed_small" = beta_tilde_t or "fixed_large" = beta_t
            (Ho et al. Sec. 3.2: both gave similar samples; fixed_large is the better bound for x_0 ~ N(0, I)), or
            "learned_range": the network's second half v in [-1, 1] gives log sigma_t^2 = frac log beta_t +
            (1 - frac) log beta_tilde_t, frac = (v + 1) / 2 (Nichol & Dhariwal 2021, Eq. 15; their code's
            `LEARNED_RANGE`, the clipped log beta_tilde).
        clip_denoised: clip predicted x_0 to [-1, 1] when sampling, as the DDPM reference code does.
    """

    name = "ddpm"
    config_class = DDPMConfig
    default_sampler = "ddim"

    def __init__(self, betas, objective="eps", variance_type="fixed_small", clip_denoised=True):
        super().__init__(clip_denoised)
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not np.all((betas > 0) & (betas < 1)):
            raise ValueError("betas must be a 1-D array with every value in (0, 1)")
        self.objective = self.prediction = check_choice("objective", objective, OBJECTIVES)
        self.variance_type = check_choice("variance_type", variance_type, VARIANCE_TYPES)
        self.learned_variance = variance_type == "learned_range"
        self.num_timesteps = len(betas)

        # q(x_t | x_0), Eq. 4
        self.betas = betas
        self.alphas_cumprod = np.cumprod(1.0 - betas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        # q(x_{t-1} | x_t, x_0), Eqs. 6-7. beta_tilde_0 = 0, so its log is clipped to beta_tilde_1 (as in the
        # reference code): the value only enters the t = 0 term of the bound, which is a decoder term anyway.
        coef_x0, coef_xt, beta_tilde, _ = q_posterior_coefficients(self.alphas_cumprod, self.alphas_cumprod_prev)
        self.posterior_mean_coef1 = coef_x0
        self.posterior_mean_coef2 = coef_xt
        self.posterior_variance = beta_tilde
        self.posterior_log_variance_clipped = np.log(np.append(beta_tilde[1], beta_tilde[1:]))
        # p(x_{t-1} | x_t): sigma_t^2 (Sec. 3.2); fixed_large uses beta_tilde_1 at t = 0 for the same reason.
        # (learned_range: fixed_small's tables are the lower end of the range, `p_mean_variance` reads v)
        if variance_type in ("fixed_small", "learned_range"):
            self.model_variance = beta_tilde
            self.model_log_variance = self.posterior_log_variance_clipped
        else:
            self.model_variance = np.append(beta_tilde[1], betas[1:])
            self.model_log_variance = np.log(self.model_variance)

        # float32 copies for the training graph
        self._sqrt_alphas_cumprod = ms.Tensor(np.sqrt(self.alphas_cumprod), ms.float32)
        self._sqrt_one_minus_alphas_cumprod = ms.Tensor(np.sqrt(1.0 - self.alphas_cumprod), ms.float32)
        self._alphas_cumprod = ms.Tensor(self.alphas_cumprod, ms.float32)
        self._posterior_mean_coef1 = ms.Tensor(coef_x0, ms.float32)
        self._posterior_mean_coef2 = ms.Tensor(coef_xt, ms.float32)
        self._posterior_variance = ms.Tensor(beta_tilde, ms.float32)
        self._posterior_log_variance_clipped = ms.Tensor(self.posterior_log_variance_clipped, ms.float32)
        self._model_variance = ms.Tensor(self.model_variance, ms.float32)
        self._model_log_variance = ms.Tensor(self.model_log_variance, ms.float32)
        self._log_betas = ms.Tensor(np.log(betas), ms.float32)

    @classmethod
    def from_config(cls, settings, clip_denoised):
        betas = get_beta_schedule(settings.beta_schedule, settings.num_timesteps, settings.beta_start,
                                  settings.beta_end)
        return cls(betas, settings.objective, settings.variance_type, clip_denoised)

    @property
    def snr(self):
        """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t) per timestep, float64 (Kingma et al. 2021, Eq. 1)."""
        return self.alphas_cumprod / (1.0 - self.alphas_cumprod)

    @staticmethod
    def _extract(table, t, x):
        """table[t] for a (B,) integer tensor t, shaped (B, 1, ..., 1) to broadcast against x."""
        return ops.gather(table, t, 0).reshape((-1,) + (1,) * (x.ndim - 1))

    def q_sample(self, x_start, t, noise):
        """Draw x_t ~ q(x_t | x_0) in closed form (Eq. 4): sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps."""
        return (
            self._extract(self._sqrt_alphas_cumprod, t, x_start) * x_start
            + self._extract(self._sqrt_one_minus_alphas_cumprod, t, x_start) * noise
        )

    def training_target(self, x_start, t, noise):
        """The regression target for the network at (x_0, t, eps): eps, x_0 or v."""
        if self.objective == "eps":
            return noise
        if self.objective == "x0":
            return x_start
        return (
            self._extract(self._sqrt_alphas_cumprod, t, x_start) * noise
            - self._extract(self._sqrt_one_minus_alphas_cumprod, t, x_start) * x_start
        )

    def training_terms(self, x_start, t, noise):
        """(x_t, t, target, None): the network sees x_t and the integer timestep (Algorithm 1); no weight here
        (`ms_ddpm.losses.DiffusionLoss` applies the loss weighting)."""
        return self.q_sample(x_start, t, noise), t, self.training_target(x_start, t, noise), None

    # --- the sigma frame of Karras et al. 2022 (Table 1, VP column): x = x_t / sqrt(alpha_bar), s = sigma_t ------
    def ode_grid(self, num_steps, timestep_spacing, karras):
        """diffusers' Euler / Heun grids: "linspace" timesteps unrounded (their levels interpolated between training
        timesteps, `timestep_sigmas`), "leading" / "trailing" as `spaced_timesteps`; with `karras`, the N levels of
        Eq. 5 (rho 7) between the spacing's smallest and largest, each at its fractional timestep. A "leading"
        chain starts below the last training timestep, from N(0, sigma_max^2 + 1), as diffusers."""
        timesteps = spaced_timesteps(self.num_timesteps, num_steps, timestep_spacing, integer=False)
        levels = timestep_sigmas(self.alphas_cumprod, timesteps)
        if karras:
            levels = karras_sigmas(levels[-1], levels[0], num_steps)
            timesteps = sigma_timesteps(self.alphas_cumprod, levels)
        sigma_max = float(levels.max())
        init_noise_sigma = sigma_max if timestep_spacing != "leading" else (sigma_max**2 + 1.0) ** 0.5
        return timesteps, np.append(levels, 0.0), init_noise_sigma

    def level_time(self, level):
        return sigma_timesteps(self.alphas_cumprod, level)

    def denoiser(self, level):
        """x_t = alpha x with alpha = 1 / sqrt(s^2 + 1), sigma = s alpha; the network sees x_t (c_in = alpha)."""
        alpha = 1.0 / (level**2 + 1.0) ** 0.5
        c_skip, c_out = denoiser_coefficients(self.objective, alpha, level * alpha)
        return c_skip * alpha, c_out, alpha

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0) (Eqs. 6-7); t is a (B,) int tensor."""
        mean = (
            self._extract(self._posterior_mean_coef1, t, x_t) * x_start
            + self._extract(self._posterior_mean_coef2, t, x_t) * x_t
        )
        variance = self._extract(self._posterior_variance, t, x_t)
        log_variance = self._extract(self._posterior_log_variance_clipped, t, x_t)
        return mean, variance, log_variance

    def p_mean_variance(self, model_output, x_t, t):
        """Mean, variance, log-variance and predicted x_0 of p(x_{t-1} | x_t) from the network output.

        mu_theta(x_t, t) = mu_tilde_t(x_t, x0_hat) with x0_hat from `predict_x0` (Eq. 15 plugged into Eq. 7,
        which for the eps objective is Eq. 11), clipped to [-1, 1] when `clip_denoised`. A learned variance is read
        from the output's second half (`split_output`; Nichol & Dhariwal 2021, Eq. 15).
        """
        prediction, v = split_output(self, model_output)
        alpha_bar = self._extract(self._alphas_cumprod, t, x_t)
        alpha, sigma = vp_alpha_sigma(alpha_bar)
        x0_hat = predict_x0(self.objective, prediction, x_t, alpha, sigma)
        if self.clip_denoised:
            x0_hat = ops.clamp(x0_hat, -1.0, 1.0)
        mean, _, _ = self.q_posterior_mean_variance(x0_hat, x_t, t)
        if v is None:
            log_variance = self._extract(self._model_log_variance, t, x_t)
            return mean, self._extract(self._model_variance, t, x_t), log_variance, x0_hat
        frac = (v + 1.0) / 2.0
        log_variance = (frac * self._extract(self._log_betas, t, x_t)
                        + (1.0 - frac) * self._extract(self._posterior_log_variance_clipped, t, x_t))
        return mean, ops.exp(log_variance), log_variance, x0_hat
