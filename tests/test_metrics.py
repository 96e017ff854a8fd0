"""Frechet / kernel distances against direct computations, PSNR of known errors, and the DDPM bound in bits/dim
against closed forms.

The likelihood tests use data x_0 = 8-bit quantisation of N(MU, S^2) (clipped to [-1, 1]) and the exact eps-network of
the continuous N(MU, S^2). Everything about this pair is Gaussian, so each term of the bound has a closed form.
"""
import mindspore as ms
import numpy as np
import pytest
from scipy import linalg
from scipy.stats import norm

from ms_ddpm.processes import GaussianDiffusion
from ms_ddpm.metrics import (calc_bpd_loop, discretized_gaussian_log_likelihood, feature_statistics, frechet_distance,
                             kernel_distance, prior_bpd, vb_terms_bpd)
from ms_ddpm.metrics.reconstruction import psnr
from ms_ddpm.schedules import get_beta_schedule

MU, S = 0.1, 0.25  # little mass beyond [-1, 1] (P(x > 1) = 2e-4), so the continuous Gaussian fits the 8-bit data

# ------------------------------------------------------------------------------------------------- Frechet / KID


def random_spd(rng, d):
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_distance_equals_a_direct_computation():
    rng = np.random.default_rng(0)
    d = 6
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = random_spd(rng, d), random_spd(rng, d)
    # Tr (S1 S2)^{1/2} = sum of sqrt(eigenvalues) of the symmetric S1^{1/2} S2 S1^{1/2}
    r1 = linalg.sqrtm(s1).real
    tr_covmean = np.sqrt(np.linalg.eigvalsh(r1 @ s2 @ r1)).sum()
    direct = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_covmean
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(direct, rel=1e-9)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(direct, rel=1e-9)
    assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-9


def test_frechet_distance_of_diagonal_gaussians_has_its_closed_form():
    """W2^2(N(m1, diag c1), N(m2, diag c2)) = ||m1 - m2||^2 + sum (sqrt(c1) - sqrt(c2))^2."""
    m1, m2 = np.array([0.0, 1.0, -2.0]), np.array([0.5, 1.0, 0.0])
    c1, c2 = np.array([1.0, 4.0, 0.25]), np.array([2.0, 1.0, 0.25])
    expected = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(c1) - np.sqrt(c2)) ** 2)
    assert frechet_distance(m1, np.diag(c1), m2, np.diag(c2)) == pytest.approx(expected, rel=1e-10)


def test_feature_statistics_and_fd_of_samples():
    rng = np.random.default_rng(1)
    f1 = rng.normal(0.0, 1.0, (20000, 3))
    f2 = rng.normal(0.5, 2.0, (20000, 3))
    mu1, s1 = feature_statistics(f1)
    np.testing.assert_allclose(mu1, f1.mean(0))
    np.testing.assert_allclose(s1, np.cov(f1.T))
    mu2, s2 = feature_statistics(f2)
    # closed form 3 * 0.5^2 + 3 * (1 - 2)^2 = 3.75; the sample statistics carry about 1% error
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(3.75, rel=0.03)


def test_kernel_distance_equals_the_unbiased_mmd_formula():
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((30, 5)), rng.standard_normal((30, 5)) + 0.3
    k = lambda a, b: (a @ b / 5 + 1) ** 3  # noqa: E731
    m = 30
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    direct = (xx + yy) / (m * (m - 1)) - 2 * xy / m**2
    # a subset of all 30 rows is a permutation, which the estimator does not see
    assert kernel_distance(x, y, num_subsets=3) == pytest.approx(direct, rel=1e-10)


def test_kernel_distance_is_near_zero_for_one_distribution_and_positive_for_shifted():
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((2000, 16)), rng.standard_normal((2000, 16))
    same = kernel_distance(a, b, num_subsets=20, max_subset_size=1000)
    shifted = kernel_distance(a, b + 0.5, num_subsets=20, max_subset_size=1000)
    # unbiased: for one distribution the estimate scatters around 0 (about +-3e-3 over seeds at this size); a shift
    # of 0.5 per feature gives about 1.04
    assert abs(same) < 0.01 and shifted > 0.5, (same, shifted)


