"""Score-based, fast and Langevin samplers: known answers on Gaussian data, DPM-Solver++ against diffusers.

Known answers: with data x_0 ~ N(MU, S^2) per pixel, every noise level has a Gaussian marginal, so the exact networks
are closed-form NumPy functions:
    DDPM eps-network   eps*(x_t, t) = (x_t - sqrt(ab_t) MU) sqrt(1 - ab_t) / (ab_t S^2 + 1 - ab_t)
    sub-VP eps-network  for sub-VP's std 1 - ab_t: (x_t - sqrt(ab_t) MU) (1 - ab_t) / (ab_t S^2 + (1 - ab_t)^2)
    NCSN / VE score     s*(x, sigma) = -(x - MU) / (S^2 + sigma^2)
and a correct sampler driven by them must return samples with mean MU and standard deviation S.
"""
from unittest import mock

import mindspore as ms
import numpy as np
import pytest

from ms_ddpm.losses import DiffusionLoss
from ms_ddpm.processes import VESDE, VPSDE, GaussianDiffusion, NoiseLevels, SubVPSDE, geometric_sigmas
from ms_ddpm.samplers import (AnnealedLangevinSampler, DPMSolverSampler, EulerMaruyamaSampler, PredictorCorrectorSampler,
                              ProbabilityFlowSampler, create_sampler)
from ms_ddpm.samplers.dpm_solver import dpm_solver_timesteps
from ms_ddpm.schedules import get_beta_schedule
from tests.helpers import import_torch_reference

T = 1000
MU, S = 0.3, 0.5
SHAPE = (2000, 1, 2, 2)  # 8000 independent pixels
N = int(np.prod(SHAPE))
# Tolerances: 4 standard errors of the Monte Carlo estimates (mean: S / sqrt(N) = 0.0056, std: S / sqrt(2N) = 0.0040)
# plus a discretisation allowance of 0.01 (2% of S). The step counts below were chosen so that each sampler's own
# bias is under 0.007: measured with 1e5 samples for the stochastic samplers and exactly (the deterministic ones are
# affine maps x_T -> x_0 here) for DDIM / ODE / DPM-Solver. Fewer steps give real, expected biases, e.g. DDIM's
# first-order std error of about -1.4 S / steps, and DPM-Solver's final jump to x0_hat at timestep T / (steps + 1),
# which shrinks the std by a factor sqrt(ab S^2 / (ab S^2 + 1 - ab)) there (-0.09 at 10 steps).
TOL_MEAN = 4 * S / np.sqrt(N) + 0.01
TOL_STD = 4 * S / np.sqrt(2 * N) + 0.01


def linear_diffusion(objective="eps", T=T):
    # clip_denoised=False: the Gaussian data are not confined to [-1, 1]
    return GaussianDiffusion(get_beta_schedule("linear", T), objective=objective, clip_denoised=False)


def exact_eps_model(alphas_cumprod, subvp=False):
    """The optimal eps-network for N(MU, S^2) data (VP, or sub-VP with std 1 - ab)."""

    def model(x, t):
        ab = alphas_cumprod[t.asnumpy()].reshape(-1, 1, 1, 1)
        std = 1 - ab if subvp else np.sqrt(1 - ab)
        centred = x.asnumpy().astype(np.float64) - np.sqrt(ab) * MU
        return ms.Tensor((centred * std / (ab * S**2 + std**2)).astype(np.float32))

    return model


def exact_score_model(sigmas):
    """The score of N(MU, S^2 + sigma_i^2) at level index i, the optimal NCSN."""

    def model(x, t):
        sigma = np.asarray(sigmas)[t.asnumpy()].reshape(-1, 1, 1, 1)
        return ms.Tensor((-(x.asnumpy().astype(np.float64) - MU) / (S**2 + sigma**2)).astype(np.float32))

    return model


