import numpy as np
import pytest

from ms_ddpm.processes import GaussianDiffusion
from ms_ddpm.schedules import SCHEDULES, cosine_beta_schedule, get_beta_schedule
from tests.helpers import import_torch_reference

DIFFUSERS_NAMES = {"linear": "linear", "cosine": "squaredcos_cap_v2", "quadratic": "scaled_linear", "sigmoid": "sigmoid"}


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("T", [1000, 200])
def test_betas_and_posterior_variance_match_diffusers(name, T):
    torch, diffusers = import_torch_reference()
    ref = diffusers.DDPMScheduler(num_train_timesteps=T, beta_schedule=DIFFUSERS_NAMES[name])
    diffusion = GaussianDiffusion(get_beta_schedule(name, T))
    np.testing.assert_allclose(diffusion.betas, ref.betas.numpy(), rtol=1e-5)
    # diffusers keeps its tables in float32: its cumprod drifts (1e-5 relative at alpha_bar_T ~ 1e-5) and
    # 1 - alpha_bar_t / alpha_bar_{t-1} cancels (4e-4 relative at small t). Its formulas are therefore evaluated on
    # float64 tables built from its own betas.
    ref.alphas_cumprod = torch.cumprod(1 - ref.betas.double(), dim=0)
    # atol: the cosine schedule's last beta is 0.999, and 1 - beta in float32 betas is off by 1e-5 relative
    np.testing.assert_allclose(diffusion.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=1e-5, atol=1e-9)
    # "fixed_small" variance is beta_tilde_t (Ho et al. Eq. 7) for t >= 1
    ref_var = np.array([ref._get_variance(t).item() for t in range(1, T)])
    np.testing.assert_allclose(diffusion.posterior_variance[1:], ref_var, rtol=1e-5)


def test_cosine_schedule_matches_its_formula():
    T, s = 1000, 0.008
    f = np.cos((np.arange(T + 1) / T + s) / (1 + s) * np.pi / 2) ** 2
    alpha_bar = f / f[0]  # Nichol & Dhariwal Eq. 17
    betas = cosine_beta_schedule(T)
    np.testing.assert_allclose(betas, np.minimum(1 - alpha_bar[1:] / alpha_bar[:-1], 0.999), rtol=1e-10)
    assert betas.max() == 0.999
    np.testing.assert_allclose(np.cumprod(1 - betas)[:-1], alpha_bar[1:-1], rtol=1e-9)


def test_posterior_tables_match_their_formulas():
    betas = get_beta_schedule("linear", 100)
    d = GaussianDiffusion(betas)
    ab = np.cumprod(1 - betas)
    ab_prev = np.append(1.0, ab[:-1])
    np.testing.assert_allclose(d.posterior_variance, betas * (1 - ab_prev) / (1 - ab), rtol=1e-12)
    np.testing.assert_allclose(d.posterior_mean_coef1, betas * np.sqrt(ab_prev) / (1 - ab), rtol=1e-12)
    np.testing.assert_allclose(d.posterior_mean_coef2, (1 - ab_prev) * np.sqrt(1 - betas) / (1 - ab), rtol=1e-12)
    assert d.posterior_variance[0] == 0
    np.testing.assert_allclose(d.posterior_log_variance_clipped[0], np.log(d.posterior_variance[1]))
    np.testing.assert_allclose(d.posterior_log_variance_clipped[1:], np.log(d.posterior_variance[1:]))
    large = GaussianDiffusion(betas, variance_type="fixed_large")
    np.testing.assert_allclose(large.model_log_variance[1:], np.log(betas[1:]))


def test_linear_schedule_is_not_rescaled_for_short_chains():
    # Documented in schedules.py: T=200 keeps alpha_bar_T = 0.13; improved-diffusion's rescaling brings it near 0.
    assert np.prod(1 - get_beta_schedule("linear", 200)) == pytest.approx(0.1322, abs=1e-4)
    rescaled = get_beta_schedule("linear", 200, beta_start=0.1 / 200, beta_end=20 / 200)
    assert np.prod(1 - rescaled) < 1e-4


def test_bad_schedule_arguments_name_the_choices():
    with pytest.raises(ValueError, match=r"beta_schedule must be one of \['linear', 'cosine', 'quadratic', 'sigmoid'\]"):
        get_beta_schedule("cosin", 1000)
    with pytest.raises(ValueError, match="beta_start < beta_end"):
        get_beta_schedule("linear", 1000, beta_start=0.02, beta_end=1e-4)
    with pytest.raises(ValueError, match="positive integer"):
        get_beta_schedule("linear", 0)
    with pytest.raises(ValueError, match=r"objective must be one of \['eps', 'x0', 'v'\]"):
        GaussianDiffusion(get_beta_schedule("linear", 10), objective="noise")
    with pytest.raises(ValueError, match="variance_type must be one of"):
        GaussianDiffusion(get_beta_schedule("linear", 10), variance_type="learned")