def test_metric_inputs_are_checked():
    with pytest.raises(ValueError, match="shapes do not match"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="features must be an"):
        feature_statistics(np.zeros(5))
    with pytest.raises(ValueError, match="same D"):
        kernel_distance(np.zeros((10, 3)), np.zeros((10, 4)))


def test_psnr_of_known_errors():
    """10 log10(2^2 / MSE) per image (peak-to-peak 2 in [-1, 1]), then the mean over images: errors of +-0.1 and
    0.02 everywhere give 10 log10(400) = 26.02 dB and 10 log10(10^4) = 40 dB; a reconstruction of 1.5 against 0.9 is
    clipped to 1 first, an error of 0.1 again (unclipped: 10.46 dB)."""
    rng = np.random.default_rng(0)
    images = rng.uniform(-0.8, 0.8, (3, 1, 4, 4)).astype(np.float32)
    images[2] = 0.9
    reconstructions = images.copy()
    reconstructions[0] += 0.1 * rng.choice([-1.0, 1.0], (1, 4, 4)).astype(np.float32)
    reconstructions[1] -= 0.02
    reconstructions[2] = 1.5
    assert psnr(reconstructions, images) == pytest.approx((2 * 10 * np.log10(400) + 40) / 3, rel=1e-5)


# ------------------------------------------------------------------------------------------------ bits per dimension


GRID = np.arange(256) / 127.5 - 1.0
BIN_LO = np.where(np.arange(256) == 0, -np.inf, GRID - 1 / 255)
BIN_HI = np.where(np.arange(256) == 255, np.inf, GRID + 1 / 255)


def data_bin_probabilities():
    """P(x_0 = GRID[k]) for the 8-bit quantised, clipped N(MU, S^2)."""
    return norm.cdf((BIN_HI - MU) / S) - norm.cdf((BIN_LO - MU) / S)


def exact_eps_model(alphas_cumprod):
    def model(x, t):
        ab = alphas_cumprod[t.asnumpy()].reshape(-1, 1, 1, 1)
        centred = x.asnumpy().astype(np.float64) - np.sqrt(ab) * MU
        return ms.Tensor((centred * np.sqrt(1 - ab) / (ab * S**2 + 1 - ab)).astype(np.float32))

    return model


def bin_log_mass(x, mean, scale):
    """log of N(mean, scale^2)'s mass on x's 8-bit bin, in float64, taking the CDF difference on the far side of the
    mean (where it keeps its precision)."""
    hi = (np.where(x > 0.999, np.inf, x + 1 / 255) - mean) / scale
    lo = (np.where(x < -0.999, -np.inf, x - 1 / 255) - mean) / scale
    return np.log(np.where(lo > 0, norm.sf(lo) - norm.sf(hi), norm.cdf(hi) - norm.cdf(lo)))


def closed_form_bound_per_value(diffusion):
    """E_{x_t ~ q}[bound] in bits/dim for x_0 = each GRID value, shape (256,), for the exact model, in NumPy float64.

    With k_t = sqrt(ab_t) S^2 / (ab_t S^2 + 1 - ab_t), x0_hat = MU + k_t (x_t - sqrt(ab_t) MU), so
    E[(x_0 - x0_hat)^2] = (x_0 - MU)^2 (1 - k_t sqrt(ab_t))^2 + k_t^2 (1 - ab_t), and the KL of two Gaussians whose
    means differ by coef1_t (x_0 - x0_hat) follows. The decoder's expectation over x_1 uses Gauss-Hermite quadrature.
    """
    ab = diffusion.alphas_cumprod
    k = np.sqrt(ab) * S**2 / (ab * S**2 + 1 - ab)
    sq = (GRID[:, None] - MU) ** 2 * (1 - k * np.sqrt(ab)) ** 2 + k**2 * (1 - ab)
    lv_q, lv_p = diffusion.posterior_log_variance_clipped, diffusion.model_log_variance
    kl = 0.5 * (-1 + lv_p - lv_q + np.exp(lv_q - lv_p) + diffusion.posterior_mean_coef1**2 * sq / np.exp(lv_p))
    nodes, weights = np.polynomial.hermite_e.hermegauss(30)
    x1 = np.sqrt(ab[0]) * GRID[:, None] + np.sqrt(1 - ab[0]) * nodes
    mean = MU + k[0] * (x1 - np.sqrt(ab[0]) * MU)
    scale = np.exp(0.5 * lv_p[0])
    decoder = -(bin_log_mass(GRID[:, None], mean, scale) * weights).sum(1) / weights.sum()
    prior = 0.5 * (-1 - np.log(1 - ab[-1]) + (1 - ab[-1]) + ab[-1] * GRID**2)
    return (kl[:, 1:].sum(1) + decoder + prior) / np.log(2)