def vp_case(name, steps, **kwargs):
    def build():
        diffusion = linear_diffusion()
        return create_sampler(name, diffusion, **kwargs), exact_eps_model(diffusion.alphas_cumprod), steps

    return build


def subvp_case(name, steps):
    def build():
        sde = SubVPSDE(get_beta_schedule("linear", T))
        return create_sampler(name, sde), exact_eps_model(sde.alphas_cumprod, subvp=True), steps

    return build


def ve_case(name, steps, **kwargs):
    def build():
        sde = VESDE(sigma_min=0.01, sigma_max=50.0, N=1000)
        return create_sampler(name, sde, **kwargs), exact_score_model(sde.sigmas), steps

    return build


def ald_case():
    sigmas = geometric_sigmas(1.0, 0.01, 10)
    return create_sampler("ald", sigmas, step_lr=2e-4), exact_score_model(sigmas), 100  # 100 steps per level


KNOWN_ANSWER_CASES = {
    "ddpm_1000": vp_case("ddpm", 1000),
    "ddim_200": vp_case("ddim", 200),
    "euler_maruyama_vp_250": vp_case("euler_maruyama", 250),
    "pc_vp_200": vp_case("pc", 200, snr=0.16, corrector_steps=1),
    "ode_vp_50": vp_case("ode", 50),
    "dpm_solver_50": vp_case("dpm_solver", 50),
    "euler_maruyama_subvp_250": subvp_case("euler_maruyama", 250),
    "ode_subvp_50": subvp_case("ode", 50),
    "euler_maruyama_ve_200": ve_case("euler_maruyama", 200),
    "pc_ve_200": ve_case("pc", 200, snr=0.16, corrector_steps=1),
    "ode_ve_100": ve_case("ode", 100),
    "ald_10x100": ald_case,
}


@pytest.mark.parametrize("case", list(KNOWN_ANSWER_CASES))
def test_exact_model_reproduces_gaussian_data(case):
    sampler, model, steps = KNOWN_ANSWER_CASES[case]()
    sampler.set_timesteps(steps)
    x = sampler.sample(model, SHAPE, seed=0, progress=False).asnumpy()
    assert np.all(np.isfinite(x))
    assert abs(x.mean() - MU) < TOL_MEAN, (x.mean(), MU, TOL_MEAN)
    assert abs(x.std() - S) < TOL_STD, (x.std(), S, TOL_STD)


# ---------------------------------------------------------------------------------------------- probability-flow ODE


def test_probability_flow_is_deterministic_and_invertible():
    diffusion = linear_diffusion()
    model = exact_eps_model(diffusion.alphas_cumprod)
    sampler = ProbabilityFlowSampler(diffusion)
    z = ms.Tensor(np.random.default_rng(0).standard_normal((500, 1, 2, 2), dtype=np.float32))
    errors = {}
    for steps in (50, 100):
        sampler.set_timesteps(steps)
        assert len(sampler.timesteps) == 2 * steps - 1  # Heun: two calls per step, Euler onto the data
        x0 = sampler.sample(model, z.shape, seed=1, x_T=z, progress=False)
        again = sampler.sample(model, z.shape, seed=2, x_T=z, progress=False)
        np.testing.assert_array_equal(x0.asnumpy(), again.asnumpy())  # no noise: x_T fixes x_0
        errors[steps] = np.abs(sampler.encode(model, x0).asnumpy() - z.asnumpy()).max()
    # encode(decode(z)) = z up to the solvers' error: Heun is not exactly reversible (local error O(h^3)), and the
    # first encoding step evaluates the network at x_0 with the smallest label. Measured: 4.6e-4 at 50 steps and
    # 5.6e-5 at 100 (|z| up to 4); the bound leaves 4x room, and halving h must cut the error by well over 4.
    assert errors[50] < 2e-3, errors
    assert errors[100] < errors[50] / 4, errors


