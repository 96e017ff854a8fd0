"""What every noise process offers, and the conversions between the things a network can predict.

A process noises data as x_t = alpha(t) x_0 + sigma(t) eps, eps ~ N(0, I), over discrete labels or continuous time
(Kingma et al. 2021, "Variational Diffusion Models", Eq. 1; Karras et al. 2022, Table 1 write every process so):

| process     | alpha(t)          | sigma(t)              | time t                   | network sees as time    |
| ----------- | ----------------- | --------------------- | ------------------------ | ----------------------- |
| ddpm        | sqrt(alpha_bar_t) | sqrt(1 - alpha_bar_t) | integer label 0 .. T-1   | t                       |
| ncsn        | 1                 | sigma_i               | level index i            | i                       |
| edm         | 1                 | sigma                 | sigma, ln sigma ~ normal | c_noise = ln(sigma) / 4 |
| flow        | 1 - t             | t                     | t in (0, 1)              | 1000 t                  |
| consistency | 1                 | sigma                 | sigma, N Karras levels   | 1000 ln(sigma) / 4      |

The output contract: `split_output(process, output)` is the one reader of a raw network output, (prediction,
variance values or None). A process with a learned variance (`learned_variance`: DDPM's `variance_type:
learned_range`, Nichol & Dhariwal 2021) has a network of 2C output channels, the prediction in the first C and the
v of its log-variance in the last C; every consumer (samplers, losses, guidance, likelihood) reads the prediction
through it, and only the DDPM sampler, the bound and the hybrid loss read v. The prediction F means one of
PREDICTIONS; `predict_x0` and `predict_eps` turn any of them into x_0 and eps
given alpha and sigma, written once for every consumer (samplers, losses, guidance, likelihood):
    eps       the noise                                    (Ho et al. 2020, Eq. 11)
    x0        the clean image
    v         alpha eps - sigma x_0, for alpha^2 + sigma^2 = 1  (Salimans & Ho 2022, Sec. 4)
    score     grad_x log p_t(x) = -eps / sigma              (Song et al. 2021, Eq. 19 via Tweedie)
    velocity  eps - x_0, the rectified-flow target d x_t / dt for alpha = 1 - t, sigma = t  (Liu et al. 2022, Eq. 1)
Each conversion is linear in (x, F), so every process's denoiser reads D(x) = c_skip x + c_out F (EDM's Table 1),
which the samplers of Karras et al. step with (`Process.denoiser`).

The protocol (`Process`), read by the trainer, the losses and the samplers:
    name             the registry key (`diffusion.process`), which the samplers' `processes` name
    prediction       what the raw network output means (PREDICTIONS, or "denoiser" for EDM's preconditioned F)
    num_timesteps    the number of discrete labels a network is trained on; None for continuous time
    prior_std        std of the x_T ~ N(0, prior_std^2 I) that sampling starts from
    clip_denoised    whether the samplers clip the network's x_0 to [-1, 1]
    training_time(u) continuous processes: the training draw of t from a uniform u in (0, 1) (discrete ones draw
                     integer labels uniformly, `train.randomness.TrainingDraws`)
    training_terms(x_0, t, eps) -> (network input, network time, regression target, per-sample weight or None)
    trained_by_denoising   False where `training_terms` does not train it (consistency models); the trainer refuses
    ode_grid / denoiser / level_time   the sampling frame of the Euler family (`ms_ddpm.samplers.euler`)
"""
import math

from mindspore import nn, ops

PREDICTIONS = ("eps", "x0", "v", "score", "velocity")


def predict_x0(prediction, output, x, alpha, sigma):
    """x_0 implied by the network output at x = alpha x_0 + sigma eps (floats or broadcastable tensors)."""
    if prediction == "eps":
        return (x - sigma * output) / alpha
    if prediction == "v":  # x_0 = alpha x - sigma v where alpha^2 + sigma^2 = 1
        return alpha * x - sigma * output
    if prediction == "score":  # Tweedie: E[x_0 | x] = (x + sigma^2 score) / alpha
        return (x + sigma**2 * output) / alpha
    if prediction == "velocity":  # from x = alpha x_0 + sigma eps and u = eps - x_0
        return (x - sigma * output) / (alpha + sigma)
    return output


