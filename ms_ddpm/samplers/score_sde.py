"""Score-based samplers (Song et al. 2021, "Score-Based Generative Modeling through Stochastic Differential
Equations"; equation numbers refer to it), on the SDEs of `ms_ddpm.processes.sde` (their table, label <-> time map
and score conventions are there).

Reverse-time SDE       dx = [f(x, t) - g(t)^2 grad_x log p_t(x)] dt + g(t) dw_bar                  (Eq. 6)
Probability-flow ODE   dx = [f(x, t) - 1/2 g(t)^2 grad_x log p_t(x)] dt                            (Eq. 13)

Samplers: `EulerMaruyamaSampler` (reverse SDE), `PredictorCorrectorSampler` (Algorithms 2-3), and
`ProbabilityFlowSampler` (Eq. 13 with Heun's method, plus `encode`). Each is a `Sampler`: `set_timesteps`,
`.timesteps` (the labels handed to the network, in calling order), `step`, `add_noise`, `sample`.
The VP samplers take a `GaussianDiffusion` (or any SDE) as their first argument; the VE ones a `VESDE`.
"""
import mindspore as ms
import numpy as np
from mindspore import ops
from tqdm.auto import tqdm

from ..models import call_network
from ..processes import as_sde
from .base import Sampler, SamplerOutput, check_pairing


class ScoreSDESampler(Sampler):
    """What the score-SDE samplers share: the SDE as their process, and the label grid.

    Args:
        process: a `GaussianDiffusion` (sampled through its VP SDE, `as_sde`) or a `VPSDE` / `SubVPSDE` / `VESDE`.
        timestep_spacing: which labels `set_timesteps` keeps (see `spaced_timesteps`). The default "linspace"
            is Song's uniform grid in t from 1 down to 1/T, the data then one more step down.
    """

    stochastic = True

    # a ddpm chain is sampled through its VP SDE (`as_sde`); ncsn is the VE SDE
    processes = ("ddpm", "ncsn", "vp_sde", "subvp_sde")

    def __init__(self, process, timestep_spacing="linspace"):
        check_pairing(type(self), process)
        super().__init__(as_sde(process), timestep_spacing)

    @property
    def sde(self):
        """The process, an SDE (`VPSDE`, `SubVPSDE` or `VESDE`)."""
        return self.process

    def set_timesteps(self, num_inference_steps):
        """Pick `num_inference_steps` labels (self.grid, noisiest first); `self.timesteps` lists the network calls."""
        self.grid = self.sde.labels(num_inference_steps, self.timestep_spacing)
        self.num_inference_steps = num_inference_steps
        self.timesteps = self._calls(self.grid)
        self._step_index = 0

    def _calls(self, grid):
        """Network calls per grid label (one per label here; PC and Heun repeat labels)."""
        return grid

    def next_label(self, position):
        """The label after grid[position], or None (the data) after the last."""
        return int(self.grid[position + 1]) if position + 1 < len(self.grid) else None

    def add_noise(self, original_samples, noise, timesteps):
        """x_t ~ p_t(x | x_0) = N(m(t) x_0, s(t)^2 I) for a (B,) int tensor of labels (Eqs. 31, 33)."""
        labels = timesteps.asnumpy()
        coefs = np.array([self.sde.marginal(int(n)) for n in labels], dtype=np.float32).reshape(
            (-1, 2) + (1,) * (original_samples.ndim - 1)
        )
        return ms.Tensor(coefs[:, 0]) * original_samples + ms.Tensor(coefs[:, 1]) * noise

    def denoised(self, model_output, sample, label):
        """x0_hat = E[x_0 | x_t], the SDE's `denoised` (clipped when the process says so). Reported as
        pred_original_sample; the updates use the unclipped score."""
        return self.sde.denoised(model_output, sample, label)

    def _position(self, timestep):
        """Index of `timestep` in the grid (for samplers with one call per label)."""
        return int(np.flatnonzero(self.grid == timestep)[0])


