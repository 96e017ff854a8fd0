"""The SDEs of score-based generative modelling (Song et al. 2021, "Score-Based Generative Modeling through Stochastic
Differential Equations"; equation numbers refer to it), indexed by the discrete labels a network is trained on.

Forward SDE            dx = f(x, t) dt + g(t) dw                                                    (Eq. 5)

All three SDEs here have a linear drift f(x, t) = f(t) x and a Gaussian marginal p_t(x | x_0) = N(m(t) x_0, s(t)^2 I):

| SDE     | f(t)         | g(t)^2                                   | m(t), s(t)                         | Eqs.      |
| ------- | ------------ | ---------------------------------------- | ---------------------------------- | --------- |
| VP      | -beta(t) / 2 | beta(t)                                  | sqrt(alpha_bar), sqrt(1-alpha_bar) | 11, 32-33 |
| sub-VP  | -beta(t) / 2 | beta(t) (1 - exp(-2 int_0^t beta))       | sqrt(alpha_bar), 1 - alpha_bar     | 34        |
| VE      | 0            | d[sigma^2]/dt = 2 sigma(t)^2 log(sigma_max / sigma_min) | 1, sigma(t)         | 9, 30-31  |

with alpha_bar(t) = exp(-int_0^t beta(s) ds) and sigma(t) = sigma_min (sigma_max / sigma_min)^t.

Discrete labels. The networks are trained on discrete noise levels, so every SDE here is indexed by the integer
label the network sees ("timestep"), and maps it to continuous time t:
    VP / sub-VP (a DDPM eps-network, labels n in [0, T), larger = noisier):  t_n = (n + 1) / T, so t covers (0, 1]
        in steps of 1/T and the data x_0 sits at t = 0. Step n of the DDPM chain covers (n/T, (n+1)/T], on which
        beta(t) is constant, = -T log(1 - beta_n) (= T beta_n to first order, the convention of Song's
        `VPSDE.discretize`); this choice makes exp(-int_0^{t_n} beta) equal the DDPM alpha_bar_n exactly, so the
        network's noise level matches the SDE's at every label.
    VE (an NCSN score network, labels i in [0, N), Song & Ermon's order: sigma_0 = sigma_max > ... > sigma_{N-1} =
        sigma_min): t_i = 1 - i / (N - 1), so sigma(t_i) = sigmas[i]; "after the last level" (the data) is one more
        uniform step, t = -1 / (N - 1), as in Song's samplers, which step dt = -1/N down from t = 1.
The label `None` stands for the data end of the chain throughout.

What the network outputs: for VP, anything `GaussianDiffusion` supports (eps, x0, v), turned into eps; the score is
    s(x, t) = -eps(x, t) / s(t)                                         (the denoising identity behind Eq. 19)
For sub-VP an eps-network for sub-VP's own s(t) = 1 - alpha_bar; for VE the score itself (NCSN, `ncsn.py`).

The samplers of these SDEs are in `ms_ddpm.samplers.score_sde`.
"""
import numpy as np
from mindspore import ops

from ..schedules import spaced_timesteps
from ..utils import check_choice
from .base import Process, predict_eps, predict_x0, split_output
from .gaussian import OBJECTIVES, GaussianDiffusion, vp_alpha_sigma
from .ncsn import NCSNConfig, NoiseLevels, geometric_sigmas


