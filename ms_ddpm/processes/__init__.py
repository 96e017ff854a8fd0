"""Noise processes: how data are noised in training and what the samplers reverse.

    base.py      the protocol every process offers (`Process`) and the conversions between eps, x0, v, score and
                 velocity, written once in alpha and sigma (`predict_x0`, `predict_eps`)
    gaussian.py  the DDPM chain (Ho et al. 2020): `GaussianDiffusion`, its posterior
    sde.py       the score SDEs (Song et al. 2021): `VPSDE`, `SubVPSDE`, `VESDE`, and `as_sde`
    ncsn.py      NCSN's noise levels (Song & Ermon 2019): `geometric_sigmas`, `NoiseLevels`
    edm.py       EDM (Karras et al. 2022): `EDM`, its preconditioning and log-normal sigmas
    flow.py      rectified flow / flow matching (Liu et al. 2022; Esser et al. 2024): `RectifiedFlow`
    consistency.py  consistency models (Song et al. 2023): `ConsistencyModel`, the boundary-condition parametrisation

The registry `PROCESSES` maps each `diffusion.process` to its class, which owns its config keys (`config_class`),
its loss target (`training_terms`) and its default sampler; each sampler names the processes it runs
(`ms_ddpm.samplers`). `create_process(cfg.diffusion, latent)` builds the process a run config trains on.
"""
from .base import PREDICTIONS, Process, predict_eps, predict_x0, split_output
from .consistency import ConsistencyConfig, ConsistencyModel
from .edm import EDM, EDMConfig
from .flow import FlowConfig, RectifiedFlow
from .gaussian import (OBJECTIVES, VARIANCE_TYPES, DDPMConfig, GaussianDiffusion, q_posterior_coefficients,
                       vp_alpha_sigma)
from .ncsn import NCSNConfig, NoiseLevels, geometric_sigmas
from .sde import VESDE, VPSDE, SubVPSDE, as_sde

#: diffusion.process -> the class it builds (ncsn: the VESDE whose discrete levels are NCSN's geometric sigmas)
PROCESSES = {"ddpm": GaussianDiffusion, "ncsn": VESDE, "edm": EDM, "flow": RectifiedFlow,
             "consistency": ConsistencyModel}


def create_process(diffusion_cfg, latent=False):
    """The noise process of a `DiffusionConfig` (`PROCESSES[diffusion.process]`). `latent`: whether it runs in an
    autoencoder's latent space, where `clip_denoised` None means no clipping (in pixel space it means clipping to
    the data's [-1, 1])."""
    d = diffusion_cfg
    clip = (not latent) if d.clip_denoised is None else d.clip_denoised
    return PROCESSES[d.process].from_config(d.settings, clip)


__all__ = ["Process", "PREDICTIONS", "predict_eps", "predict_x0", "split_output", "GaussianDiffusion", "OBJECTIVES",
           "VARIANCE_TYPES", "DDPMConfig", "q_posterior_coefficients", "vp_alpha_sigma", "NoiseLevels", "NCSNConfig",
           "geometric_sigmas", "VPSDE", "SubVPSDE", "VESDE", "as_sde", "EDM", "EDMConfig", "RectifiedFlow",
           "FlowConfig", "ConsistencyModel", "ConsistencyConfig", "PROCESSES", "create_process"]
