"""Euler samplers of the probability-flow ODE (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models"; equation and algorithm numbers refer to it), as Stable Diffusion users know them from diffusers'
`EulerDiscreteScheduler` and `EulerAncestralDiscreteScheduler`, for every process with a sampling frame
(`ms_ddpm.processes.base.Process`): the sample x at level s follows dx/ds = (x - D(x; s)) / s, D the process's
denoiser (the x_0 read from the network output, `Process.denoiser`).

    ddpm  x = x_t / sqrt(alpha_bar), s = sqrt((1 - alpha_bar) / alpha_bar) (Table 1, VP column): the network sees
          x / sqrt(s^2 + 1) = x_t (`scale_model_input`) at the timestep of s; diffusers' Euler schedulers
    edm   x itself, s = sigma, the preconditioned network (Table 1); diffusers' `EDMEulerScheduler`
    flow  x_t itself, s = t (dx_t/dt = eps - x_0 = (x_t - x_0) / t); diffusers' `FlowMatchEulerDiscreteScheduler`
The last step lands on s = 0, the data. The grids are the process's (`Process.ode_grid`).

Paper symbols -> code: t_i (= sigma_i) -> sigmas[i]; D_theta(x; sigma) -> x0; d_i -> derivative;
c_skip, c_out (Table 1) -> c_skip, c_out; k-diffusion's sigma_up / sigma_down -> sigma_up / sigma_down.

Conventions of diffusers' schedulers, which the tests match to 1e-4 relative:
  * ddpm timesteps: default spacing "linspace" is linspace(0, T - 1, N) unrounded (fractional timesteps, their
    sigmas interpolated between training timesteps); "leading" and "trailing" as `spaced_timesteps`. Under
    "leading" the chain does not start at the last training timestep and x_T gets std sqrt(sigma_max^2 + 1).
  * `karras_sigmas`: for ddpm, the N levels of Eq. 5 (rho 7) between the spacing's smallest and largest sigma,
    each handed to the network at its fractional timestep (`sigma_timesteps`), so the network's time embedding
    must take float time (both U-Nets' do); EDM's grid is Karras's always; flow has none.
  * the timesteps handed to the network are float32: the process's network time of each level.
Deliberate difference: diffusers does not clip; here x0 is clipped to [-1, 1] when the process's `clip_denoised`,
as in the other samplers, so the diffusers comparison uses clip_denoised=False.
"""
import mindspore as ms
import numpy as np
from mindspore import ops

from ..processes import split_output
from ..utils import check_int
from .base import Sampler, SamplerOutput