class VPSDE(Process):
    """Variance-preserving SDE of a DDPM chain with betas (T,): dx = -1/2 beta(t) x dt + sqrt(beta(t)) dw (Eq. 11).

    Args:
        betas: (T,) forward-process variances of the discrete chain (Ho et al. 2020).
        objective: what the network predicts ("eps", "x0" or "v", as in `GaussianDiffusion`).
        clip_denoised: clip the x_0 the samplers report (`denoised`) to [-1, 1], as the diffusion it comes from.
    """

    name = "vp_sde"

    def __init__(self, betas, objective="eps", clip_denoised=False):
        super().__init__(clip_denoised)
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not np.all((betas > 0) & (betas < 1)):
            raise ValueError("betas must be a 1-D array with every value in (0, 1)")
        self.objective = self.prediction = check_choice("objective", objective, OBJECTIVES)
        self.num_timesteps = len(betas)
        self.betas = betas
        self.alphas_cumprod = np.cumprod(1.0 - betas)
        # beta(t) on (n/T, (n+1)/T]: the rate whose integral over the step is -log(1 - beta_n) (see module doc)
        self.continuous_betas = -self.num_timesteps * np.log1p(-betas)

    @classmethod
    def from_diffusion(cls, diffusion):
        """The SDE of a `GaussianDiffusion`, reading its network output as the diffusion's objective (a
        learned-variance network's prediction half: `split_output`)."""
        sde = cls(diffusion.betas, diffusion.objective, diffusion.clip_denoised)
        sde.learned_variance = diffusion.learned_variance
        return sde

    def labels(self, num_steps, spacing):
        """Descending DDPM timesteps (noisiest first), spaced as `spaced_timesteps`."""
        return spaced_timesteps(self.num_timesteps, num_steps, spacing)

    def time(self, label):
        """Continuous t of a label: t_n = (n + 1) / T; None (the data) -> 0."""
        return 0.0 if label is None else (label + 1) / self.num_timesteps

    def alpha_bar(self, label):
        return 1.0 if label is None else float(self.alphas_cumprod[label])

    def marginal(self, label):
        """(m, s) of p_t(x | x_0) = N(m x_0, s^2 I) at a label (Eq. 33)."""
        alpha_bar = self.alpha_bar(label)
        return alpha_bar**0.5, (1.0 - alpha_bar) ** 0.5

    def coefficients(self, label):
        """(f(t), g(t)^2) at a label's time: drift f(t) x and squared diffusion (Eq. 11)."""
        beta = float(self.continuous_betas[label])
        return -0.5 * beta, beta

    def discretize(self, label, next_label):
        """(F, G^2) of the discrete forward step next_label -> label, x_label = (1 + F) x_next + G z: Song's
        `VPSDE.discretize` (the DDPM step, F = sqrt(1 - beta) - 1, G^2 = beta), with beta = 1 - alpha_bar_label /
        alpha_bar_next the beta of the strided chain when labels are skipped (as `DDPMSampler`)."""
        beta = 1.0 - self.alpha_bar(label) / self.alpha_bar(next_label)
        return (1.0 - beta) ** 0.5 - 1.0, beta

    def langevin_alpha(self, label):
        """alpha_i of the Langevin corrector (Algorithm 5): 1 - beta_i, as Song's `LangevinCorrector`."""
        return 1.0 - float(self.betas[label])

    def score(self, model_output, x, label):
        """grad_x log p_t(x) = -eps / s(t), eps from the network output via `predict_eps`."""
        alpha_bar = self.alpha_bar(label)
        eps = predict_eps(self.objective, split_output(self, model_output)[0], x, *vp_alpha_sigma(alpha_bar))
        return eps * (-1.0 / (1.0 - alpha_bar) ** 0.5)

    def denoised(self, model_output, x, label):
        """x0_hat = E[x_0 | x_t] implied by the network output (`predict_x0`), clipped when `clip_denoised`."""
        x0 = predict_x0(self.objective, split_output(self, model_output)[0], x, *vp_alpha_sigma(self.alpha_bar(label)))
        return ops.clamp(x0, -1.0, 1.0) if self.clip_denoised else x0