def test_decoder_term_matches_scipy_normal_cdf():
    rng = np.random.default_rng(0)
    x = np.concatenate([GRID[[0, 1, 2, 127, 128, 253, 254, 255]], rng.choice(GRID, 56)])
    log_scales = rng.uniform(np.log(0.002), np.log(0.3), x.shape)
    means = x + rng.normal(0, 3, x.shape) * np.exp(log_scales)  # up to a few scales away: log-probs down to -40
    got = discretized_gaussian_log_likelihood(*(ms.Tensor(a.astype(np.float32)) for a in (x, means, log_scales)))
    x, means = x.astype(np.float32).astype(np.float64), means.astype(np.float32).astype(np.float64)
    scale = np.exp(log_scales.astype(np.float32).astype(np.float64))
    direct = bin_log_mass(x, means, scale)
    # below 1e-12 the probability is clamped, as in improved-diffusion
    floor = np.log(1e-12)
    clamped = direct < floor
    assert clamped.any() and (direct[~clamped] < -10).any()  # the comparison reaches into the tails
    np.testing.assert_allclose(got.asnumpy()[clamped], floor, rtol=1e-6)
    # float32 inputs: z = (x +- 1/255 - mean) / scale carries a relative error of ~1e-6 times |x| / (scale * |z|)
    np.testing.assert_allclose(got.asnumpy()[~clamped], direct[~clamped], rtol=2e-4, atol=2e-3)


def test_prior_term_is_the_kl_to_the_standard_normal():
    diffusion = GaussianDiffusion(get_beta_schedule("linear", 100))  # alpha_bar_T = 0.36: a prior term worth testing
    x0 = np.random.default_rng(0).choice(GRID, (5, 1, 2, 2))
    ab = diffusion.alphas_cumprod[-1]
    expected = 0.5 * (-1 - np.log(1 - ab) + (1 - ab) + ab * x0**2).mean(axis=(1, 2, 3)) / np.log(2)
    got = prior_bpd(diffusion, ms.Tensor(x0.astype(np.float32))).asnumpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5)


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_bound_terms_of_the_exact_model_match_their_closed_form(variance_type):
    """The expected bound, taken through `vb_terms_bpd` / `prior_bpd` by quadrature over x_t, against the closed form.

    Then the bound against the true NLL of the data, its entropy H = -sum_k P_k log2 P_k = 7.041 bits/dim. The bound
    must be >= H. It is not equal: the exact model of the *continuous* Gaussian, with fixed reverse variances, leaves
    a gap of 0.123 bits/dim (1.7%) for fixed_large (sigma_t^2 = beta_t) and 0.750 for fixed_small (beta_tilde_t),
    mostly from the first few steps where the true reverse variance beta_tilde_t + coef1^2 Var[x_0 | x_t] differs most
    from either choice; it does not shrink with T for this unscaled linear schedule (0.15 / 0.63 at T = 4000).
    """
    T = 1000
    diffusion = GaussianDiffusion(get_beta_schedule("linear", T), variance_type=variance_type, clip_denoised=False)
    ab = diffusion.alphas_cumprod
    model = exact_eps_model(ab)
    # KL terms, t >= 1: quadratic in the noise of x_t, so 3 Gauss-Hermite nodes are exact
    nodes, weights = np.polynomial.hermite_e.hermegauss(3)
    x0, t, z = np.meshgrid(GRID, np.arange(1, T), nodes, indexing="ij")
    kl = bound_terms(diffusion, model, x0, t, z).reshape(x0.shape) @ (weights / weights.sum())
    # decoder, t = 0: 30 nodes
    nodes, weights = np.polynomial.hermite_e.hermegauss(30)
    x0, t, z = np.meshgrid(GRID, [0], nodes, indexing="ij")
    decoder = bound_terms(diffusion, model, x0, t, z).reshape(x0.shape) @ (weights / weights.sum())
    prior = prior_bpd(diffusion, ms.Tensor(GRID.reshape(-1, 1, 1, 1).astype(np.float32))).asnumpy()
    per_value = kl.sum(1) + decoder[:, 0] + prior
    np.testing.assert_allclose(per_value, closed_form_bound_per_value(diffusion), rtol=2e-5)  # float32: 3e-6

    p = data_bin_probabilities()
    bound, entropy = p @ per_value, -(p * np.log2(p)).sum()
    assert entropy == pytest.approx(7.0407, abs=1e-4)
    gap = {"fixed_large": 0.1230, "fixed_small": 0.7505}[variance_type]
    assert bound >= entropy and bound - entropy == pytest.approx(gap, abs=1e-3), (bound, entropy)


