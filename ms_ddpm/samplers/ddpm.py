"""DDPM ancestral sampling (Ho et al. 2020, Algorithm 2), also on a strided subset of the timesteps."""
import numpy as np
from mindspore import ops

from ..processes import q_posterior_coefficients, split_output
from .base import Sampler, SamplerOutput


class DDPMSampler(Sampler):
    """x_{t-1} = mu_tilde(x_t, x0_hat) + sigma_t z, z ~ N(0, I), with sigma_t^2 from `diffusion.variance_type`.

    With fewer inference steps than training steps the chain jumps from t to prev = the next visited timestep,
    using the respaced beta = 1 - alpha_bar_t / alpha_bar_prev (Nichol & Dhariwal 2021, Sec. 4), as diffusers does.
    A learned variance (`learned_range`) interpolates log sigma_t^2 between the jump's log beta_tilde (floored at
    1e-20) and log beta by the network's v: frac = (v + 1) / 2 (their Eq. 15), as diffusers' `DDPMScheduler`.
    """

    def coefficients(self, timestep):
        """Host-side scalars of the step from `timestep`, in float64: (alpha_bar_t, coef_x0, coef_xt, sigma_t,
        min_log, max_log); with a learned variance sigma_t is 1 or 0 (noise or none) and min_log, max_log bound the
        log-variance, else they are 0 and unused."""
        # alphas and betas of the jump t -> prev (alpha_bar_prev = 1 after the last step)
        prev = self.previous_timestep(timestep)
        alpha_bar_t, alpha_bar_prev = self.alpha_bar(timestep), self.alpha_bar(prev)
        coef_x0, coef_xt, beta_tilde, beta = q_posterior_coefficients(alpha_bar_t, alpha_bar_prev)
        # sigma_t of Algorithm 2, line 4; no noise on the final step to x_0
        if self.process.learned_variance:
            return (alpha_bar_t, float(coef_x0), float(coef_xt), float(timestep > 0),
                    float(np.log(max(beta_tilde, 1e-20))), float(np.log(beta)))
        variance = beta_tilde if self.process.variance_type == "fixed_small" else beta
        sigma = float(np.sqrt(max(variance, 1e-20))) if timestep > 0 else 0.0
        return alpha_bar_t, float(coef_x0), float(coef_xt), sigma, 0.0, 0.0

    def update(self, model_output, sample, noise, alpha_bar_t, coef_x0, coef_xt, sigma, min_log, max_log):
        """x_prev from the scalars of `coefficients` (floats, or 0-d tensors inside a compiled step)."""
        # predicted x_0 (Eq. 15 for eps), clipped to [-1, 1]
        x0_hat = self.predicted_x0(model_output, sample, alpha_bar_t)
        _, v = split_output(self.process, model_output)
        if v is not None:  # sigma_t = exp(log sigma_t^2 / 2), the log-variance between min_log and max_log
            frac = (v + 1.0) / 2.0
            sigma = sigma * ops.exp(0.5 * (frac * max_log + (1.0 - frac) * min_log))
        # posterior mean mu_tilde_t(x_t, x0_hat) (Eq. 7) plus sigma_t z
        return coef_x0 * x0_hat + coef_xt * sample + sigma * noise, x0_hat

    def step(self, model_output, timestep, sample, noise=None):
        noise = ops.randn_like(sample) if noise is None else noise
        return SamplerOutput(*self.update(model_output, sample, noise, *self.coefficients(timestep)))