def test_ode_call_order_is_checked():
    sampler = ProbabilityFlowSampler(linear_diffusion(T=100))
    sampler.set_timesteps(10)
    x = ms.Tensor(np.zeros((2, 1, 2, 2), np.float32))
    with pytest.raises(ValueError, match="step called out of order"):
        sampler.step(x, int(sampler.timesteps[1]) + 1, x)


# ------------------------------------------------------------------------------------- one step against the papers


def test_pc_predictor_and_corrector_follow_algorithms_2_and_3():
    rng = np.random.default_rng(0)
    x_np, z_np, s_np = (rng.standard_normal((4, 1, 3, 3)).astype(np.float32) for _ in range(3))
    x, z, out = ms.Tensor(x_np), ms.Tensor(z_np), ms.Tensor(s_np)
    # VP predictor (Algorithm 3): x' = (2 - sqrt(1 - beta_i)) x + beta_i s + sqrt(beta_i) z, s = -eps / sqrt(1 - ab)
    diffusion = linear_diffusion(T=100)
    vp = PredictorCorrectorSampler(diffusion, corrector_steps=0)
    t = 60
    vp._step_index = list(vp.timesteps).index(t)
    beta, ab = diffusion.betas[t], diffusion.alphas_cumprod[t]
    score = -s_np / np.sqrt(1 - ab)
    expected = (2 - np.sqrt(1 - beta)) * x_np + beta * score + np.sqrt(beta) * z_np
    np.testing.assert_allclose(vp.step(out, t, x, z).prev_sample.asnumpy(), expected, rtol=1e-5, atol=1e-5)
    # VE predictor (Algorithm 2): x' = x + (sigma_i^2 - sigma_{i-1}^2) s + sqrt(sigma_i^2 - sigma_{i-1}^2) z
    sde = VESDE(0.01, 50.0, 100)
    ve = PredictorCorrectorSampler(sde, corrector_steps=1, snr=0.2)
    i = 30
    ve._step_index = 2 * i
    corrected = ve.step(out, i, x, z).prev_sample.asnumpy()  # the corrector call at level i comes first
    # corrector (Algorithm 4 with Song's batch-averaged norms): eps = 2 (r ||z|| / ||s||)^2
    norm = lambda a: np.sqrt((a.reshape(4, -1) ** 2).sum(1)).mean()  # noqa: E731
    eps = 2 * (0.2 * norm(z_np) / norm(s_np)) ** 2
    np.testing.assert_allclose(corrected, x_np + eps * s_np + np.sqrt(2 * eps) * z_np, rtol=1e-5, atol=1e-5)
    g2 = sde.sigmas[i] ** 2 - sde.sigmas[i + 1] ** 2
    predicted = ve.step(out, i, x, z).prev_sample.asnumpy()
    np.testing.assert_allclose(predicted, x_np + g2 * s_np + np.sqrt(g2) * z_np, rtol=1e-5, atol=1e-5)


def test_sdes_match_their_discrete_noise_levels():
    betas = get_beta_schedule("linear", T)
    vp = VPSDE(betas)
    # exp(-int_0^{t_n} beta(s) ds) with the piecewise-constant beta(t) is the DDPM alpha_bar_n exactly
    np.testing.assert_allclose(np.exp(-np.cumsum(vp.continuous_betas) / T), vp.alphas_cumprod, rtol=1e-12)
    np.testing.assert_allclose(vp.continuous_betas, T * betas, rtol=0.011)  # = T beta_n to first order
    assert vp.time(T - 1) == 1.0 and vp.time(None) == 0.0
    sub = SubVPSDE(betas)
    assert sub.marginal(500)[1] == pytest.approx(1 - vp.alphas_cumprod[500])
    ve = VESDE(0.01, 50.0, 11)
    t = np.array([ve.time(i) for i in range(11)])
    np.testing.assert_allclose(0.01 * (50.0 / 0.01) ** t, ve.sigmas, rtol=1e-12)
    # g(t)^2 = d sigma^2 / dt (Eq. 30), by central differences of sigma(t)^2
    h, ti = 1e-6, t[4]
    dsigma2 = ((0.01 * 5000 ** (ti + h)) ** 2 - (0.01 * 5000 ** (ti - h)) ** 2) / (2 * h)
    assert ve.coefficients(4)[1] == pytest.approx(dsigma2, rel=1e-6)


