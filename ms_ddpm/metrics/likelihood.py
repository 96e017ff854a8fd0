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
"""
import math

import mindspore as ms
import numpy as np
from mindspore import ops
from tqdm.auto import tqdm

_LOG2 = math.log(2.0)


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


def calc_bpd_loop(diffusion, model, x_start, seed=None, progress=False):
    """The full bound for a batch of images: a single draw x_t ~ q(x_t | x_0) per timestep and image.

    Args:
        diffusion: the `GaussianDiffusion` the model was trained with.
        model: callable (x_t (B, C, H, W), t (B,) int32) -> network output.
        x_start: (B, C, H, W) float32 tensor of 8-bit images scaled to [-1, 1].
        seed: seeds the NumPy generator of the noise draws.

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
        vb.append(vb_terms_bpd(diffusion, model(x_t, t), x_start, x_t, t).asnumpy())
    vb = np.stack(vb[::-1], axis=1)
    prior = prior_bpd(diffusion, x_start).asnumpy()
    return {"total_bpd": vb.sum(axis=1) + prior, "prior_bpd": prior, "vb": vb}
