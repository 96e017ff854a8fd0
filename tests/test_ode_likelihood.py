"""Bits/dim from the probability-flow ODE (`ode_bpd`): known answers on Gaussian data, the trace estimator's mean,
the bits/dim arithmetic, and a small U-Net in both execution modes.

Known answers: with data x_0 ~ N(MU, COV) every marginal of the SDE is Gaussian, p_t = N(m MU, m^2 COV + s^2 I) with
(m, s) the SDE's marginal coefficients at the label, so the exact networks are affine in x:
    eps-network (VP, sub-VP)   eps*(x, t) = s (m^2 COV + s^2 I)^-1 (x - m MU)
    score (VE)                 s*(x, t) = -(COV + sigma^2 I)^-1 (x - MU)
and the probability-flow ODE carries each marginal onto the next exactly (Song et al. 2021, Sec. 4.3), so by Eq. 39
its delta_logp = log p_{t_0}(x) - log p_T(z), from the least noisy label t_0 where `ode_bpd` starts to the noisiest T
and the end point z it returns. Its prior_logp is log N(z; 0, sigma_T^2 I), not log p_T(z) (alpha_bar_T = 4e-5 > 0 for
VP, the data mean left in VE's N(MU, COV + sigma_max^2 I)); the comparisons below use log p_T(z) itself, so that
mismatch (about 0.01-0.03 nats here) is no part of the measured error.
"""
import math

import mindspore as ms
import numpy as np
import pytest
from mindspore import ops
from scipy.stats import multivariate_normal

from ms_ddpm.processes import VESDE, VPSDE, GaussianDiffusion, SubVPSDE
from ms_ddpm.metrics.likelihood import log_snr_levels, ode_bpd
from ms_ddpm.models.unet import Unet
from ms_ddpm.schedules import get_beta_schedule

T = 1000
SHAPE = (1, 2, 2)  # D = 4
MU = np.array([0.1, -0.3, 0.5, 0.0])
SD = np.array([0.003, 0.15, 1.0, 1.5])  # about a dequantised background pixel's, expanding, neutral (VP), contracting


class AffineModel:
    """The exact network of Gaussian data: output = P[t] (x - c[t]) for tables P (N, D, D), c (N, D), in
    MindSpore ops, so that autodiff (and graph mode) goes through it."""

    def __init__(self, sde, mu, cov, output):
        m, s = np.array([sde.marginal(n) for n in range(sde.num_timesteps)]).T
        d = len(mu)
        inverse = np.linalg.inv(m[:, None, None] ** 2 * cov + s[:, None, None] ** 2 * np.eye(d))
        scale = s if output == "eps" else -np.ones_like(s)
        self.P = ms.Tensor((scale[:, None, None] * inverse).astype(np.float32))
        self.c = ms.Tensor((m[:, None] * mu).astype(np.float32))

    def __call__(self, x, t):
        v = x.reshape(x.shape[0], -1) - self.c[t]
        return ops.matmul(self.P[t], v.expand_dims(-1)).squeeze(-1).reshape(x.shape)


def end_marginals(sde, mu, cov):
    """p_{t_0} and p_T, N(m MU, m^2 COV + s^2 I) at the labels of largest and smallest log-SNR, where the ODE starts
    and ends."""
    first, last = log_snr_levels(sde, 2)[0]
    return [multivariate_normal(m * mu, m**2 * cov + s**2 * np.eye(len(mu)))
            for m, s in map(sde.marginal, (first, last))]


def as_images(x):
    return ms.Tensor(np.asarray(x).reshape((-1,) + SHAPE).astype(np.float32))


PROCESSES = {
    # (process, its exact network's output, the largest error in bits/dim allowed at the default 100 levels)
    "vp": (lambda: VPSDE(get_beta_schedule("linear", T)), "eps", 1.1e-2),
    "subvp": (lambda: SubVPSDE(get_beta_schedule("linear", T)), "eps", 3e-2),
    "ve": (lambda: VESDE(0.01, 50.0, T), "score", 1e-2),
}


