"""Noise processes: how data are noised in training and what the samplers reverse.

    gaussian.py  the DDPM chain (Ho et al. 2020): `GaussianDiffusion`, its posterior, the eps / x0 / v conversions
    sde.py       the score SDEs (Song et al. 2021): `VPSDE`, `SubVPSDE`, `VESDE`, and `as_sde`
    ncsn.py      NCSN's noise levels (Song & Ermon 2019): `geometric_sigmas`, `NoiseLevels`

The interface every process offers the samplers (`ms_ddpm.samplers.Sampler` reads nothing else in common):
    num_timesteps   the number of discrete labels ("timesteps", noise levels) the network is trained on
    prior_std       standard deviation of the prior x_T ~ N(0, prior_std^2 I) sampling starts from
    clip_denoised   whether the samplers clip the network's x_0 to [-1, 1]
    objective       what the network outputs: "eps" / "x0" / "v" (Gaussian chains), "score" (NCSN, VE)

`create_process(cfg.diffusion, latent)` builds the process a run config trains on.
"""
from ..schedules import get_beta_schedule
from .gaussian import OBJECTIVES, VARIANCE_TYPES, GaussianDiffusion, predict_eps, predict_x0, q_posterior_coefficients
from .ncsn import NoiseLevels, geometric_sigmas
from .sde import VESDE, VPSDE, SubVPSDE, as_sde


def create_process(diffusion_cfg, latent=False):
    """The noise process of a `DiffusionConfig`: a `GaussianDiffusion` for process "ddpm"; for "ncsn" the `VESDE`
    whose L discrete levels are NCSN's geometric sigmas, largest first (`.sigmas`), the levels both `NCSNLoss` and
    the NCSN samplers take. `latent`: whether the process runs in an autoencoder's latent space, where
    `clip_denoised` None means no clipping (in pixel space it means clipping to the data's [-1, 1])."""
    d = diffusion_cfg
    if d.process == "ncsn":
        return VESDE(d.sigma_min, d.sigma_max, d.num_noise_levels)
    betas = get_beta_schedule(d.beta_schedule, d.num_timesteps, d.beta_start, d.beta_end)
    clip = (not latent) if d.clip_denoised is None else d.clip_denoised
    return GaussianDiffusion(betas, objective=d.objective, variance_type=d.variance_type, clip_denoised=clip)


__all__ = ["GaussianDiffusion", "OBJECTIVES", "VARIANCE_TYPES", "predict_eps", "predict_x0", "q_posterior_coefficients",
           "NoiseLevels", "geometric_sigmas", "VPSDE", "SubVPSDE", "VESDE", "as_sde", "create_process"]