def predict_eps(prediction, output, x, alpha, sigma):
    """eps implied by the network output at x = alpha x_0 + sigma eps (see `predict_x0`)."""
    if prediction == "eps":
        return output
    if prediction == "v":  # eps = alpha v + sigma x where alpha^2 + sigma^2 = 1
        return alpha * output + sigma * x
    if prediction == "score":
        return -sigma * output
    if prediction == "velocity":
        return (x + alpha * output) / (alpha + sigma)
    return (x - alpha * output) / sigma


def denoiser_coefficients(prediction, alpha, sigma):
    """(c_skip, c_out) with x_0 = c_skip x + c_out F for a network predicting `prediction` at (alpha, sigma): the
    conversion of `predict_x0`, read off at (x, F) = (1, 0) and (0, 1) since it is linear."""
    return predict_x0(prediction, 0.0, 1.0, alpha, sigma), predict_x0(prediction, 1.0, 0.0, alpha, sigma)


def standard_normal_quantile(u):
    """Phi^-1(u) = sqrt(2) erfinv(2u - 1): a standard normal from a uniform u in (0, 1), one draw per value."""
    return math.sqrt(2.0) * ops.erfinv(2.0 * u - 1.0)


def split_output(process, output):
    """(prediction, v): the output contract (module doc). v is None unless the process learns its variance."""
    if not process.learned_variance:
        return output, None
    channels = output.shape[1] // 2
    return output[:, :channels], output[:, channels:]


def per_sample(values, x):
    """(B,) values shaped (B, 1, ..., 1) to broadcast against x."""
    return values.reshape((-1,) + (1,) * (x.ndim - 1))


class Process(nn.Cell):
    """Base of the noise processes (parameter-free Cells, so that their tensor methods compile inside the training
    step); see the module doc for the protocol. Subclasses set the class attributes and implement what they offer.

    The sampling frame of the Euler family (Karras et al. 2022, Sec. 3): a sample x at level s follows
    dx/ds = (x - D(x; s)) / s. Processes whose alpha is 1 (EDM, NCSN) are in it as they are (s = sigma); a VP
    chain enters it as x / alpha at s = sigma / alpha (their Table 1, VP column); rectified flow is in it as it is
    with s = t, since x_t - D = t (eps - x_0) (Liu et al. 2022, Eq. 1).
    """

    name = None
    prediction = None
    num_timesteps = None
    prior_std = 1.0
    clip_denoised = False
    #: whether the network also outputs its reverse variance (2C channels; `split_output`)
    learned_variance = False
    #: whether the Euler family's frame is the sigma frame of Karras et al. (levels are noise stds of x_0 + s eps),
    #: where their stochastic steps (churn, ancestral noise) apply; rectified flow's t is not
    sigma_frame = True
    #: whether the trainer's denoising loss (`training_terms`) trains it; consistency models are distilled or
    #: trained against themselves (Song et al. 2023, Algorithms 2 and 3), which is not built
    trained_by_denoising = True

    def __init__(self, clip_denoised=False):
        super().__init__()
        self.clip_denoised = bool(clip_denoised)

    def ode_grid(self, num_steps, timestep_spacing, karras):
        """(timesteps, levels, init_noise_sigma) of an Euler-family chain of `num_steps`: the network times
        (num_steps,), the levels s with the final 0 appended (num_steps + 1,), the std of the first sample."""
        raise ValueError(f"the Euler-family samplers do not run process {self.name!r}")

    def level_time(self, level):
        """The network time of a level off the grid (Heun's churned levels)."""
        raise NotImplementedError

    def denoiser(self, level):
        """(c_skip, c_out, c_in) at a level of the frame, floats: D(x) = c_skip x + c_out F(c_in x, time); c_in
        None where the network takes the frame's sample itself."""
        raise NotImplementedError
