"""The interface every sampler shares, in the convention of diffusers' schedulers.

A sampler never owns the network: `step(model_output, timestep, sample, noise)` maps x_t to x_prev from tensors
alone, and `sample_progressive` is the short loop that calls the network on `scale_model_input(sample, timestep)`
and `step` in turn, as diffusers' pipelines do, so a loop written for a diffusers scheduler runs unchanged. The
network may be conditioned (`cond`, e.g. class labels) and guided (`ms_ddpm.guidance`); the loop hands the condition
through.
"""
from dataclasses import dataclass

import mindspore as ms
import numpy as np
from mindspore import nn, ops
from tqdm.auto import tqdm

from ..models import call_network
from ..processes import predict_x0, split_output, vp_alpha_sigma
from ..schedules import TIMESTEP_SPACINGS, spaced_timesteps
from ..utils import check_choice


#: the default number of steps on a continuous-time process (diffusers' pipelines' default)
CONTINUOUS_STEPS = 50


def check_pairing(sampler_cls, process):
    """Refuse a process the sampler cannot run, in one line naming those it can."""
    name = getattr(process, "name", None)
    if name not in sampler_cls.processes:
        raise ValueError(f"{sampler_cls.__name__} does not run process {name!r}; it runs {list(sampler_cls.processes)}")


@dataclass
class SamplerOutput:
    """prev_sample: x at the next (earlier) timestep; pred_original_sample: the x_0 predicted at this step."""

    prev_sample: ms.Tensor
    pred_original_sample: ms.Tensor


class FusedStep(nn.Cell):
    """One sampling step as one Cell: the network call and the sampler's `update`, so that graph mode compiles the
    whole step into a single graph launched once per step, instead of the compiled network followed by the update's
    ops one by one from Python (each a separate launch; docs/performance.md measures the difference).

    For samplers that split `step` into host-side `coefficients(timestep)` (Python floats) and tensor-side
    `update(model_output, sample, noise, *arguments)`, with `arguments = update_arguments(timestep, sample)`: the
    coefficients, which enter as 0-d tensors so that one graph serves every timestep, and any tensors a multi-stage
    step carries (Heun's x). `input_scale`: the 0-d factor of `scale_model_input`, None where the network sees the
    sample itself. With a guided model (`ms_ddpm.guidance.ClassifierFreeGuidance`) the graph holds both
    branches' network call on the doubled batch.
    """

    def __init__(self, model, sampler):
        # auto_prefix=False: wrapping must not rename the network's parameters ("model.<name>"), which would no
        # longer match its checkpoints
        super().__init__(auto_prefix=False)
        self.model = model
        self.sampler = sampler

    def construct(self, x, t, arguments, noise=None, cond=None, input_scale=None):
        model_input = x if input_scale is None else x * input_scale
        return self.sampler.update(call_network(self.model, model_input, t, cond), x, noise, *arguments)


