"""Samplers of the reverse process, all with the interface of `Sampler`.

Each sampler names the processes it runs (its `processes`, `Process.name`s); `create_sampler` refuses any other
pairing in one line, and `samplers_for(process)` lists the fitting ones:

| sampler          | ddpm | ncsn | edm | flow | consistency |
| ---------------- | ---- | ---- | --- | ---- | ----------- |
| ddpm, ddim       | x    |      |     |      |             |
| dpm_solver       | x    |      |     |      |             |
| euler_maruyama, pc, ode | x | x  |     |      |             |
| ald              |      | x    |     |      |             |
| euler, heun      | x    |      | x   | x    |             |
| euler_ancestral  | x    |      | x   |      |             |
| consistency      |      |      |     |      | x           |
"""
from ..schedules import spaced_timesteps
from ..utils import check_choice
from .base import Sampler, SamplerOutput, check_pairing
from .consistency import ConsistencySampler
from .ddim import DDIMSampler
from .ddpm import DDPMSampler
from .dpm_solver import DPMSolverSampler
from .euler import EulerAncestralSampler, EulerSampler
from .heun import HeunSampler
from .langevin import AnnealedLangevinSampler
from .score_sde import EulerMaruyamaSampler, PredictorCorrectorSampler, ProbabilityFlowSampler, ScoreSDESampler

SAMPLERS = {"ddpm": DDPMSampler, "ddim": DDIMSampler}
# score-based and fast samplers. The SDE samplers also take any SDE (VPSDE / SubVPSDE / VESDE), and "ald" the
# noise levels (a NoiseLevels or VESDE, or a sigma array)
SAMPLERS.update({
    "euler_maruyama": EulerMaruyamaSampler,
    "pc": PredictorCorrectorSampler,
    "ode": ProbabilityFlowSampler,
    "dpm_solver": DPMSolverSampler,
    "ald": AnnealedLangevinSampler,
})
# the samplers of Karras et al. 2022 in a process's sampling frame (diffusers' Euler / Heun schedulers)
SAMPLERS.update({"euler": EulerSampler, "euler_ancestral": EulerAncestralSampler, "heun": HeunSampler})
# multistep consistency sampling (Song et al. 2023, Algorithm 1; diffusers' CMStochasticIterativeScheduler)
SAMPLERS["consistency"] = ConsistencySampler
# the samplers that take karras_sigmas=True
KARRAS_SAMPLERS = ("euler", "euler_ancestral", "heun", "dpm_solver")


def samplers_for(process_name):
    """The names of the samplers that run process `process_name`, in SAMPLERS' order."""
    return tuple(name for name, cls in SAMPLERS.items() if process_name in cls.processes)


def create_sampler(name, process, **kwargs):
    """Build a sampler by name (one of SAMPLERS) for `process` (see `ms_ddpm.processes`; for "ald": the noise
    levels); kwargs go to its constructor. A process the sampler does not run is refused, naming those that do."""
    cls = SAMPLERS[check_choice("sampler", name, SAMPLERS)]
    process_name = getattr(process, "name", None)
    if process_name is not None and process_name not in cls.processes:
        raise ValueError(f"sampler {name!r} does not run process {process_name!r}; its samplers: "
                         f"{list(samplers_for(process_name))}")
    return cls(process, **kwargs)


__all__ = ["Sampler", "SamplerOutput", "spaced_timesteps", "DDPMSampler", "DDIMSampler", "SAMPLERS",
           "KARRAS_SAMPLERS", "samplers_for", "check_pairing", "create_sampler", "DPMSolverSampler",
           "EulerMaruyamaSampler", "PredictorCorrectorSampler", "ProbabilityFlowSampler", "ScoreSDESampler",
           "AnnealedLangevinSampler", "EulerSampler", "EulerAncestralSampler", "HeunSampler", "ConsistencySampler"]
