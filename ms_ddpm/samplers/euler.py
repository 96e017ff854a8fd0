"""Euler samplers of the probability-flow ODE in the sigma frame (Karras et al. 2022, "Elucidating the Design Space
of Diffusion-Based Generative Models"; equation and algorithm numbers refer to it), as Stable Diffusion users know
them from diffusers' `EulerDiscreteScheduler` and `EulerAncestralDiscreteScheduler`.

A VP chain seen through its noise levels sigma = sqrt((1 - alpha_bar) / alpha_bar) (Table 1, VP column): the
sample x = x_t / sqrt(alpha_bar) = x_0 + sigma eps follows the ODE dx/dsigma = (x - D(x; sigma)) / sigma (Eq. 3 with
sigma(t) = t), where the denoiser D is the network's x_0 prediction. So the loop's sample lives in the sigma frame:
x_T = sigma_max z (`init_noise_sigma`), the network sees x / sqrt(sigma^2 + 1) = x_t (`scale_model_input`) at the
timestep of sigma, and the last step lands on sigma = 0, the data.

Paper symbols -> code: t_i (= sigma_i) -> sigmas[i]; D_theta(x; sigma) -> x0; d_i -> derivative;
c_skip, c_out (Table 1) -> c_skip, c_out; k-diffusion's sigma_up / sigma_down -> sigma_up / sigma_down.

Conventions of diffusers' schedulers, which the tests match to 1e-4 relative:
  * timesteps: default spacing "linspace" is linspace(0, T - 1, N) unrounded (fractional timesteps, their sigmas
    interpolated between training timesteps); "leading" and "trailing" as `spaced_timesteps`. Under "leading" the
    chain does not start at the last training timestep and x_T gets std sqrt(sigma_max^2 + 1), as diffusers.
  * `karras_sigmas`: the N levels of Eq. 5 (rho 7) between the spacing's smallest and largest sigma, each handed to
    the network at its fractional timestep (`sigma_timesteps`), so the network's time embedding must take float time
    (both U-Nets' do); the timesteps are float32 with or without it.
Deliberate difference: diffusers does not clip; here x0 is clipped to [-1, 1] when `diffusion.clip_denoised`, as in
the other samplers, so the diffusers comparison uses clip_denoised=False.
"""
import mindspore as ms
import numpy as np
from mindspore import ops

from ..processes import GaussianDiffusion
from ..schedules import karras_sigmas, sigma_timesteps, spaced_timesteps, timestep_sigmas
from .base import Sampler, SamplerOutput


def denoiser_coefficients(objective, sigma):
    """(c_skip, c_out) with D(x; sigma) = c_skip x + c_out F(x / sqrt(sigma^2 + 1)) for a network F trained on the VP
    chain with `objective` (Table 1 for eps; v and x0 follow from x_t = x / sqrt(sigma^2 + 1))."""
    if objective == "eps":
        return 1.0, -sigma
    if objective == "v":
        return 1.0 / (sigma**2 + 1.0), -sigma / (sigma**2 + 1.0) ** 0.5
    return 0.0, 1.0