class EulerMaruyamaSampler(ScoreSDESampler):
    """Euler-Maruyama on the reverse-time SDE (Eq. 6; Song's `EulerMaruyamaPredictor`), from t to t' < t:

        x' = x - [f(t) x - g(t)^2 s(x, t)] dt + g(t) sqrt(dt) z,     dt = t - t' > 0

    For VP and a DDPM eps-network: x' = x + beta(t) dt [x / 2 - eps / sqrt(1 - alpha_bar)] + sqrt(beta(t) dt) z.
    The last step, onto the data, adds no noise (Song's `denoise=True`: the sampler returns the mean).
    """

    def step(self, model_output, timestep, sample, noise=None):
        # 1. this and the next label, continuous times t > t' (module doc for the label <-> t map)
        position = self._position(timestep)
        nxt = self.next_label(position)
        dt = self.sde.time(timestep) - self.sde.time(nxt)
        # 2. score s(x, t) from the network output, and the implied x_0
        score = self.sde.score(model_output, sample, timestep)
        x0_hat = self.denoised(model_output, sample, timestep)
        # 3. reverse drift f(t) x - g(t)^2 s (Eq. 6), one Euler step back in time
        f, g2 = self.sde.coefficients(timestep)
        prev_sample = (1.0 - f * dt) * sample + (g2 * dt) * score
        # 4. diffusion term g(t) sqrt(dt) z, except onto the data
        if nxt is not None:
            noise = ops.randn_like(sample) if noise is None else noise
            prev_sample = prev_sample + float(np.sqrt(g2 * dt)) * noise
        return SamplerOutput(prev_sample, x0_hat)


class PredictorCorrectorSampler(ScoreSDESampler):
    """Predictor-corrector sampling (Algorithms 2 (VE) and 3 (VP); Song's `pc_sampler`).

    At each label: `corrector_steps` Langevin MCMC steps at that noise level (Algorithms 4-5, Song's
    `LangevinCorrector`), then one reverse-diffusion predictor step to the next label (Eq. 46, Song's
    `ReverseDiffusionPredictor`):

        corrector:  eps_i = 2 alpha_i (snr ||z|| / ||s||)^2;   x <- x + eps_i s(x, t_i) + sqrt(2 eps_i) z
        predictor:  x' = x - F x + G^2 s(x, t_i) + G z,  (F, G^2) = sde.discretize (e.g. VP: x' = (2 - sqrt(1 -
                    beta_i)) x + beta_i s + sqrt(beta_i) z, Algorithm 3; VE: x' = x + (sigma_i^2 - sigma_{i-1}^2) s
                    + sqrt(sigma_i^2 - sigma_{i-1}^2) z, Algorithm 2)

    As in Song's code (not the per-sample norms of Algorithms 4-5), ||s|| and ||z|| are per-sample L2 norms averaged
    over the batch: one step size for the batch, which stays sane even for one-pixel samples where a per-sample
    ||s|| can be near zero. Song's code also runs the corrector before the predictor at each level (the paper's
    Algorithms 2-3 run it after); the orders differ only in a corrector at x_T versus one after the last step.
    The final predictor step onto the data adds no noise (Song's `denoise=True`).

    `self.timesteps` repeats each label corrector_steps + 1 times (one network call each), so `step` keeps a call
    counter: call the steps in order, as `sample` does; `set_timesteps` or `sample` resets it.

    Args:
        process: see `ScoreSDESampler`.
        snr: the corrector's signal-to-noise ratio r > 0 (Song: 0.16 for VE on CIFAR-10, 0.01 for VP).
        corrector_steps: Langevin steps M >= 0 per noise level (0: reverse-diffusion predictor only).
    """

    def __init__(self, process, snr=0.16, corrector_steps=1, timestep_spacing="linspace"):
        if not snr > 0:
            raise ValueError(f"snr must be > 0, got {snr!r}")
        if not isinstance(corrector_steps, (int, np.integer)) or corrector_steps < 0:
            raise ValueError(f"corrector_steps must be an integer >= 0, got {corrector_steps!r}")
        self.snr = float(snr)
        self.corrector_steps = int(corrector_steps)
        super().__init__(process, timestep_spacing)

    def _calls(self, grid):
        return np.repeat(grid, self.corrector_steps + 1)

    def step(self, model_output, timestep, sample, noise=None):
        # 1. which call this is: corrector j < M at grid[position], or the predictor (j = M)
        position, j = divmod(self._step_index, self.corrector_steps + 1)
        self._check_call(timestep, int(self.grid[position]) if position < len(self.grid) else None)
        self._step_index += 1
        score = self.sde.score(model_output, sample, timestep)
        x0_hat = self.denoised(model_output, sample, timestep)
        noise = ops.randn_like(sample) if noise is None else noise
        if j < self.corrector_steps:
            # 2. Langevin corrector: step size from the target signal-to-noise ratio (Algorithm 5, line 5)
            batch = sample.shape[0]
            grad_norm = ops.sqrt((score * score).reshape(batch, -1).sum(1)).mean()
            noise_norm = ops.sqrt((noise * noise).reshape(batch, -1).sum(1)).mean()
            step_size = 2.0 * self.sde.langevin_alpha(timestep) * (self.snr * noise_norm / grad_norm) ** 2
            return SamplerOutput(sample + step_size * score + ops.sqrt(2.0 * step_size) * noise, x0_hat)
        # 3. reverse-diffusion predictor (Eq. 46): x' = x - F x + G^2 s + G z, no noise onto the data
        nxt = self.next_label(position)
        F, G2 = self.sde.discretize(timestep, nxt)
        prev_sample = (1.0 - F) * sample + G2 * score
        if nxt is not None:
            prev_sample = prev_sample + float(np.sqrt(G2)) * noise
        return SamplerOutput(prev_sample, x0_hat)