class Sampler:
    """Base class: timesteps, forward noising, and the sampling loop. Subclasses implement `step`.

    Args:
        process: the noise process the network was trained on (`ms_ddpm.processes`), one the sampler's
            `processes` names. The base class reads the interface every process offers: `name`, `num_timesteps`,
            `prior_std` and `clip_denoised` (and `objective` for the conversions of `predicted_x0`); the
            DDPM-family samplers also its `alphas_cumprod`, the Euler family its sampling frame.
        timestep_spacing: how `set_timesteps` picks a subset of the training timesteps (see `spaced_timesteps`).
        num_inference_steps: the first `set_timesteps` argument; None: every training timestep (continuous time:
            CONTINUOUS_STEPS).
    """

    #: the processes (`Process.name`) the sampler runs; `check_pairing` refuses the others
    processes = ("ddpm",)
    #: whether `step` uses fresh noise (the loop then draws it from its seeded generator)
    stochastic = True
    #: dtype of the timesteps handed to the network: integers, or float32 where they can be fractional (Euler family)
    timestep_dtype = np.int32

    def __init__(self, process, timestep_spacing="leading", num_inference_steps=None):
        check_pairing(type(self), process)
        self.process = process
        self.num_train_timesteps = process.num_timesteps
        #: standard deviation of x_T ~ N(0, init_noise_sigma^2 I): 1 for VP chains, sigma_max for VE / NCSN
        self.init_noise_sigma = float(process.prior_std)
        self.timestep_spacing = check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        self._step_index = 0  # samplers whose step depends on the call order (PC, Heun, multistep, ALD) count calls
        if num_inference_steps is None:
            num_inference_steps = CONTINUOUS_STEPS if self.num_train_timesteps is None else self.num_train_timesteps
        self.set_timesteps(num_inference_steps)

    def set_timesteps(self, num_inference_steps):
        """Choose the (descending) timesteps the loop visits; sets `self.timesteps` and `self.num_inference_steps`."""
        self.timesteps = spaced_timesteps(self.num_train_timesteps, num_inference_steps, self.timestep_spacing)
        self.num_inference_steps = num_inference_steps

    def previous_timestep(self, timestep):
        """The timestep after `timestep` in `self.timesteps`, or -1 after the last one (meaning x_0)."""
        index = int(np.flatnonzero(self.timesteps == timestep)[0])
        return int(self.timesteps[index + 1]) if index + 1 < len(self.timesteps) else -1

    def alpha_bar(self, timestep):
        """alpha_bar at an integer timestep, with alpha_bar = 1 at timestep -1 (x_0 itself)."""
        return float(self.process.alphas_cumprod[timestep]) if timestep >= 0 else 1.0

    def add_noise(self, original_samples, noise, timesteps):
        """x_t ~ q(x_t | x_0) (Ho et al. Eq. 4) for a (B,) int tensor of timesteps."""
        return self.process.q_sample(original_samples, timesteps, noise)

    def _check_call(self, timestep, expected):
        """Refuse a `step` call out of order: `expected` is the timestep of call `self._step_index` of samplers whose
        step depends on the call order (None: past the last call)."""
        if expected is None or expected != timestep:
            raise ValueError(f"step called out of order: call {self._step_index} got timestep {timestep} "
                             "(call set_timesteps to restart)")

    def start(self, x_T, rng):
        """The loop's first sample from x_T (Heun's churn adds noise here, from the loop's generator `rng`)."""
        return x_T

    def input_scale(self, timestep):
        """The factor `scale_model_input` applies at `timestep` (a float), or None: the sample is the input."""
        return None

    def scale_model_input(self, sample, timestep):
        """The network's input at `timestep` given the loop's sample (diffusers' interface): the sample itself for
        samplers of x_t; the Euler family, whose sample is x_t / sqrt(alpha_bar), divides it by sqrt(sigma^2 + 1)."""
        scale = self.input_scale(timestep)
        return sample if scale is None else sample * scale

    def update_arguments(self, timestep, sample):
        """The arguments of `update` after (model_output, sample, noise) for the step from `sample` at `timestep`:
        `coefficients(timestep)`; samplers that count their calls advance the count here."""
        return self.coefficients(timestep)

    def step(self, model_output, timestep, sample, noise=None):
        """One reverse step from x_t (`sample`) at `timestep` (an int, or a float for the Euler family); returns a
        SamplerOutput."""
        raise NotImplementedError

    def predicted_x0(self, model_output, sample, alpha_bar):
        """x_0 implied by the network output (its prediction, `split_output`), clipped to [-1, 1] when the process
        says so."""
        alpha, sigma = vp_alpha_sigma(alpha_bar)
        x0 = predict_x0(self.process.objective, split_output(self.process, model_output)[0], sample, alpha, sigma)
        return ops.clamp(x0, -1.0, 1.0) if self.process.clip_denoised else x0

    def sample_progressive(self, model, shape, seed=None, x_T=None, progress=True, cond=None):
        """Run the reverse chain, yielding a SamplerOutput after every step.

        Args:
            model: callable (x (B, C, H, W) float32, t (B,) `timestep_dtype`[, cond]) -> network output of x's shape.
            shape: (B, C, H, W) of the samples.
            seed: seeds the NumPy generator that draws x_T and the per-step noise, so a seed fixes the samples.
            x_T: optional starting noise (overrides the one drawn from `seed`).
            progress: show a tqdm progress bar.
            cond: the condition handed to every network call, e.g. (B,) int32 class labels; None: `model(x, t)`.
        """
        rng = np.random.default_rng(seed)
        if x_T is None:
            x_T = ms.Tensor(rng.standard_normal(shape, dtype=np.float32) * np.float32(self.init_noise_sigma))
        self._step_index = 0
        x = self.start(x_T, rng)
        fused = self._fused_step(model)
        for timestep in tqdm(self.timesteps, desc=type(self).__name__, disable=not progress, leave=False):
            timestep = self.timestep_dtype(timestep).item()  # a Python int, or float
            t = ms.Tensor(np.full((shape[0],), timestep, dtype=self.timestep_dtype))
            noise = ms.Tensor(rng.standard_normal(shape, dtype=np.float32)) if self.stochastic else None
            if fused is None:
                out = self.step(call_network(model, self.scale_model_input(x, timestep), t, cond), timestep, x, noise)
            else:
                scale = self.input_scale(timestep)  # read before update_arguments advances a call counter
                arguments = ms.mutable(tuple(a if isinstance(a, ms.Tensor) else ms.Tensor(np.float32(a))
                                             for a in self.update_arguments(timestep, x)))
                out = SamplerOutput(*fused(x, t, arguments, noise, cond,
                                           None if scale is None else ms.Tensor(np.float32(scale))))
            x = out.prev_sample
            yield out

    def _fused_step(self, model):
        """A `FusedStep` of `model` (kept while the model is the same, so it compiles once) when graph mode can run
        the step as one graph: a network Cell and a sampler with `coefficients` / `update`; else None."""
        if not (hasattr(self, "update") and isinstance(model, nn.Cell) and ms.get_context("mode") == ms.GRAPH_MODE):
            return None
        cached = getattr(self, "_fused", None)
        if cached is None or cached.model is not model:
            self._fused = FusedStep(model, self)
        return self._fused

    def sample(self, model, shape, seed=None, x_T=None, progress=True, cond=None):
        """Draw samples (B, C, H, W) as a float32 tensor, nominally in [-1, 1]; see `sample_progressive`."""
        out = None
        for out in self.sample_progressive(model, shape, seed=seed, x_T=x_T, progress=progress, cond=cond):
            pass
        return out.prev_sample
