"""DDPM ancestral sampling (Ho et al. 2020, Algorithm 2), also on a strided subset of the timesteps."""
import numpy as np
from mindspore import ops

from ..diffusion import q_posterior_coefficients
from .base import Sampler, SamplerOutput


class DDPMSampler(Sampler):
    """x_{t-1} = mu_tilde(x_t, x0_hat) + sigma_t z, z ~ N(0, I), with sigma_t^2 from `diffusion.variance_type`.

    With fewer inference steps than training steps the chain jumps from t to prev = the next visited timestep,
    using the respaced beta = 1 - alpha_bar_t / alpha_bar_prev (Nichol & Dhariwal 2021, Sec. 4), as diffusers does.
    """

    def step(self, model_output, timestep, sample, noise=None):
        # 1. alphas and betas of the jump t -> prev (alpha_bar_prev = 1 after the last step)
        prev = self.previous_timestep(timestep)
        alpha_bar_t, alpha_bar_prev = self.alpha_bar(timestep), self.alpha_bar(prev)
        coef_x0, coef_xt, beta_tilde, beta = q_posterior_coefficients(alpha_bar_t, alpha_bar_prev)
        # 2.-3. predicted x_0 (Eq. 15 for eps), clipped to [-1, 1]
        x0_hat = self.predicted_x0(model_output, sample, alpha_bar_t)
        # 4.-5. posterior mean mu_tilde_t(x_t, x0_hat) (Eq. 7)
        prev_sample = float(coef_x0) * x0_hat + float(coef_xt) * sample
        # 6. add sigma_t z (Algorithm 2, line 4); no noise on the final step to x_0
        if timestep > 0:
            variance = beta_tilde if self.diffusion.variance_type == "fixed_small" else beta
            noise = ops.randn_like(sample) if noise is None else noise
            prev_sample = prev_sample + float(np.sqrt(max(variance, 1e-20))) * noise
        return SamplerOutput(prev_sample, x0_hat)
