"""DDIM sampling (Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models"; equation numbers refer to it).

Paper symbols -> code: alpha_t (the paper's alpha is DDPM's alpha_bar) -> alpha_bar_t; sigma_t -> std_dev_t;
eta -> eta; "direction pointing to x_t" -> direction.
"""
from mindspore import ops

from ..processes import predict_eps, split_output, vp_alpha_sigma
from .base import Sampler, SamplerOutput


class DDIMSampler(Sampler):
    """x_prev = sqrt(alpha_bar_prev) x0_hat + sqrt(1 - alpha_bar_prev - sigma_t^2) eps_hat + sigma_t z   (Eq. 12)

    with sigma_t = eta sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t)) sqrt(1 - alpha_bar_t / alpha_bar_prev) (Eq. 16):
    eta = 0 is the deterministic DDIM, eta = 1 matches DDPM's posterior variance.

    When the diffusion clips x0_hat to [-1, 1], `use_clipped_model_output` (the default) re-derives eps_hat from the
    clipped x0_hat, as improved-diffusion does, so that x0_hat and eps_hat describe the same x_t. With the network's
    own eps_hat beside a clipped x0_hat (diffusers' default, `use_clipped_model_output=False`), the two disagree
    wherever clipping acts, and the error grows with the number of steps: on the quick-start MNIST model DDIM's FD
    got worse from 20 to 50 steps, and 1,000 steps gave saturated blobs.
    """

    def __init__(self, diffusion, eta=0.0, timestep_spacing="leading", use_clipped_model_output=True):
        if not eta >= 0:
            raise ValueError(f"eta must be >= 0, got {eta!r}")
        super().__init__(diffusion, timestep_spacing)
        self.eta = float(eta)
        self.stochastic = self.eta > 0
        self.use_clipped_model_output = bool(use_clipped_model_output)

    def coefficients(self, timestep):
        """Host-side scalars of the step from `timestep`: (alpha_bar_t, sqrt(alpha_bar_prev), the coefficient of
        eps_hat, sigma_t), in float64."""
        # previous step and alphas (alpha_bar_prev = 1 after the last step: x_0 itself)
        prev = self.previous_timestep(timestep)
        alpha_bar_t, alpha_bar_prev = self.alpha_bar(timestep), self.alpha_bar(prev)
        # sigma_t(eta), Eq. 16
        variance = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev)
        std_dev_t = self.eta * variance**0.5
        # "direction pointing to x_t" coefficient, Eq. 12
        return alpha_bar_t, alpha_bar_prev**0.5, (1 - alpha_bar_prev - std_dev_t**2) ** 0.5, std_dev_t

    def update(self, model_output, sample, noise, alpha_bar_t, coef_x0, coef_eps, std_dev_t):
        """Eq. 12 given the scalars of `coefficients` (floats, or 0-d tensors inside a compiled step)."""
        x0_hat = self.predicted_x0(model_output, sample, alpha_bar_t)  # "predicted x_0", clipped
        alpha, sigma = vp_alpha_sigma(alpha_bar_t)
        if self.use_clipped_model_output and self.process.clip_denoised:
            eps_hat = predict_eps("x0", x0_hat, sample, alpha, sigma)  # the eps of x_t and the clipped x0_hat
        else:
            eps_hat = predict_eps(self.process.objective, split_output(self.process, model_output)[0], sample, alpha,
                                  sigma)
        prev_sample = coef_x0 * x0_hat + coef_eps * eps_hat
        if self.stochastic:  # random noise sigma_t z
            prev_sample = prev_sample + std_dev_t * noise
        return prev_sample, x0_hat

    def step(self, model_output, timestep, sample, noise=None):
        if self.stochastic and noise is None:
            noise = ops.randn_like(sample)
        return SamplerOutput(*self.update(model_output, sample, noise, *self.coefficients(timestep)))
