"""NCSN's noise process (Song & Ermon 2019, "Generative Modeling by Estimating Gradients of the Data Distribution";
equation numbers refer to it): the data perturbed by Gaussian noise x + sigma_i z at L levels sigma_1 > ... > sigma_L,
a geometric sequence (Sec. 4.2).

Conditioning: the network sees the level *index* i (0-based, 0 = sigma_max) as its "timestep" input, as the NCSN
code's `labels`. The U-Nets of `ms_ddpm.models` embed any real timestep sinusoidally, so a DDPM U-Net serves as an
NCSN unchanged. The same levels, in the same order, are the discretisation of the VE SDE (`sde.VESDE`, Song et al.
2021, Sec. 3.4 and Eq. 9), so its samplers drive an NCSN too. Training from a config: `diffusion.process: ncsn`
(configs/ncsn_mnist5k_cpu.yaml), the loss `ms_ddpm.losses.DiffusionLoss` (Eqs. 5-6 through
`NoiseLevels.training_terms`), the sampler `ms_ddpm.samplers.AnnealedLangevinSampler`.
"""
from dataclasses import dataclass

import mindspore as ms
import numpy as np

from .base import Process, per_sample


@dataclass
class NCSNConfig:
    """diffusion keys of process ncsn. The paper's MNIST levels sigma_1 = 1 > ... > sigma_10 = 0.01 and Langevin step
    eps = 2e-5 (Sec. 5) are for images in [0, 1]; ours are in [-1, 1], twice as wide, so the sigmas double and eps,
    which sets alpha_i = eps sigma_i^2 / sigma_L^2 in units of squared distance, quadruples: the same dynamics,
    rescaled."""

    sigma_max: float = 2.0  # sigma_1, the largest noise level (paper: 1 for [0, 1] images)
    sigma_min: float = 0.02  # sigma_L, the smallest (paper: 0.01 for [0, 1] images)
    num_noise_levels: int = 10  # L, geometric sequence from sigma_max to sigma_min (paper: 10)
    langevin_step_lr: float = 8.0e-5  # eps of annealed Langevin dynamics, Algorithm 1 (paper: 2e-5 for [0, 1])


def geometric_sigmas(sigma_max, sigma_min, L):
    """(L,) float64 noise levels sigma_max = sigma_1 > ... > sigma_L = sigma_min with a constant ratio (Sec. 4.2)."""
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    if not isinstance(L, (int, np.integer)) or L < 2:
        raise ValueError(f"the number of noise levels must be an integer >= 2, got {L!r}")
    return np.exp(np.linspace(np.log(sigma_max), np.log(sigma_min), L))


class NoiseLevels(Process):
    """Noise levels sigma_0 > ... > sigma_{L-1} (any decreasing positive sequence; NCSN's are `geometric_sigmas`):
    the process x_i = x + sigma_i z that annealed Langevin dynamics reverses.

    The process interface every sampler reads (see `ms_ddpm.processes`): `num_timesteps` = L labels, the prior
    std sigma_0 (x_T ~ N(0, sigma_0^2 I), the VE prior), no clipping of the network's x_0.

    Args:
        sigmas: (L,) noise levels, largest first.
    """

    name = "ncsn"
    objective = prediction = "score"  # the network output is the score s(x, sigma_i) itself

    def __init__(self, sigmas):
        super().__init__()
        sigmas = np.asarray(sigmas, dtype=np.float64)
        if sigmas.ndim != 1 or len(sigmas) < 1 or not np.all(sigmas > 0) or np.any(np.diff(sigmas) >= 0):
            raise ValueError("noise levels must be a 1-D array of positive sigmas in decreasing order")
        self.sigmas = sigmas
        self.num_timesteps = len(sigmas)
        self.prior_std = float(sigmas[0])
        self._sigmas = ms.Tensor(sigmas, ms.float32)  # for the training graph

    def training_terms(self, x, labels, noise):
        """Denoising score matching with lambda(sigma) = sigma^2 (Eqs. 5-6): the score's target at x + sigma_i z is
        -z / sigma_i; the weight sigma_i^2 / 2, times C H W since the loss sums over pixels (NCSN's
        `anneal_dsm_score_estimation`) where `DiffusionLoss` averages. Level indices uniform in [0, L) (Eq. 6)."""
        sigma = ms.ops.gather(self._sigmas, labels, 0)
        sigma_b = per_sample(sigma, x)
        size = x.shape[1] * x.shape[2] * x.shape[3]
        return x + sigma_b * noise, labels, -noise / sigma_b, (0.5 * size) * sigma * sigma

    def sigma(self, label):
        """sigma_i of level `label`; 0 for None (the data)."""
        return 0.0 if label is None else float(self.sigmas[label])
