"""Heun's second-order sampler of the probability-flow ODE in the sigma frame (Karras et al. 2022, "Elucidating the
Design Space of Diffusion-Based Generative Models", Algorithm 1), as diffusers' `HeunDiscreteScheduler` runs it.

The frame, grid and conventions are those of `ms_ddpm.samplers.euler` (module doc there): x = x_t / sqrt(alpha_bar),
the ODE dx/dsigma = (x - D(x; sigma)) / sigma, levels sigma_0 > ... > sigma_{N-1} > sigma_N = 0.
"""
import numpy as np

from .euler import EulerSampler, denoiser_coefficients


class HeunSampler(EulerSampler):
    """Heun's method (Algorithm 1), deterministic. From sigma_i to sigma_{i+1}, h = sigma_{i+1} - sigma_i:
        x_e = x + h d(x, sigma_i)                                       (Euler predictor, line 5)
        x'  = x + h/2 [d(x, sigma_i) + d(x_e, sigma_{i+1})]             (trapezoidal correction, line 8)
            = (x + x_e) / 2 + h/2 d(x_e, sigma_{i+1})
    the second form needing only x beside x_e. The step onto sigma_N = 0 is Euler's alone (line 6): 2N - 1 network
    calls for N levels.

    `self.timesteps` follows diffusers: every timestep after the first appears twice, [t_0, t_1, t_1, ...,
    t_{N-1}, t_{N-1}], one `step` call each: at even calls the Euler predictor (its prev_sample is x_e), at odd calls
    the correction. `self.sigmas` likewise holds each level the network sees, [sigma_0, sigma_1, sigma_1, ...,
    sigma_{N-1}, sigma_{N-1}, 0]. Each call is one fused step in graph mode; `update_arguments` hands the second
    stage the x it started from. Arguments as `EulerSampler`'s.
    """

    def _set_grid(self, timesteps, sigmas):
        super()._set_grid(np.concatenate([timesteps[:1], np.repeat(timesteps[1:], 2)]),
                          np.concatenate([sigmas[:1], np.repeat(sigmas[1:-1], 2), sigmas[-1:]]))

    def coefficients(self, timestep):
        """Host-side scalars of this call, in float64: (c_skip, c_out, sigma the network sees, step on its
        derivative, weight of x in the result); the rest of the result is the call's own sample."""
        k = self._call_index(timestep)
        sigma = float(self.sigmas[k])
        if k % 2 == 0:
            # 1. Euler predictor from sigma_i to sigma_{i+1}: x_e = x + h d(x, sigma_i)
            dt, start_weight = float(self.sigmas[k + 1]) - sigma, 0.0
        else:
            # 2. correction at sigma_{i+1} = sigma: x' = (x + x_e) / 2 + h/2 d(x_e, sigma_{i+1})
            dt, start_weight = 0.5 * (sigma - float(self.sigmas[k - 1])), 0.5
        return (*denoiser_coefficients(self.process.objective, sigma), sigma, dt, start_weight)

    def update_arguments(self, timestep, sample):
        if self._step_index % 2 == 0:
            self._start = sample  # x, which the correction averages with x_e
        return super().update_arguments(timestep, sample) + (self._start,)

    def update(self, model_output, sample, noise, c_skip, c_out, sigma, dt, start_weight, start):
        """Either stage given `update_arguments` (floats and x, or 0-d tensors and x inside a compiled step)."""
        # 1. denoised sample and ODE derivative at this call's level (Algorithm 1, lines 4 and 7)
        x0 = self.denoise(model_output, sample, c_skip, c_out)
        derivative = (sample - x0) / sigma
        # 2. predictor: x + h d (start_weight 0); correction: (x + x_e) / 2 + h/2 d(x_e) (start_weight 1/2)
        prev_sample = start_weight * start + (1.0 - start_weight) * sample + derivative * dt
        return prev_sample, x0