@pytest.mark.parametrize("name", list(PROCESSES))
def test_ode_log_density_of_gaussian_data_is_the_closed_form(name):
    """delta_logp + log p_T(z) = log p_{t_0}(x), p_{t_0} = N(m MU, m^2 diag SD^2 + s^2 I), up to the solver's error.

    The covariance is diagonal, so the drift's Jacobian is too and every Rademacher probe gives its trace exactly:
    what is left is the O(h^2) discretisation error and float32. Measured at the default 100 levels, in bits/dim,
    largest over the 64 points (mean): VP 5.5e-3 (+8.8e-4), sub-VP 1.4e-2 (+4.4e-3), VE 4.4e-3 (+8.8e-4); sub-VP's
    is the largest because its first labels are the sparsest in lambda (1.6 from label 0 to 1) and the 0.003
    dimension's flow changes fastest there. The bounds are about twice these; 50 levels must do worse by more than
    3x (second order: measured 3.7-4.1x).
    """
    make, output, bound = PROCESSES[name]
    ms.set_context(mode=ms.GRAPH_MODE)  # one compilation, then the 186 network calls are cheap
    sde, cov = make(), np.diag(SD**2)
    model = AffineModel(sde, MU, cov, output)
    x = np.random.default_rng(0).multivariate_normal(MU, cov, 64)
    p_start, p_end = end_marginals(sde, MU, cov)
    errors = {}
    for steps in (100, 50):
        out = ode_bpd(sde, model, as_images(x), num_steps=steps, seed=0)
        z = out["z"].reshape(64, -1).astype(np.float64)
        errors[steps] = (out["delta_logp"] + p_end.logpdf(z) - p_start.logpdf(x)) / (4 * math.log(2))
    largest = {steps: np.abs(e).max() for steps, e in errors.items()}
    assert largest[100] < bound, (largest, errors[100].mean())
    assert largest[50] > 3 * largest[100], largest
    # prior_logp is the SDE's prior N(0, sigma_T^2 I) at z (sigma_T = 1 for VP / sub-VP, 50 for VE)
    var = sde.prior_std**2
    np.testing.assert_allclose(out["prior_logp"], -2 * np.log(2 * np.pi * var) - (z**2).sum(1) / (2 * var), rtol=1e-12)


@pytest.mark.parametrize("hutchinson", ["rademacher", "gaussian"])
def test_trace_estimate_is_unbiased(hutchinson):
    """With a full covariance the drift's Jacobian J(t) has off-diagonal entries, and each probe eps gives
    eps^T M eps for M = the solver's weighted sum of the J(t) it visits (for Gaussian data J does not depend on x).
    Its exact trace comes from the same data rotated to COV's eigenbasis: the ODE commutes with rotations, so the
    rotated run visits Q^T M Q, which is diagonal, and Rademacher probes read its trace exactly. The mean over 4000
    probes must match it within 4 standard errors."""
    ms.set_context(mode=ms.GRAPH_MODE)
    rng = np.random.default_rng(1)
    a = rng.standard_normal((4, 4))
    cov = a @ a.T / 4 + 0.05 * np.eye(4)
    eigenvalues, q = np.linalg.eigh(cov)
    sde = VPSDE(get_beta_schedule("linear", T))
    x = rng.multivariate_normal(MU, cov)
    full = ode_bpd(sde, AffineModel(sde, MU, cov, "eps"), as_images(np.tile(x, (4000, 1))), num_steps=10,
                   hutchinson=hutchinson, seed=2)
    rotated = ode_bpd(sde, AffineModel(sde, q.T @ MU, np.diag(eigenvalues), "eps"), as_images((q.T @ x)[None]),
                      num_steps=10)
    np.testing.assert_allclose(full["z"][0].ravel(), q @ rotated["z"][0].ravel(), atol=1e-5)  # one trajectory
    exact, estimates = rotated["delta_logp"][0], full["delta_logp"]
    standard_error = estimates.std() / np.sqrt(len(estimates))
    assert estimates.std() > 0.05  # the probes matter: the test is not trivially exact
    assert abs(estimates.mean() - exact) < 4 * standard_error, (estimates.mean(), exact, standard_error)