def test_add_noise_uses_each_processes_marginal():
    x0 = ms.Tensor(np.full((3, 1, 2, 2), 0.5, np.float32))
    noise = ms.Tensor(np.ones((3, 1, 2, 2), np.float32))
    labels = ms.Tensor(np.array([0, 5, 9], np.int32))
    sde = VESDE(0.01, 50.0, 10)
    got = create_sampler("pc", sde).add_noise(x0, noise, labels).asnumpy()[:, 0, 0, 0]
    np.testing.assert_allclose(got, 0.5 + sde.sigmas[[0, 5, 9]], rtol=1e-6)
    got = AnnealedLangevinSampler(sde).add_noise(x0, noise, labels).asnumpy()[:, 0, 0, 0]
    np.testing.assert_allclose(got, 0.5 + sde.sigmas[[0, 5, 9]], rtol=1e-6)
    diffusion = linear_diffusion(T=10)
    got = EulerMaruyamaSampler(diffusion).add_noise(x0, noise, labels).asnumpy()
    np.testing.assert_allclose(got, diffusion.q_sample(x0, labels, noise).asnumpy(), rtol=1e-6)


def test_stochastic_score_samplers_are_reproducible_from_the_seed():
    sampler = create_sampler("pc", linear_diffusion(T=100))
    sampler.set_timesteps(10)
    model = exact_eps_model(sampler.sde.alphas_cumprod)
    a = sampler.sample(model, (4, 1, 2, 2), seed=3, progress=False).asnumpy()
    b = sampler.sample(model, (4, 1, 2, 2), seed=3, progress=False).asnumpy()
    c = sampler.sample(model, (4, 1, 2, 2), seed=4, progress=False).asnumpy()
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    ald = AnnealedLangevinSampler(geometric_sigmas(1.0, 0.01, 3), n_steps_each=2)
    steps = list(ald.sample_progressive(exact_score_model(ald.sigmas), (4, 1, 2, 2), seed=0, progress=False))
    assert len(steps) == 3 * 2 + 1  # L levels x n_steps_each, then the denoising step
    np.testing.assert_array_equal(ald.timesteps, [0, 0, 1, 1, 2, 2, 2])


# ---------------------------------------------------------------------------------------------------------- NCSN


def test_geometric_sigmas():
    sigmas = geometric_sigmas(1.0, 0.01, 10)
    assert sigmas[0] == pytest.approx(1.0) and sigmas[-1] == pytest.approx(0.01)
    np.testing.assert_allclose(sigmas[1:] / sigmas[:-1], (0.01) ** (1 / 9), rtol=1e-12)


def test_ncsn_loss_of_the_exact_score_has_its_known_value():
    """NCSN's loss (`DiffusionLoss` of its levels): for N(MU, S^2) data the optimal score gives 1/2 E||sigma s + z||^2 = D/2 S^2 / (S^2 + sigma^2) per level."""
    sigmas = geometric_sigmas(2.0, 0.05, 5)
    loss_fn = DiffusionLoss(lambda x, labels: exact_score_model(sigmas)(x, labels), NoiseLevels(sigmas))
    rng = np.random.default_rng(0)
    shape = (20000, 1, 2, 2)
    x = ms.Tensor(rng.normal(MU, S, shape).astype(np.float32))
    labels_np = rng.integers(0, len(sigmas), shape[0]).astype(np.int32)
    noise = ms.Tensor(rng.standard_normal(shape, dtype=np.float32))
    loss = float(loss_fn(x, ms.Tensor(labels_np), noise).asnumpy())
    expected = 4 / 2 * np.mean(S**2 / (S**2 + sigmas[labels_np] ** 2))
    # per-sample loss has std about 0.9 (a scaled chi-square with 4 dof); 4 standard errors of the mean
    assert abs(loss - expected) < 4 * 0.9 / np.sqrt(shape[0]), (loss, expected)
    # a wrong score (the data std ignored) must do worse
    wrong = DiffusionLoss(lambda x, labels: ms.Tensor(-(x.asnumpy() - MU) / sigmas[labels.asnumpy()]
                                                      .reshape(-1, 1, 1, 1) ** 2), NoiseLevels(sigmas))
    assert float(wrong(x, ms.Tensor(labels_np), noise).asnumpy()) > loss + 0.1