class ProbabilityFlowSampler(ScoreSDESampler):
    """The probability-flow ODE dx/dt = f(t) x - 1/2 g(t)^2 s(x, t) (Eq. 13), solved with Heun's method.

    From t to t' (h = t' - t < 0 going back, > 0 in `encode`), with d(x, t) the ODE's right-hand side:
        x_e = x + h d(x, t);   x' = x + h/2 [d(x, t) + d(x_e, t')]
    The step onto the data (t' = 0, no network label there) is Euler's x' = x + h d(x, t), as in Karras et al.
    2022, Algorithm 1.

    Deterministic: x_T fixes the sample. `self.timesteps` follows diffusers' `HeunDiscreteScheduler`: every grid
    label after the first appears twice, [l_0, l_1, l_1, ..., l_{K-1}, l_{K-1}], 2K - 1 network calls for K labels;
    the first call at a label is Euler's predictor (its prev_sample is the intermediate x_e), the second the
    trapezoidal correction. `step` keeps a call counter: call the steps in order, as `sample` does.
    """

    stochastic = False

    def _calls(self, grid):
        return np.concatenate([grid[:1], np.repeat(grid[1:], 2)])

    def drift(self, model_output, sample, label):
        """d(x, t) = f(t) x - 1/2 g(t)^2 s(x, t) (Eq. 13)."""
        f, g2 = self.sde.coefficients(label)
        return f * sample - (0.5 * g2) * self.sde.score(model_output, sample, label)

    def step(self, model_output, timestep, sample, noise=None):
        k = self._step_index
        self._check_call(timestep, int(self.timesteps[k]) if k < len(self.timesteps) else None)
        self._step_index += 1
        x0_hat = self.denoised(model_output, sample, timestep)
        derivative = self.drift(model_output, sample, timestep)
        if k % 2 == 0:
            # 1. Euler predictor from grid[k/2] to the next label (or, last, onto the data)
            position = k // 2
            nxt = self.next_label(position)
            h = self.sde.time(nxt) - self.sde.time(timestep)
            x_euler = sample + h * derivative
            self._heun_state = (sample, derivative, h)
            return SamplerOutput(x_euler, x0_hat)
        # 2. trapezoidal corrector at the interval's end: x' = x + h/2 (d + d_e)
        start, start_derivative, h = self._heun_state
        return SamplerOutput(start + (0.5 * h) * (start_derivative + derivative), x0_hat)

    def encode(self, model, x_0, progress=False, cond=None):
        """Run the ODE forwards, data -> x_T, on the reversed grid: the latent code of x_0 (Sec. 4.3).

        The first step, data -> t(grid[-1]), is Euler with the network at label grid[-1] evaluated at x_0 (there is
        no label at t = 0; Song's code likewise starts at a small t = eps); then Heun's steps as in decoding.
        `sample(model, shape, x_T=encode(model, x_0))` returns x_0 up to the solver's error. `cond`: as in `sample`.
        """
        batch = x_0.shape[0]

        def d(x, label):
            t = ms.Tensor(np.full((batch,), label, dtype=np.int32))
            return self.drift(call_network(model, x, t, cond), x, label)

        grid = [int(n) for n in self.grid[::-1]]
        x = x_0 + (self.sde.time(grid[0]) - self.sde.time(None)) * d(x_0, grid[0])
        for label, nxt in tqdm(list(zip(grid[:-1], grid[1:])), desc="encode", disable=not progress, leave=False):
            h = self.sde.time(nxt) - self.sde.time(label)
            derivative = d(x, label)
            x_euler = x + h * derivative
            x = x + (0.5 * h) * (derivative + d(x_euler, nxt))
        return x