class EulerSampler(Sampler):
    """Euler's method on the probability-flow ODE in the process's frame (Algorithm 1 without its second-order
    correction; diffusers' `EulerDiscreteScheduler`, `EDMEulerScheduler`, `FlowMatchEulerDiscreteScheduler`).
    Deterministic. From s_i to s_{i+1}:
        D = c_skip x + c_out F(c_in x, time(s_i)),   d = (x - D) / s_i,   x' = x + (s_{i+1} - s_i) d
    with s_N = 0 after the last level, so the last step returns D.

    `step` keeps a call counter: call the steps in order, as `sample` and diffusers' loop do (`scale_model_input`,
    the network, `step` at each timestep); `set_timesteps` or `sample` restarts it.

    Args:
        process: a process with a sampling frame: ddpm (any objective), edm or flow.
        timestep_spacing: ddpm's "linspace" (default, diffusers'), "leading" or "trailing"; see the module doc.
        karras_sigmas: ddpm: step on the Eq. 5 grid (diffusers' `use_karras_sigmas=True`); EDM's grid is it anyway.
    """

    processes = ("ddpm", "edm", "flow")
    stochastic = False
    timestep_dtype = np.float32

    def __init__(self, process, timestep_spacing="linspace", karras_sigmas=False):
        self.karras_sigmas = bool(karras_sigmas)
        super().__init__(process, timestep_spacing)

    def set_timesteps(self, num_inference_steps):
        """Pick the N levels (`self.sigmas`, N + 1 with the final 0) and their float32 `self.timesteps`."""
        if self.num_train_timesteps is None:  # spaced_timesteps checks the discrete chains' counts
            check_int("num_inference_steps", num_inference_steps, 1)
        timesteps, levels, init_noise_sigma = self.process.ode_grid(num_inference_steps, self.timestep_spacing,
                                                                    self.karras_sigmas)
        self.num_inference_steps = num_inference_steps
        self._set_grid(timesteps, levels, init_noise_sigma)

    def _set_grid(self, timesteps, sigmas, init_noise_sigma):
        self.timesteps = np.asarray(timesteps).astype(np.float32)
        self.sigmas = sigmas
        self.init_noise_sigma = init_noise_sigma
        self._step_index = 0

    def _call_index(self, timestep):
        """Index of this call in `self.timesteps`, checked against `timestep`."""
        k = self._step_index
        self._check_call(np.float32(timestep), self.timesteps[k] if k < len(self.timesteps) else None)
        return k

    def input_scale(self, timestep):
        # c_in: ddpm's x_t = x / sqrt(s^2 + 1), EDM's 1 / sqrt(sigma^2 + sigma_data^2) (diffusers' scale_model_input)
        return self.process.denoiser(float(self.sigmas[self._call_index(timestep)]))[2]

    def _levels(self, timestep):
        """(sigma_i, sigma_{i+1}) of this call."""
        k = self._call_index(timestep)
        return float(self.sigmas[k]), float(self.sigmas[k + 1])

    def coefficients(self, timestep):
        """Host-side scalars of this call's step, in float64: (c_skip, c_out, sigma_i, sigma_{i+1} - sigma_i)."""
        sigma, sigma_next = self._levels(timestep)
        return (*self.process.denoiser(sigma)[:2], sigma, sigma_next - sigma)

    def update_arguments(self, timestep, sample):
        arguments = self.coefficients(timestep)
        self._step_index += 1
        return arguments

    def denoise(self, model_output, sample, c_skip, c_out):
        """D(x; sigma), the x_0 prediction (from the output's prediction, `split_output`), clipped to [-1, 1] when
        the process says so."""
        x0 = c_skip * sample + c_out * split_output(self.process, model_output)[0]
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
        """The frame's sample at timesteps from `self.timesteps`, (B,) tensor: x_0 + s noise in the sigma frame,
        (1 - t) x_0 + t noise for flow (diffusers' `add_noise` / `scale_noise`, the start of an image-to-image
        chain)."""
        index = [int(np.flatnonzero(self.timesteps == t)[0]) for t in timesteps.asnumpy().astype(np.float32)]
        s = ms.Tensor(self.sigmas[index].astype(np.float32).reshape((-1,) + (1,) * (original_samples.ndim - 1)))
        return (original_samples if self.process.sigma_frame else (1.0 - s) * original_samples) + s * noise


class EulerAncestralSampler(EulerSampler):
    """Euler ancestral sampling (k-diffusion's `sample_euler_ancestral`; diffusers'
    `EulerAncestralDiscreteScheduler`): from sigma_i, an Euler step down to sigma_down, then fresh noise sigma_up z
    back up to sigma_{i+1}, so that sigma_down^2 + sigma_up^2 = sigma_{i+1}^2 with
        sigma_up = sqrt(sigma_{i+1}^2 (sigma_i^2 - sigma_{i+1}^2) / sigma_i^2)   (the DDPM posterior's std, eta = 1)
    The step onto sigma = 0 adds no noise (sigma_up = 0). diffusers' scheduler has no Karras option; here
    `karras_sigmas` gives the same grid as `EulerSampler`'s. Sigma-frame processes only (ddpm, edm).
    """

    processes = ("ddpm", "edm")
    stochastic = True

    def coefficients(self, timestep):
        """(c_skip, c_out, sigma_i, sigma_down - sigma_i, sigma_up), in float64."""
        sigma, sigma_next = self._levels(timestep)
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        return (*self.process.denoiser(sigma)[:2], sigma, sigma_down - sigma, sigma_up)