# -------------------------------------------------------------------------------------- DPM-Solver++ vs diffusers


def dummy_model(x, t):
    """A fixed, smooth, non-trivial function of (x_t, t) standing in for a trained network (NumPy in, NumPy out)."""
    t = np.asarray(t, dtype=np.float64).reshape(-1, 1, 1, 1)
    return (0.8 * x + 0.3 * np.sin(2 * x + t / 150.0)).astype(np.float32)


PREDICTION_TYPES = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
DPM_SHAPE = (3, 2, 4, 5)


@pytest.mark.parametrize("steps,objective,spacing,schedule", [
    (10, "eps", "linspace", "linear"),
    (20, "eps", "linspace", "linear"),
    (10, "v", "trailing", "linear"),
    (20, "x0", "leading", "linear"),
    (20, "eps", "linspace", "cosine"),
])
def test_dpm_solver_matches_diffusers(steps, objective, spacing, schedule):
    torch, diffusers = import_torch_reference()
    diffusion = GaussianDiffusion(get_beta_schedule(schedule, T), objective=objective, clip_denoised=False)
    sampler = create_sampler("dpm_solver", diffusion, timestep_spacing=spacing)
    sampler.set_timesteps(steps)
    ours = sampler.sample(lambda x, t: ms.Tensor(dummy_model(x.asnumpy(), t.asnumpy())), DPM_SHAPE, seed=7,
                          progress=False).asnumpy()
    ref = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=T, beta_schedule={"linear": "linear", "cosine": "squaredcos_cap_v2"}[schedule],
        algorithm_type="dpmsolver++", solver_order=2, prediction_type=PREDICTION_TYPES[objective],
        timestep_spacing=spacing)  # defaults: lower_order_final=True, final_sigmas_type="zero"
    ref.set_timesteps(steps)
    x = torch.from_numpy(np.random.default_rng(7).standard_normal(DPM_SHAPE, dtype=np.float32))
    for t in ref.timesteps:
        x = ref.step(torch.from_numpy(dummy_model(x.numpy(), np.full(DPM_SHAPE[0], int(t)))), t, x).prev_sample
    np.testing.assert_array_equal(sampler.timesteps, ref.timesteps.numpy())
    np.testing.assert_allclose(ours, x.numpy(), rtol=1e-5, atol=1e-5 * np.abs(x.numpy()).max())
    assert np.abs(ours).std() > 0.1


def test_dpm_solver_timesteps():
    np.testing.assert_array_equal(dpm_solver_timesteps(1000, 4, "linspace"), [999, 749, 500, 250])
    np.testing.assert_array_equal(dpm_solver_timesteps(1000, 4, "leading"), [800, 600, 400, 200])
    np.testing.assert_array_equal(dpm_solver_timesteps(1000, 4, "trailing"), [999, 749, 499, 249])