class SubVPSDE(VPSDE):
    """sub-VP SDE: dx = -1/2 beta(t) x dt + sqrt(beta(t) (1 - exp(-2 int_0^t beta))) dw (Eq. 34).

    Its marginal std is 1 - alpha_bar(t), below VP's sqrt(1 - alpha_bar(t)) (Eq. 35), so a DDPM eps-network does not
    fit it: the network must predict eps for this std (objective "eps" only).
    """

    name = "subvp_sde"

    def __init__(self, betas, objective="eps"):
        if objective != "eps":
            raise ValueError(f"SubVPSDE needs an eps-network (objective must be one of ['eps']), got {objective!r}")
        super().__init__(betas, objective)

    def marginal(self, label):
        alpha_bar = self.alpha_bar(label)
        return alpha_bar**0.5, 1.0 - alpha_bar

    def coefficients(self, label):
        beta = float(self.continuous_betas[label])
        return -0.5 * beta, beta * (1.0 - float(self.alphas_cumprod[label]) ** 2)

    def discretize(self, label, next_label):
        """Euler-Maruyama discretisation F = f dt, G^2 = g^2 dt (Song's generic `SDE.discretize`)."""
        dt = self.time(label) - self.time(next_label)
        f, g2 = self.coefficients(label)
        return f * dt, g2 * dt

    def score(self, model_output, x, label):
        return model_output * (-1.0 / (1.0 - self.alpha_bar(label)))

    def denoised(self, model_output, x, label):
        """x0_hat = (x_t + s^2 score) / m (Tweedie's formula)."""
        return tweedie_denoised(self, model_output, x, label)


class VESDE(NoiseLevels):
    """Variance-exploding SDE dx = sqrt(d[sigma^2(t)]/dt) dw, sigma(t) = sigma_min (sigma_max/sigma_min)^t (Eq. 30).

    Its N discrete levels are NCSN's geometric sigmas (Song & Ermon 2019), largest first: it is the `NoiseLevels`
    process of an NCSN trained with `DiffusionLoss` on `sde.sigmas` (label = level index), seen in continuous time. The
    network output is the score.

    Args:
        sigma_min, sigma_max: smallest and largest noise level, 0 < sigma_min < sigma_max (Song's CIFAR-10: 0.01, 50).
        N: number of discrete levels, >= 2.
    """

    config_class = NCSNConfig  # diffusion.process ncsn builds its VESDE
    default_sampler = "ald"

    def __init__(self, sigma_min=0.01, sigma_max=50.0, N=1000):
        super().__init__(geometric_sigmas(sigma_max, sigma_min, N))
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)

    @classmethod
    def from_config(cls, settings, clip_denoised):
        return cls(settings.sigma_min, settings.sigma_max, settings.num_noise_levels)

    def labels(self, num_steps, spacing):
        """Ascending level indices (noisiest first): N - 1 - the spaced DDPM-style timesteps."""
        return self.num_timesteps - 1 - spaced_timesteps(self.num_timesteps, num_steps, spacing)

    def time(self, label):
        """t_i = 1 - i / (N - 1); None (the data) is one uniform step beyond sigma_min."""
        last = self.num_timesteps - 1
        return -1.0 / last if label is None else 1.0 - label / last

    def marginal(self, label):
        """(m, s) = (1, sigma_i) (Eq. 31 with sigma_min^2 neglected, as NCSN does)."""
        return 1.0, self.sigma(label)

    def coefficients(self, label):
        return 0.0, 2.0 * float(np.log(self.sigma_max / self.sigma_min)) * self.sigma(label) ** 2

    def discretize(self, label, next_label):
        """F = 0, G^2 = sigma_i^2 - sigma_next^2: the SMLD chain (Eq. 8; Song's `VESDE.discretize`)."""
        return 0.0, self.sigma(label) ** 2 - self.sigma(next_label) ** 2

    def langevin_alpha(self, label):
        return 1.0

    def score(self, model_output, x, label):
        return model_output

    def denoised(self, model_output, x, label):
        """x0_hat = (x_t + s^2 score) / m (Tweedie's formula)."""
        return tweedie_denoised(self, model_output, x, label)


def tweedie_denoised(sde, model_output, x, label):
    """x0_hat = E[x_0 | x_t] = (x_t + s^2 score) / m (Tweedie's formula), from `sde`'s score and marginal."""
    m, s = sde.marginal(label)
    return (x + s**2 * sde.score(model_output, x, label)) * (1.0 / m)


def as_sde(process):
    """The SDE of `process`: a `GaussianDiffusion` gives its `VPSDE`; an SDE instance is returned as is."""
    if isinstance(process, GaussianDiffusion):
        return VPSDE.from_diffusion(process)
    if isinstance(process, (VPSDE, VESDE)):
        return process
    raise ValueError(f"process must be a GaussianDiffusion, VPSDE, SubVPSDE or VESDE, got {type(process).__name__}")
