"""Negative log-likelihood in bits per dimension from the DDPM variational bound (Ho et al. 2020, Eqs. 5 and 13;
computed as improved-diffusion's `calc_bpd_loop`, `_vb_terms_bpd`, `_prior_bpd`).

    L = L_T + sum_{t>1} L_{t-1} + L_0                                                        (Ho et al. Eq. 5)
    L_T     = KL(q(x_T | x_0) || N(0, I))                                                   prior term
    L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)),  x_t ~ q(x_t | x_0)           one draw per t
    L_0     = -log p(x_0 | x_1), p a Gaussian integrated over x_0's 8-bit bin                 (Eq. 13)

The data are 8-bit images scaled to [-1, 1]: bins of width 2/255 around the 256 values, the two end bins open to
-inf and +inf. All terms are per-image means over the pixels, in bits (nats / log 2). Timestep indices are 0-based
as everywhere in ms_ddpm: index 0 is the paper's t = 1, so the decoder term is the one at index 0.

One deliberate difference: the decoder uses the exact normal CDF (through erfc, which keeps its precision in the
tails) where improved-diffusion uses a tanh approximation; they differ by about 1e-3 in the CDF.

`ode_bpd` gives a second number: the log-density of the probability-flow ODE (Song et al. 2021, "Score-Based
Generative Modeling through SDEs", Sec. 4.3 and Appendix D.2, as in their `likelihood.py`):

    dx/dt = f~(x, t) = f(t) x - 1/2 g(t)^2 s(x, t)                                             (Song Eq. 13)
    log p_0(x(0)) = log p_T(x(T)) + int_0^T div_x f~(x(t), t) dt                               (Song Eq. 39)
    div_x f~(x, t) = E_eps[eps^T (d f~ / d x) eps],  E[eps] = 0, Cov[eps] = I                   (Song Eq. 40)

Eq. 39 is the instantaneous change of variables (Chen et al. 2018, Theorem 1); Eq. 40 the Skilling-Hutchinson trace
estimator (Hutchinson 1990; FFJORD, Grathwohl et al. 2019, Sec. 3), one probe eps per image for the whole
trajectory, eps^T (d f~ / d x) from one vector-Jacobian product. It is the density of the network's least noisy
marginal, a distribution of continuous data, reported on uniformly dequantised images (see `ode_bpd`).
"""
import math

import mindspore as ms
import numpy as np
from mindspore import ops
from tqdm.auto import tqdm

from ..models import call_network
from ..processes import split_output
from ..samplers.score_sde import ProbabilityFlowSampler
from ..utils import check_choice, check_int