def test_bits_per_dim_arithmetic_on_an_identity_flow():
    """Data N(0, I) under VP: p_t = N(0, I) at every t, the exact eps-network is sqrt(1 - ab) x and the drift
    -beta/2 x + beta/2 x is zero, so the flow is the identity and its divergence 0. Then delta_logp = 0 (every probe
    sees a zero Jacobian), and for a constant image v (any D)
        bits/dim = [D/2 ln(2 pi) + D v^2 / 2] / (D ln 2) + 7 = log2(2 pi) / 2 + v^2 / (2 ln 2) + 7,
    by hand: 8.32575 for v = 0, 8.50609 for v = 1/2, 9.04710 for v = 1. The solver moves z off v by its own error
    (Heun in DDIM's variables is not exact here, eps = s x changes along the path): measured 0.116% of v at 100
    levels, 1.7e-3 bits/dim at v = 1; the bounds are about twice these, the arithmetic at z itself is exact."""
    ms.set_context(mode=ms.GRAPH_MODE)
    sde = VPSDE(get_beta_schedule("linear", T))
    model = AffineModel(sde, np.zeros(12), np.eye(12), "eps")
    x = np.stack([np.full((3, 2, 2), v, np.float32) for v in (0.0, 0.5, 1.0)])  # D = 12: channels count
    out = ode_bpd(sde, model, ms.Tensor(x))
    np.testing.assert_allclose(out["delta_logp"], 0.0, atol=1e-5)
    np.testing.assert_allclose(out["z"], x, rtol=2.5e-3)
    z = out["z"].reshape(3, -1).astype(np.float64)
    np.testing.assert_allclose(out["total_bpd"], np.log2(2 * np.pi) / 2 + (z**2).mean(1) / (2 * np.log(2)) + 7,
                               atol=1e-5)
    np.testing.assert_allclose(out["total_bpd"], [8.32575, 8.50609, 9.04710], atol=4e-3)
    assert out["total_bpd"][0] == pytest.approx(8.32575, abs=1e-5)  # z = 0 exactly: the flow is linear in x

    # dequantisation: uniform noise on [-1/256, 1/256) per pixel, drawn from the seed. The solver's map is linear and
    # the same in every dimension here, z = kappa x, so the noise is z / kappa - x, kappa read off the v = 1 image
    kappa = float(out["z"][2].mean())
    grid = np.round((x[:2] + 1) * 127.5) / 127.5 - 1  # two images on the 8-bit grid
    outs = [ode_bpd(sde, model, ms.Tensor(grid), dequantize=True, seed=s) for s in (7, 7, 8)]
    noise = outs[0]["z"] / kappa - grid
    assert np.abs(noise).max() <= 1 / 256 + 1e-6 and noise.std() == pytest.approx(2 / 256 / np.sqrt(12), rel=0.3)
    np.testing.assert_array_equal(outs[0]["z"], outs[1]["z"])
    assert not np.allclose(outs[0]["z"], outs[2]["z"])


def test_bad_arguments_name_the_valid_values():
    diffusion = GaussianDiffusion(get_beta_schedule("linear", 10))
    x = ms.Tensor(np.zeros((1, 1, 2, 2), np.float32))
    with pytest.raises(ValueError, match=r"hutchinson must be one of \['rademacher', 'gaussian'\]"):
        ode_bpd(diffusion, None, x, hutchinson="exact")
    for steps in (1, 2.0, True):
        with pytest.raises(ValueError, match="num_steps must be an integer >= 2"):
            ode_bpd(diffusion, None, x, num_steps=steps)


def test_log_snr_levels():
    sde = VPSDE(get_beta_schedule("linear", T))
    levels, log_snr = log_snr_levels(sde, 100)
    assert levels[-1] == T - 1 and np.all(np.diff(levels) > 0)
    # near the data one label spans more lambda than a step (0.79 from label 0 to 1, the step 0.195): every label
    # up to 10 is visited, and the merged targets leave 94 levels
    assert levels[:11] == list(range(11)) and len(levels) == 94
    steps = -np.diff(log_snr[levels])
    assert np.median(steps) == pytest.approx((log_snr[0] - log_snr[-1]) / 99, rel=0.02)
    ve = VESDE(0.01, 50.0, 50)
    np.testing.assert_array_equal(log_snr_levels(ve, 1000)[0], np.arange(49, -1, -1))  # sigma_min first


def test_tiny_unet_gives_the_same_bits_per_dim_in_graph_and_pynative_mode():
    """A 4.6k-parameter U-Net on two 8x8 images, 3 levels (4 network calls with their vector-Jacobian products)."""
    diffusion = GaussianDiffusion(get_beta_schedule("linear", 100))
    ms.set_seed(0)
    net = Unet(dim=4, dim_mults=(1,), channels=1, heads=1, dim_head=4, resnet_block_groups=2)
    net.set_train(False)
    images = np.round(np.random.default_rng(0).uniform(0, 255, (2, 1, 8, 8))) / 127.5 - 1
    results = {}
    for mode in (ms.PYNATIVE_MODE, ms.GRAPH_MODE):
        ms.set_context(mode=mode)
        results[mode] = ode_bpd(diffusion, net, ms.Tensor(images.astype(np.float32)), num_steps=3, dequantize=True,
                                seed=0)
    pynative, graph = results[ms.PYNATIVE_MODE], results[ms.GRAPH_MODE]
    assert np.isfinite(pynative["total_bpd"]).all() and np.all(pynative["total_bpd"] > 0)
    np.testing.assert_allclose(graph["z"], pynative["z"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(graph["total_bpd"], pynative["total_bpd"], rtol=1e-5)
