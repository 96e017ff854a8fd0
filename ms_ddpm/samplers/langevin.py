"""Annealed Langevin dynamics (Song & Ermon 2019, "Generative Modeling by Estimating Gradients of the Data
Distribution", Algorithm 1): the sampler of a noise-conditional score network on its noise levels
(`ms_ddpm.processes.ncsn`).
"""
import mindspore as ms
import numpy as np
from mindspore import ops

from ..processes import NoiseLevels
from .base import Sampler, SamplerOutput


class AnnealedLangevinSampler(Sampler):
    """Annealed Langevin dynamics (Algorithm 1), optionally with a final denoising step.

    For each level i = 1..L with step size alpha_i = eps sigma_i^2 / sigma_L^2, `n_steps_each` (the paper's T)
    Langevin steps
        x <- x + alpha_i / 2 s(x, sigma_i) + sqrt(alpha_i) z
    then, with `final_denoise`, x <- x + sigma_L^2 s(x, sigma_L): the posterior mean E[x_0 | x] by Tweedie's formula
    (Song & Ermon 2020, "Improved Techniques", Appendix; Jolicoeur-Martineau et al. 2021), which removes the
    sigma_L noise left by the last level.

    Interface: the model output is the score; `self.timesteps` are the level indices handed to the network, each
    repeated n_steps_each times (and L - 1 once more for the denoising step); `set_timesteps(n)` sets n_steps_each.
    x_T ~ N(0, sigma_1^2 I) (the VE prior; the paper starts from uniform noise). `step` keeps a call counter:
    call the steps in order, as `sample` does; `set_timesteps` or `sample` resets it.

    Args:
        noise_levels: a `NoiseLevels` process (a `VESDE` is one), or its (L,) sigmas, largest first.
        step_lr: eps of Algorithm 1, > 0 (paper: 2e-5 with sigmas 1 .. 0.01).
        n_steps_each: Langevin steps per level, >= 1 (paper: 100).
        final_denoise: add the denoising step at sigma_L.
    """

    processes = ("ncsn",)
    stochastic = True

    def __init__(self, noise_levels, step_lr=2e-5, n_steps_each=100, final_denoise=True):
        if not isinstance(noise_levels, NoiseLevels):
            noise_levels = NoiseLevels(noise_levels)
        if not step_lr > 0:
            raise ValueError(f"step_lr must be > 0, got {step_lr!r}")
        self.sigmas = noise_levels.sigmas
        self.step_lr = float(step_lr)
        self.final_denoise = bool(final_denoise)
        super().__init__(noise_levels, num_inference_steps=n_steps_each)

    def set_timesteps(self, n_steps_each):
        """Set the Langevin steps per level (Algorithm 1's T) and the call list `self.timesteps`."""
        if not isinstance(n_steps_each, (int, np.integer)) or n_steps_each < 1:
            raise ValueError(f"n_steps_each must be an integer >= 1, got {n_steps_each!r}")
        self.n_steps_each = int(n_steps_each)
        levels = np.arange(len(self.sigmas))
        calls = np.repeat(levels, self.n_steps_each)
        self.timesteps = np.append(calls, levels[-1]) if self.final_denoise else calls
        self.num_inference_steps = len(self.timesteps)
        self._step_index = 0

    def add_noise(self, original_samples, noise, timesteps):
        """x + sigma_i z for a (B,) int tensor of level indices (the perturbation NCSN is trained on)."""
        sigma = self.sigmas[timesteps.asnumpy()].astype(np.float32).reshape((-1,) + (1,) * (noise.ndim - 1))
        return original_samples + ms.Tensor(sigma) * noise

    def step(self, model_output, timestep, sample, noise=None):
        k = self._step_index
        self._check_call(timestep, int(self.timesteps[k]) if k < len(self.timesteps) else None)
        self._step_index += 1
        sigma = float(self.sigmas[timestep])
        x0_hat = sample + sigma**2 * model_output  # Tweedie: E[x | x + sigma z]
        # 1. final denoising step x + sigma_L^2 s(x, sigma_L)
        if self.final_denoise and k == len(self.timesteps) - 1:
            return SamplerOutput(x0_hat, x0_hat)
        # 2. Langevin step at level i with alpha_i = eps sigma_i^2 / sigma_L^2 (Algorithm 1, lines 3-6)
        alpha = self.step_lr * sigma**2 / float(self.sigmas[-1]) ** 2
        noise = ops.randn_like(sample) if noise is None else noise
        prev_sample = sample + (alpha / 2) * model_output + float(np.sqrt(alpha)) * noise
        return SamplerOutput(prev_sample, x0_hat)