_LOG2 = math.log(2.0)
#: probe distributions of the trace estimator (Eq. 40): both have E[eps eps^T] = I; Rademacher's +-1 entries give the
#: smaller variance, 2 sum_{i != j} A_ij^2 against 2 sum_ij A_ij^2 for a symmetric A (Hutchinson 1990)
HUTCHINSON_PROBES = ("rademacher", "gaussian")
#: bits/dim added to a density on [-1, 1] to count in 8-bit levels: log2 of the levels per unit, 256 / 2 = 128
DEQUANTIZATION_OFFSET_BITS = math.log2(128.0)
#: default number of noise levels of `ode_bpd`'s solver (see its docstring for the accuracy)
ODE_STEPS = 100


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) in nats, elementwise (tensors or floats, broadcast)."""
    mean1, logvar1, mean2, logvar2 = (
        v if isinstance(v, ms.Tensor) else ms.Tensor(v, ms.float32) for v in (mean1, logvar1, mean2, logvar2)
    )
    return 0.5 * (-1.0 + logvar2 - logvar1 + ops.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * ops.exp(-logvar2))


def _mean_flat(x):
    return x.mean(axis=tuple(range(1, x.ndim)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log P(bin of x) under N(means, e^{2 log_scales}), elementwise in nats, for x on the 8-bit grid in [-1, 1].

    Inner bins: Phi(z+) - Phi(z-), z+- = (x +- 1/255 - mean) / scale; the bin at -1 takes all mass below its upper
    edge, the bin at +1 all mass above its lower edge (Ho et al. Eq. 13). Probabilities are clamped at 1e-12
    before the log, as improved-diffusion does.
    """
    x = ops.broadcast_to(x, means.shape) if x.shape != means.shape else x
    centered = x - means
    inv_stdv = ops.exp(-log_scales)
    z_plus = inv_stdv * (centered + 1.0 / 255.0) * (1.0 / math.sqrt(2.0))
    z_min = inv_stdv * (centered - 1.0 / 255.0) * (1.0 / math.sqrt(2.0))
    # Phi(z) = erfc(-z / sqrt 2) / 2 and 1 - Phi(z) = erfc(z / sqrt 2) / 2 are both accurate far in their tail, so
    # each bin's mass is a difference taken on the side of the bin away from the mean
    mass_right_of_mean = 0.5 * (ops.erfc(z_min) - ops.erfc(z_plus))
    mass_left_of_mean = 0.5 * (ops.erfc(-z_plus) - ops.erfc(-z_min))
    cdf_delta = ops.where(z_min > 0, mass_right_of_mean, mass_left_of_mean)
    log_cdf_plus = ops.log(ops.clamp(0.5 * ops.erfc(-z_plus), min=1e-12))
    log_one_minus_cdf_min = ops.log(ops.clamp(0.5 * ops.erfc(z_min), min=1e-12))
    log_cdf_delta = ops.log(ops.clamp(cdf_delta, min=1e-12))
    return ops.where(x < -0.999, log_cdf_plus, ops.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def vb_terms_bpd(diffusion, model_output, x_start, x_t, t):
    """One term of the bound per image, bits/dim, shape (B,): L_{t-1} for t > 0, the decoder NLL L_0 where t == 0.

    Args:
        diffusion: the `GaussianDiffusion` (its objective, variance type and clip_denoised apply).
        model_output: network output at (x_t, t).
        x_start: (B, C, H, W) data on the 8-bit grid in [-1, 1]; x_t: a draw of q(x_t | x_0); t: (B,) int32.
    """
    true_mean, _, true_log_variance = diffusion.q_posterior_mean_variance(x_start, x_t, t)
    mean, _, log_variance, _ = diffusion.p_mean_variance(model_output, x_t, t)
    kl = _mean_flat(normal_kl(true_mean, true_log_variance, mean, log_variance)) / _LOG2
    decoder_nll = -_mean_flat(discretized_gaussian_log_likelihood(x_start, mean, 0.5 * log_variance)) / _LOG2
    return ops.where(t == 0, decoder_nll, kl)


def prior_bpd(diffusion, x_start):
    """L_T = KL(q(x_T | x_0) || N(0, I)) per image in bits/dim, shape (B,), q(x_T | x_0) = N(sqrt(ab_T) x_0, 1 - ab_T)
    (Ho et al. Eq. 4)."""
    alpha_bar = float(diffusion.alphas_cumprod[-1])
    kl = normal_kl(alpha_bar**0.5 * x_start, math.log(1.0 - alpha_bar), 0.0, 0.0)
    return _mean_flat(kl) / _LOG2


def calc_bpd_loop(diffusion, model, x_start, seed=None, progress=False, cond=None):
    """The full bound for a batch of images: a single draw x_t ~ q(x_t | x_0) per timestep and image.

    Args:
        diffusion: the `GaussianDiffusion` the model was trained with.
        model: callable (x_t (B, C, H, W), t (B,) int32[, cond]) -> network output.
        x_start: (B, C, H, W) float32 tensor of 8-bit images scaled to [-1, 1].
        seed: seeds the NumPy generator of the noise draws.
        progress: show a progress bar.
        cond: the images' condition (their (B,) int32 class labels) for a class-conditional model: the bound of
            log p(x | class); None for an unconditional one.

    Returns:
        dict of NumPy arrays: total_bpd (B,), prior_bpd (B,), vb (B, T) (column t = the term at index t).
    """
    rng = np.random.default_rng(seed)
    batch = x_start.shape[0]
    vb = []
    for timestep in tqdm(range(diffusion.num_timesteps - 1, -1, -1), desc="bpd", disable=not progress, leave=False):
        t = ms.Tensor(np.full((batch,), timestep, dtype=np.int32))
        noise = ms.Tensor(rng.standard_normal(x_start.shape, dtype=np.float32))
        x_t = diffusion.q_sample(x_start, t, noise)
        vb.append(vb_terms_bpd(diffusion, call_network(model, x_t, t, cond), x_start, x_t, t).asnumpy())
    vb = np.stack(vb[::-1], axis=1)
    prior = prior_bpd(diffusion, x_start).asnumpy()
    return {"total_bpd": vb.sum(axis=1) + prior, "prior_bpd": prior, "vb": vb}


def log_snr_levels(sde, num_steps):
    """Labels of `sde` nearest to `num_steps` values of the log-SNR lambda = log(m^2 / s^2) spaced uniformly from the
    least noisy label to the noisiest, in that order (data to prior), duplicates merged; and lambda of every label.

    Near the data the labels are sparser in lambda than the targets, so fewer levels may come back (94 of 100 for the
    linear schedule at T = 1000; more than T visits every label).
    """
    log_snr = np.array([2.0 * math.log(m / s) for m, s in map(sde.marginal, range(sde.num_timesteps))])
    targets = np.linspace(log_snr.max(), log_snr.min(), num_steps)
    nearest = np.abs(log_snr[None, :] - targets[:, None]).argmin(axis=1)
    return list(dict.fromkeys(int(n) for n in nearest)), log_snr


def ode_bpd(process, model, x_start, num_steps=ODE_STEPS, hutchinson="rademacher", dequantize=False, seed=None,
            progress=False, cond=None):
    """Bits/dim of images under the probability-flow ODE (Song et al. 2021, Eqs. 13, 39-40; module docstring).

    Where the ODE starts: x_start is taken as a point of the least noisy marginal the network knows, p_{t_0} (label
    0 of a DDPM: t_0 = 1/T, noise std sqrt(1 - alpha_bar_0) = 0.01 for the linear schedule; sigma_min for VE), as
    Song et al. start at t = eps = 1e-5. There is no network label below t_0; a step from t = 0 to t_0 (Euler, as
    `ProbabilityFlowSampler.encode` takes) would count only the first-order term h tr(J) of log det(I + h J), and
    h J is not small there (about 1/2 in each direction in which the data have no spread), so the result would not
    be the density of a normalised distribution. p_{t_0}, the data convolved with N(0, s(t_0)^2 I), is one.

    Integration, t_0 to the noisiest label, of x and of delta_logp = int div f~ dt (Eq. 39) together, on the levels
    of `log_snr_levels` (uniform in the log-SNR lambda = log(m^2 / s^2)), each in the variable in which its integrand
    is smoothest:
      * x: Heun's method (2nd order: Euler predictor, trapezoidal corrector) on the ODE in DDIM's variables,
        d(x/m) / d(s/m) = eps(x, t), eps = -s score the noise the network sees (Song, Meng & Ermon 2021, "DDIM",
        Eq. 14, for VP; it follows from Eq. 13 for any linear SDE), as Karras et al. 2022 (Algorithm 1) integrate it.
        The trajectory is a straight line in these variables wherever eps stays constant, as it nearly does in the
        directions in which the data have little spread (background pixels); there Heun in t or in lambda loses up to
        0.09 bits per such dimension at 100 levels (0.07 with every label). The predictor is a DDIM step.
      * delta_logp: the trapezoidal rule in lambda on the points of those steps, int div f~ (dt/dlambda) dlambda:
        for a linear SDE d(s^2)/dt = 2 f s^2 + g^2 and d(log m)/dt = f, so dt/dlambda = -s^2 / g^2. Per unit of
        lambda the divergence is bounded and smooth (for Gaussian data N(mu, c) in VP, 1/2 (c - 1) / ((1 +
        e^lambda)(c + e^-lambda)) per dimension), while per unit of t it grows like 1/(2t) near the data in the
        directions of little spread, which fixed steps in t integrate badly.
    Heun, not RK4, because it needs the network at the interval's ends only, labels the network was trained on;
    RK4's midpoints are not. A step costs two network calls with a vector-Jacobian product each: 2 (K - 1) calls for
    K levels. At the default K = 100 (94 levels at T = 1000, linear schedule) the error on Gaussian data is at most
    0.03 bits per dimension for every standard deviation from 0.001 to 1.5 (VP, at a point 2 standard deviations
    out, in float64: 5e-3 at 0.002, 0.03 at 0.01, 7e-3 from 0.15 up), and it shrinks about 4x per doubling of K
    down to a floor set by the labels nearest the data, which are sparser in lambda than the steps (0.79 from label
    0 to 1) and cannot be refined (with every label: 0.03 at 0.01, 1e-3 at 0.15).

    What the number means: log p_{t_0}(x) = log N(x_T; 0, sigma_T^2 I) + delta_logp (Eq. 39 with the prior of the
    SDE: sigma_T = 1 for VP / sub-VP, sigma_max for VE), in nats, and
        bits/dim = -log p_{t_0}(x) / (D ln 2) + 7,
    7 = log2(128) converting a density per unit of [-1, 1] into one per 8-bit level, 2/256 wide (Song et al.'s
    `likelihood.py`: offset 7 for data scaled to [-1, 1]). With `dequantize`, each pixel gets uniform noise on
    [-1/256, 1/256) first, centred on the training grid value k/127.5 - 1; the bins of width 2/256 are disjoint
    (the grid spacing is 2/255), so P(k) = int_bin p defines a discrete model and by Jensen its -log2 P(k) / D is at
    most the expectation over the noise of this number (uniform dequantisation, Theis et al. 2016; Ho et al. 2019,
    "Flow++", Sec. 3.1): the number comparable with Song et al.'s Table 2. Without it, the density of the grid
    points themselves, which is not a bound on anything discrete.

    Args:
        process: a `GaussianDiffusion` (its VP SDE, the network read as its objective, as `ProbabilityFlowSampler`),
            or a `VPSDE`, `SubVPSDE` or `VESDE`.
        model: callable (x (B, C, H, W) float32, t (B,) int32 labels[, cond]) -> network output, differentiable in x by
            MindSpore autodiff (graph mode compiles it with the gradient), and treating the images of a batch
            independently (a U-Net in inference mode does): the batch's vector-Jacobian product is then each image's.
        x_start: (B, C, H, W) float32 tensor, 8-bit images scaled to [-1, 1] (what the offset of 7 bits assumes).
        num_steps: K >= 2, the number of log-SNR targets for the noise levels (see `log_snr_levels`).
        hutchinson: probe distribution, one of HUTCHINSON_PROBES.
        dequantize: add the uniform noise above to x_start first.
        seed: seeds the NumPy generator of the dequantisation noise (drawn first) and of the probes.
        progress: show a progress bar.
        cond: the images' condition ((B,) int32 class labels) for a class-conditional model, else None.

    Returns:
        dict of NumPy arrays: total_bpd (B,); prior_logp (B,) and delta_logp (B,) in nats, float64, with
        log p_{t_0}(x) = prior_logp + delta_logp; z (B, C, H, W) float32, the end point x_T of the ODE.
    """
    check_choice("hutchinson", hutchinson, HUTCHINSON_PROBES)
    check_int("num_steps", num_steps, 2)
    sampler = ProbabilityFlowSampler(process)
    sde = sampler.sde
    rng = np.random.default_rng(seed)
    shape, batch = tuple(x_start.shape), x_start.shape[0]
    dims = int(np.prod(shape[1:]))
    x = x_start
    if dequantize:
        x = x + ms.Tensor(rng.uniform(-1.0 / 256.0, 1.0 / 256.0, shape).astype(np.float32))
    if hutchinson == "rademacher":
        probe = rng.integers(0, 2, shape) * 2.0 - 1.0
    else:
        probe = rng.standard_normal(shape)
    probe = ms.Tensor(probe.astype(np.float32))

    # f~ is affine in x and the network output F with coefficients of t alone (Eq. 13; the score is linear in F for
    # every objective): f~ = a x + b F(x, t). a and b are read off the sampler's `drift`, so this is the ODE it
    # solves, and enter as tensors, so graph mode compiles the gradient once for all levels. F is the output's
    # prediction (a learned variance's half is not in the ODE); the raw output comes back for `sde.score`.
    def weighted_sum(x, t, a, b, probe):
        output = call_network(model, x, t, cond)
        return ((a * x + b * split_output(sde, output)[0]) * probe).sum(), output

    vjp_and_output = ms.grad(weighted_sum, grad_position=0, has_aux=True)

    def eps_and_divergence(x, label):
        """eps = -s score at (x, t) and the per-image estimate probe^T (d f~ / d x) probe (Eq. 40), float64 (B,)."""
        a, b = sampler.drift(0.0, 1.0, label), sampler.drift(1.0, 0.0, label)
        t = ms.Tensor(np.full((batch,), label, dtype=np.int32))
        vjp, (output,) = vjp_and_output(x, t, ms.Tensor(a, ms.float32), ms.Tensor(b, ms.float32), probe)
        eps = sde.score(output, x, label) * (-sde.marginal(label)[1])
        return eps, (vjp * probe).asnumpy().reshape(batch, -1).sum(axis=1, dtype=np.float64)

    def dt_dlambda(label):
        _, s = sde.marginal(label)
        return -(s**2) / sde.coefficients(label)[1]

    levels, log_snr = log_snr_levels(sde, num_steps)
    delta_logp = np.zeros(batch)
    steps = list(zip(levels[:-1], levels[1:]))
    for label, nxt in tqdm(steps, desc="ode bpd", disable=not progress, leave=False):
        # 1. Heun on y = x/m against sigma = s/m (dy/dsigma = eps): Euler (a DDIM step), then the trapezoidal rule
        m, s = sde.marginal(label)
        m_next, s_next = sde.marginal(nxt)
        d_sigma = s_next / m_next - s / m
        y = x * (1.0 / m)
        eps, divergence = eps_and_divergence(x, label)
        eps_next, divergence_next = eps_and_divergence(m_next * (y + d_sigma * eps), nxt)
        x = m_next * (y + (0.5 * d_sigma) * (eps + eps_next))
        # 2. delta_logp by the trapezoidal rule in lambda over the same two points (Eq. 39)
        h_lambda = float(log_snr[nxt] - log_snr[label])
        delta_logp = delta_logp + (0.5 * h_lambda) * (dt_dlambda(label) * divergence +
                                                      dt_dlambda(nxt) * divergence_next)
    # 3. the prior N(0, sigma_T^2 I) at x_T, and bits/dim
    z = x.asnumpy()
    var = sde.prior_std**2
    prior_logp = -0.5 * dims * math.log(2.0 * math.pi * var) - 0.5 * (z.astype(np.float64) ** 2).reshape(
        batch, -1).sum(axis=1) / var
    total_bpd = -(prior_logp + delta_logp) / (dims * _LOG2) + DEQUANTIZATION_OFFSET_BITS
    return {"total_bpd": total_bpd, "prior_logp": prior_logp, "delta_logp": delta_logp, "z": z}
