"""Samplers of the reverse process, all with the interface of `Sampler`."""
from ..schedules import spaced_timesteps
from ..utils import check_choice
from .base import Sampler, SamplerOutput
from .ddim import DDIMSampler
from .ddpm import DDPMSampler
from .dpm_solver import DPMSolverSampler
from .euler import EulerAncestralSampler, EulerSampler
from .heun import HeunSampler
from .langevin import AnnealedLangevinSampler
from .score_sde import EulerMaruyamaSampler, PredictorCorrectorSampler, ProbabilityFlowSampler, ScoreSDESampler

SAMPLERS = {"ddpm": DDPMSampler, "ddim": DDIMSampler}
# score-based and fast samplers. Their first argument: a GaussianDiffusion, or for the SDE samplers any SDE
# (VPSDE / SubVPSDE / VESDE), and for "ald" the noise levels (a NoiseLevels or VESDE, or a sigma array)
SAMPLERS.update({
    "euler_maruyama": EulerMaruyamaSampler,
    "pc": PredictorCorrectorSampler,
    "ode": ProbabilityFlowSampler,
    "dpm_solver": DPMSolverSampler,
    "ald": AnnealedLangevinSampler,
})
# the samplers of Karras et al. 2022 in the sigma frame of a GaussianDiffusion (diffusers' Euler / Heun schedulers)
SAMPLERS.update({"euler": EulerSampler, "euler_ancestral": EulerAncestralSampler, "heun": HeunSampler})
# the samplers that take karras_sigmas=True
KARRAS_SAMPLERS = ("euler", "euler_ancestral", "heun", "dpm_solver")

# the samplers a model trained with GaussianDiffusion drives ("ald" needs an NCSN's noise levels instead)
DIFFUSION_SAMPLERS = tuple(name for name in SAMPLERS if name != "ald")
# the samplers an NCSN score network drives: annealed Langevin on its noise levels, and the VE SDE samplers, whose
# discrete levels are the same geometric sigmas (Song et al. 2021, Sec. 3.4 and Eq. 9: NCSN discretises the VE SDE)
NCSN_SAMPLERS = ("ald", "euler_maruyama", "pc", "ode")


def create_sampler(name, process, **kwargs):
    """Build a sampler by name (one of SAMPLERS) for `process` (see `ms_ddpm.processes`; for "ald": the noise
    levels); kwargs go to its constructor."""
    return SAMPLERS[check_choice("sampler", name, SAMPLERS)](process, **kwargs)


__all__ = ["Sampler", "SamplerOutput", "spaced_timesteps", "DDPMSampler", "DDIMSampler", "SAMPLERS",
           "DIFFUSION_SAMPLERS", "NCSN_SAMPLERS", "KARRAS_SAMPLERS", "create_sampler", "DPMSolverSampler",
           "EulerMaruyamaSampler", "PredictorCorrectorSampler", "ProbabilityFlowSampler", "ScoreSDESampler",
           "AnnealedLangevinSampler", "EulerSampler", "EulerAncestralSampler", "HeunSampler"]