def bound_terms(diffusion, model, x0, t, z):
    """vb_terms_bpd at x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) z, for flat arrays of (x_0, t, z)."""
    x0, t, z = x0.ravel(), t.ravel().astype(np.int32), z.ravel()
    ab = diffusion.alphas_cumprod[t]
    x_t = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * z
    x0_ms, x_t_ms = (ms.Tensor(a.reshape(-1, 1, 1, 1).astype(np.float32)) for a in (x0, x_t))
    t_ms = ms.Tensor(t)
    return vb_terms_bpd(diffusion, model(x_t_ms, t_ms), x0_ms, x_t_ms, t_ms).asnumpy()


def test_calc_bpd_loop_is_an_unbiased_estimate_of_the_bound():
    """The loop's Monte Carlo bound (one x_t per step and image) against the closed form, on a short chain."""
    T = 20  # alpha_bar_T = 0.82: the prior term is large here, and the loop stays fast
    diffusion = GaussianDiffusion(get_beta_schedule("linear", T), variance_type="fixed_large", clip_denoised=False)
    rng = np.random.default_rng(0)
    x0 = rng.choice(GRID, size=(4000, 1, 1, 1), p=data_bin_probabilities() / data_bin_probabilities().sum())
    out = calc_bpd_loop(diffusion, exact_eps_model(diffusion.alphas_cumprod), ms.Tensor(x0.astype(np.float32)), seed=1)
    assert out["vb"].shape == (4000, T)
    np.testing.assert_allclose(out["total_bpd"], out["vb"].sum(1) + out["prior_bpd"], rtol=1e-6)
    # column t is vb_terms_bpd at t with the loop's noise draw (drawn from T - 1 down to 0)
    noise_rng = np.random.default_rng(1)
    draws = {t: noise_rng.standard_normal(x0.shape, dtype=np.float32) for t in range(T - 1, -1, -1)}
    for t in (T - 1, 7, 0):
        np.testing.assert_allclose(out["vb"][:, t], bound_terms(diffusion, exact_eps_model(diffusion.alphas_cumprod),
                                                                x0, np.full(x0.shape, t), draws[t]),
                                   rtol=1e-4, atol=1e-6)
    # per image, the loop's draw minus its expectation over x_t: mean zero, if the loop is right
    residual = out["total_bpd"] - closed_form_bound_per_value(diffusion)[np.searchsorted(GRID, x0.ravel() - 1e-6)]
    assert abs(residual.mean()) < 4 * residual.std() / np.sqrt(len(residual)), (residual.mean(), residual.std())
