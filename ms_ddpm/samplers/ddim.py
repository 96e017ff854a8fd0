"""DDIM sampling (Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models"; equation numbers refer to it).

Paper symbols -> code: alpha_t (the paper's alpha is DDPM's alpha_bar) -> alpha_bar_t; sigma_t -> std_dev_t;
eta -> eta; "direction pointing to x_t" -> direction.
"""
from mindspore import ops

from ..diffusion import predict_eps
from .base import Sampler, SamplerOutput


class DDIMSampler(Sampler):
    """x_prev = sqrt(alpha_bar_prev) x0_hat + sqrt(1 - alpha_bar_prev - sigma_t^2) eps_hat + sigma_t z   (Eq. 12)

    with sigma_t = eta sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t)) sqrt(1 - alpha_bar_t / alpha_bar_prev) (Eq. 16):
    eta = 0 is the deterministic DDIM, eta = 1 matches DDPM's posterior variance.
    eps_hat is the network's own prediction, not re-derived from the clipped x0_hat (diffusers' default).
    """

    def __init__(self, diffusion, eta=0.0, timestep_spacing="leading"):
        if not eta >= 0:
            raise ValueError(f"eta must be >= 0, got {eta!r}")
        super().__init__(diffusion, timestep_spacing)
        self.eta = float(eta)
        self.stochastic = self.eta > 0

    def step(self, model_output, timestep, sample, noise=None):
        # 1. previous step and alphas (alpha_bar_prev = 1 after the last step: x_0 itself)
        prev = self.previous_timestep(timestep)
        alpha_bar_t, alpha_bar_prev = self.alpha_bar(timestep), self.alpha_bar(prev)
        # 2. predicted x_0, "predicted x_0" term of Eq. 12, clipped; and the network's eps
        x0_hat = self.predicted_x0(model_output, sample, alpha_bar_t)
        eps_hat = predict_eps(self.diffusion.objective, model_output, sample, alpha_bar_t)
        # 3. sigma_t(eta), Eq. 16
        variance = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev)
        std_dev_t = self.eta * variance**0.5
        # 4. "direction pointing to x_t" and x_prev without noise, Eq. 12
        direction = (1 - alpha_bar_prev - std_dev_t**2) ** 0.5 * eps_hat
        prev_sample = alpha_bar_prev**0.5 * x0_hat + direction
        # 5. random noise sigma_t z
        if self.eta > 0:
            noise = ops.randn_like(sample) if noise is None else noise
            prev_sample = prev_sample + std_dev_t * noise
        return SamplerOutput(prev_sample, x0_hat)