class EulerSampler(Sampler):
    """Euler's method on the probability-flow ODE in sigma (Algorithm 1 without its second-order correction; diffusers'
    `EulerDiscreteScheduler`). Deterministic. From sigma_i to sigma_{i+1}:
        D = c_skip x + c_out F(x / sqrt(sigma_i^2 + 1), t(sigma_i)),   d = (x - D) / sigma_i,
        x' = x + (sigma_{i+1} - sigma_i) d
    with sigma_N = 0 after the last level, so the last step returns D.

    `step` keeps a call counter: call the steps in order, as `sample` and diffusers' loop do (`scale_model_input`,
    the network, `step` at each timestep); `set_timesteps` or `sample` restarts it.

    Args:
        diffusion: a `GaussianDiffusion` (any objective).
        timestep_spacing: "linspace" (default, diffusers'), "leading" or "trailing"; see the module doc.
        karras_sigmas: step on the Eq. 5 grid (diffusers' `use_karras_sigmas=True`).
    """

    stochastic = False
    timestep_dtype = np.float32

    def __init__(self, diffusion, timestep_spacing="linspace", karras_sigmas=False):
        if not isinstance(diffusion, GaussianDiffusion):
            raise ValueError(f"{type(self).__name__} samples a GaussianDiffusion (a VP chain), "
                             f"got {type(diffusion).__name__}")
        self.karras_sigmas = bool(karras_sigmas)
        super().__init__(diffusion, timestep_spacing)

    def set_timesteps(self, num_inference_steps):
        """Pick the N levels (`self.sigmas`, N + 1 with the final 0) and their float32 `self.timesteps`."""
        timesteps = spaced_timesteps(self.num_train_timesteps, num_inference_steps, self.timestep_spacing,
                                     integer=False)
        alphas_cumprod = self.process.alphas_cumprod
        sigmas = timestep_sigmas(alphas_cumprod, timesteps)
        if self.karras_sigmas:
            sigmas = karras_sigmas(sigmas[-1], sigmas[0], num_inference_steps)
            timesteps = sigma_timesteps(alphas_cumprod, sigmas)
        self.num_inference_steps = num_inference_steps
        self._set_grid(timesteps, np.append(sigmas, 0.0))

    def _set_grid(self, timesteps, sigmas):
        self.timesteps = np.asarray(timesteps).astype(np.float32)
        self.sigmas = sigmas
        sigma_max = float(sigmas.max())
        # diffusers: a "leading" chain starts below the last training timestep, from N(0, sigma_max^2 + 1)
        self.init_noise_sigma = sigma_max if self.timestep_spacing != "leading" else (sigma_max**2 + 1.0) ** 0.5
        self._step_index = 0

    def _call_index(self, timestep):
        """Index of this call in `self.timesteps`, checked against `timestep`."""
        k = self._step_index
        self._check_call(np.float32(timestep), self.timesteps[k] if k < len(self.timesteps) else None)
        return k

    def input_scale(self, timestep):
        # the network was trained on x_t = x / sqrt(sigma^2 + 1) (diffusers' scale_model_input)
        return 1.0 / (float(self.sigmas[self._call_index(timestep)]) ** 2 + 1.0) ** 0.5

    def _levels(self, timestep):
        """(sigma_i, sigma_{i+1}) of this call."""
        k = self._call_index(timestep)
        return float(self.sigmas[k]), float(self.sigmas[k + 1])

    def coefficients(self, timestep):
        """Host-side scalars of this call's step, in float64: (c_skip, c_out, sigma_i, sigma_{i+1} - sigma_i)."""
        sigma, sigma_next = self._levels(timestep)
        return (*denoiser_coefficients(self.process.objective, sigma), sigma, sigma_next - sigma)

    def update_arguments(self, timestep, sample):
        arguments = self.coefficients(timestep)
        self._step_index += 1
        return arguments

    def denoise(self, model_output, sample, c_skip, c_out):
        """D(x; sigma), the x_0 prediction, clipped to [-1, 1] when the diffusion says so."""
        x0 = c_skip * sample + c_out * model_output
        return ops.clamp(x0, -1.0, 1.0) if self.process.clip_denoised else x0

    def update(self, model_output, sample, noise, c_skip, c_out, sigma, dt, sigma_up=None):
        """The step given the scalars of `coefficients` (floats, or 0-d tensors inside a compiled step)."""
        # 1. denoised sample D(x; sigma) from the network output (Table 1)
        x0 = self.denoise(model_output, sample, c_skip, c_out)
        # 2. ODE derivative d = (x - D) / sigma (Eq. 3 with sigma(t) = t; Algorithm 1, line 4)
        derivative = (sample - x0) / sigma
        # 3. Euler step to the next level (Algorithm 1, line 5)
        prev_sample = sample + derivative * dt
        # 4. the ancestral sampler's fresh noise sigma_up z
        if self.stochastic:
            prev_sample = prev_sample + noise * sigma_up
        return prev_sample, x0

    def step(self, model_output, timestep, sample, noise=None):
        if self.stochastic and noise is None:
            noise = ops.randn_like(sample)
        return SamplerOutput(*self.update(model_output, sample, noise, *self.update_arguments(timestep, sample)))

    def add_noise(self, original_samples, noise, timesteps):
        """x = x_0 + sigma(t) noise, in the sigma frame, for a (B,) tensor of timesteps from `self.timesteps`
        (diffusers' `add_noise`, the start of an image-to-image chain)."""
        index = [int(np.flatnonzero(self.timesteps == t)[0]) for t in timesteps.asnumpy().astype(np.float32)]
        sigma = self.sigmas[index].astype(np.float32).reshape((-1,) + (1,) * (original_samples.ndim - 1))
        return original_samples + ms.Tensor(sigma) * noise


class EulerAncestralSampler(EulerSampler):
    """Euler ancestral sampling (k-diffusion's `sample_euler_ancestral`; diffusers'
    `EulerAncestralDiscreteScheduler`): from sigma_i, an Euler step down to sigma_down, then fresh noise sigma_up z
    back up to sigma_{i+1}, so that sigma_down^2 + sigma_up^2 = sigma_{i+1}^2 with
        sigma_up = sqrt(sigma_{i+1}^2 (sigma_i^2 - sigma_{i+1}^2) / sigma_i^2)   (the DDPM posterior's std, eta = 1)
    The step onto sigma = 0 adds no noise (sigma_up = 0). diffusers' scheduler has no Karras option; here
    `karras_sigmas` gives the same grid as `EulerSampler`'s.
    """

    stochastic = True

    def coefficients(self, timestep):
        """(c_skip, c_out, sigma_i, sigma_down - sigma_i, sigma_up), in float64."""
        sigma, sigma_next = self._levels(timestep)
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        return (*denoiser_coefficients(self.process.objective, sigma), sigma, sigma_down - sigma, sigma_up)
