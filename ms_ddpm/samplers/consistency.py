"""Multistep consistency sampling (Song et al. 2023, "Consistency Models", Algorithm 1), as diffusers'
`CMStochasticIterativeScheduler` and the authors' `stochastic_iterative_sampler` run it.

With the process's N levels sigma_max = s_0 > ... > s_{N-1} = sigma_min (`ConsistencyModel.levels`), K steps visit
the levels of indices i_k = k floor(N / K), k = 0 .. K-1 (the diffusers spacing; the paper's tau_1 > ... > tau_{K-1}):
    x <- f(x; s_{i_0})                                         x starts as sigma_max z
    x <- f(x + sqrt(tau^2 - sigma_min^2) s_noise z; tau)       tau = s_{i_k}, k = 1 .. K-1, z fresh N(0, I)
which this sampler writes as one step per network call: x0 = f(x; tau_k), then
x' = x0 + s_noise sqrt(tau_{k+1}^2 - sigma_min^2) z, with tau_K = sigma_min (no noise after the last call).
f is the boundary-condition parametrisation (`ms_ddpm.processes.consistency`); x0 is clipped to [-1, 1] when the
process's `clip_denoised` (diffusers' `clip_denoised`, on by default in both).
"""
import numpy as np

from ..utils import check_int
from .base import Sampler
from .euler import EulerSampler


class ConsistencySampler(EulerSampler):
    """Algorithm 1 of Song et al. 2023 (module doc); one network call per step, `steps` K from 1 (one-step
    generation, the default) to the process's N. Shares the Euler samplers' call counter, network-input scale
    (c_in) and `add_noise`.

    Args:
        process: a `ConsistencyModel`.
        s_noise: scale of the fresh noise (diffusers' `s_noise`, 1 in the paper).
    """

    processes = ("consistency",)
    stochastic = True

    def __init__(self, process, s_noise=1.0):
        self.s_noise = float(s_noise)
        Sampler.__init__(self, process, "linspace", num_inference_steps=1)

    def set_timesteps(self, num_inference_steps):
        """The K levels of the module doc (`self.sigmas`, K + 1 with sigma_min appended) and their network times."""
        n = self.process.num_levels
        check_int("num_inference_steps", num_inference_steps, 1)
        if num_inference_steps > n:
            raise ValueError(f"num_inference_steps {num_inference_steps} exceeds the process's {n} levels "
                             "(diffusion.num_levels)")
        indices = np.arange(num_inference_steps) * (n // num_inference_steps)
        levels = np.append(self.process.levels()[indices], self.process.sigma_min)
        self.num_inference_steps = num_inference_steps
        self._set_grid(self.process.level_time(levels[:-1]), levels, self.process.sigma_max)

    def coefficients(self, timestep):
        """Host-side scalars of this call, in float64: (c_skip, c_out, std of the fresh noise)."""
        sigma, sigma_next = self._levels(timestep)
        s_min = self.process.sigma_min
        tau = min(max(sigma_next, s_min), self.process.sigma_max)
        # one-step generation adds no noise (diffusers: zeros when there is one timestep)
        noise_std = self.s_noise * (tau**2 - s_min**2) ** 0.5 if self.num_inference_steps > 1 else 0.0
        return (*self.process.denoiser(sigma)[:2], noise_std)

    def update(self, model_output, sample, noise, c_skip, c_out, noise_std):
        """The step given the scalars of `coefficients` (floats, or 0-d tensors inside a compiled step)."""
        x0 = self.denoise(model_output, sample, c_skip, c_out)  # f(x; tau_k) (Algorithm 1, lines 2 and 6)
        return x0 + noise * noise_std, x0                       # noised to tau_{k+1} (line 5)