def test_dpm_solver_first_step_is_ddim():
    """One step of DPM-Solver++1 from s to t equals deterministic DDIM (Lu et al., Eq. 10 / Sec. 3.2)."""
    diffusion = linear_diffusion(T=100)
    dpm = DPMSolverSampler(diffusion)
    dpm.set_timesteps(5)
    s, t = int(dpm.timesteps[0]), int(dpm.timesteps[1])
    rng = np.random.default_rng(0)
    x, eps = (ms.Tensor(rng.standard_normal((2, 1, 3, 3)).astype(np.float32)) for _ in range(2))
    ab_s, ab_t = diffusion.alphas_cumprod[s], diffusion.alphas_cumprod[t]
    x0 = (x.asnumpy() - np.sqrt(1 - ab_s) * eps.asnumpy()) / np.sqrt(ab_s)
    ddim = np.sqrt(ab_t) * x0 + np.sqrt(1 - ab_t) * eps.asnumpy()
    np.testing.assert_allclose(dpm.step(eps, s, x).prev_sample.asnumpy(), ddim, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------- bad input


def test_bad_arguments_name_the_valid_range():
    diffusion = linear_diffusion(T=100)
    with pytest.raises(ValueError, match=r"sampler must be one of \['ddpm', 'ddim', 'euler_maruyama', 'pc', 'ode', "
                                         r"'dpm_solver', 'ald', 'euler', 'euler_ancestral', 'heun', 'consistency'\]"):
        create_sampler("unipc", diffusion)
    for snr in (0, -0.1):
        with pytest.raises(ValueError, match="snr must be > 0"):
            PredictorCorrectorSampler(diffusion, snr=snr)
    with pytest.raises(ValueError, match="corrector_steps must be an integer >= 0"):
        PredictorCorrectorSampler(diffusion, corrector_steps=-1)
    with pytest.raises(ValueError, match="need 0 < sigma_min < sigma_max"):
        VESDE(sigma_min=1.0, sigma_max=1.0)
    with pytest.raises(ValueError, match="need 0 < sigma_min < sigma_max"):
        geometric_sigmas(0.01, 1.0, 10)
    with pytest.raises(ValueError, match="number of noise levels must be an integer >= 2"):
        geometric_sigmas(1.0, 0.01, 1)
    for make in (EulerMaruyamaSampler, PredictorCorrectorSampler, ProbabilityFlowSampler, DPMSolverSampler):
        with pytest.raises(ValueError, match="num_inference_steps must be an integer from 1 to the 100 training"):
            make(diffusion).set_timesteps(-5)
    with pytest.raises(ValueError, match="num_inference_steps must be an integer from 1 to the 10 training"):
        ProbabilityFlowSampler(VESDE(N=10)).set_timesteps(0)
    with pytest.raises(ValueError, match="n_steps_each must be an integer >= 1"):
        AnnealedLangevinSampler(geometric_sigmas(1.0, 0.01, 5), n_steps_each=0)
    with pytest.raises(ValueError, match="step_lr must be > 0"):
        AnnealedLangevinSampler(geometric_sigmas(1.0, 0.01, 5), step_lr=-1e-5)
    with pytest.raises(ValueError, match="decreasing order"):
        AnnealedLangevinSampler(np.array([0.01, 1.0]))
    with pytest.raises(ValueError, match=r"objective must be one of \['eps'\]"):
        SubVPSDE(diffusion.betas, objective="v")
    with pytest.raises(ValueError, match=r"EulerMaruyamaSampler does not run process None; it runs \['ddpm', 'ncsn', "
                                         r"'vp_sde', 'subvp_sde'\]"):
        EulerMaruyamaSampler(diffusion.betas)


def test_step_noise_is_drawn_when_not_given():
    diffusion = linear_diffusion(T=100)
    x = ms.Tensor(np.zeros((2, 1, 2, 2), np.float32))
    with mock.patch("mindspore.ops.randn_like", wraps=ms.ops.randn_like) as randn:
        out = EulerMaruyamaSampler(diffusion).step(x, 50, x)
    assert randn.called and float(out.prev_sample.std()) > 0
