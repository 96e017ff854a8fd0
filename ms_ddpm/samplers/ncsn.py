"""Noise-conditional score networks (Song & Ermon 2019, "Generative Modeling by Estimating Gradients of the Data
Distribution"; equation and algorithm numbers refer to it).

A score network s(x, sigma_i) is trained on the perturbed data x + sigma_i z at L noise levels
sigma_1 > ... > sigma_L (a geometric sequence) and sampled with annealed Langevin dynamics.

Conditioning: the network sees the level *index* i (0-based, 0 = sigma_max) as its "timestep" input, as the
NCSN code's `labels`. The U-Nets of `ms_ddpm.models` embed any real timestep sinusoidally, so a DDPM U-Net serves
as an NCSN unchanged; the same index drives the VE SDE samplers (`sde.VESDE` uses these sigmas, in this order).

Training from a config: `diffusion.process: ncsn` (configs/ncsn_mnist5k_cpu.yaml; `ms_ddpm.train.trainer`).
"""
import mindspore as ms
import numpy as np
from mindspore import nn, ops

from .base import Sampler, SamplerOutput


def geometric_sigmas(sigma_max, sigma_min, L):
    """(L,) float64 noise levels sigma_max = sigma_1 > ... > sigma_L = sigma_min with a constant ratio (Sec. 4.2)."""
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    if not isinstance(L, (int, np.integer)) or L < 2:
        raise ValueError(f"the number of noise levels must be an integer >= 2, got {L!r}")
    return np.exp(np.linspace(np.log(sigma_max), np.log(sigma_min), L))


class NCSNLoss(nn.Cell):
    """Denoising score matching over all noise levels with lambda(sigma) = sigma^2 (Eqs. 5-6):

        loss = 1/2 E_{i, x, z} || sigma_i s(x + sigma_i z, i) + z ||^2

    (Eq. 5's target -(x_tilde - x) / sigma^2 = -z / sigma, times lambda = sigma^2). The norm sums over pixels,
    the expectation averages over the batch, as the NCSN code's `anneal_dsm_score_estimation`.

    construct(x, labels, noise): x (B, C, H, W) data, labels (B,) int32 level indices drawn uniformly from [0, L),
    noise (B, C, H, W) standard normal; returns the scalar loss. labels and noise come from the caller, as in
    `DiffusionLoss`, so a run is reproducible from one host RNG.

    Args:
        network: callable (x, labels) -> score estimate of x's shape.
        sigmas: (L,) noise levels, largest first (e.g. `geometric_sigmas`).
    """

    def __init__(self, network, sigmas):
        super().__init__(auto_prefix=False)
        self.network = network
        self.sigmas = ms.Tensor(np.asarray(sigmas, dtype=np.float64), ms.float32)

    def construct(self, x, labels, noise):
        sigma = ops.gather(self.sigmas, labels, 0).reshape((-1,) + (1,) * (x.ndim - 1))
        score = self.network(x + sigma * noise, labels).astype(ms.float32)
        residual = sigma * score + noise
        return 0.5 * (residual * residual).reshape(x.shape[0], -1).sum(1).mean()


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
        noise_levels: (L,) sigmas, largest first, or an object with such a `.sigmas` (a `VESDE`).
        step_lr: eps of Algorithm 1, > 0 (paper: 2e-5 with sigmas 1 .. 0.01).
        n_steps_each: Langevin steps per level, >= 1 (paper: 100).
        final_denoise: add the denoising step at sigma_L.
    """

    def __init__(self, noise_levels, step_lr=2e-5, n_steps_each=100, final_denoise=True):
        sigmas = np.asarray(getattr(noise_levels, "sigmas", noise_levels), dtype=np.float64)
        if sigmas.ndim != 1 or len(sigmas) < 1 or not np.all(sigmas > 0) or np.any(np.diff(sigmas) >= 0):
            raise ValueError("noise levels must be a 1-D array of positive sigmas in decreasing order")
        if not step_lr > 0:
            raise ValueError(f"step_lr must be > 0, got {step_lr!r}")
        self.diffusion = None
        self.sigmas = sigmas
        self.step_lr = float(step_lr)
        self.final_denoise = bool(final_denoise)
        self.num_train_timesteps = len(sigmas)
        self.init_noise_sigma = float(sigmas[0])
        self.set_timesteps(n_steps_each)

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
        if k >= len(self.timesteps) or int(self.timesteps[k]) != timestep:
            raise ValueError(f"step called out of order: call {k} got level {timestep} (call set_timesteps to restart)")
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

