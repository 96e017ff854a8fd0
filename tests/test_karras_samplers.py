"""The samplers of Karras et al. 2022 (euler, euler_ancestral, heun, and Karras sigmas for them and dpm_solver)
against diffusers' schedulers through the reference's own loop, on the same pseudo-network, inputs and noise.

Tolerance: rtol 1e-4 (atol 1e-4 of the largest value) in float32. diffusers builds alphas_cumprod and the sigmas in
float32, ms_ddpm in float64: diffusers' smallest sigma, sqrt((1 - alpha_bar_0) / alpha_bar_0), carries a relative
error of up to 1e-4 from the float32 difference 1 - alpha_bar_0, and the float32 cosine schedule some 1e-4 in the
middle of the chain, which move the Karras grid's fractional timesteps by up to 0.04 (rtol 2e-4); the samples
themselves agree to a few 1e-6 of their largest value.
"""
from unittest import mock

import mindspore as ms
import numpy as np
import pytest

from ms_ddpm.config import Config, ConfigError
from ms_ddpm.models.embeddings import timestep_embedding
from ms_ddpm.pipeline import build_sampler
from ms_ddpm.processes import VESDE, GaussianDiffusion
from ms_ddpm.samplers import EulerAncestralSampler, EulerSampler, HeunSampler, create_sampler, samplers_for
from ms_ddpm.samplers.base import FusedStep
from ms_ddpm.schedules import get_beta_schedule, karras_sigmas, sigma_timesteps, timestep_sigmas
from ms_ddpm.train.trainer import Trainer
from tests.helpers import alpha_bar_at, execution_mode, import_torch_reference
from tests.test_ncsn_training import ncsn_config, run_cli
from tests.test_samplers import PREDICTION_TYPES, CellModel, dummy_model
from tests.test_score_samplers import MU, S, TOL_MEAN, TOL_STD, exact_eps_model, linear_diffusion
from tests.test_score_samplers import SHAPE as GAUSSIAN_SHAPE

T = 1000
SHAPE = (3, 2, 4, 5)
RTOL = 1e-4
# ms_ddpm schedule -> diffusers beta_schedule; "quadratic" with Stable Diffusion's ends is its "scaled_linear"
SCHEDULES = {"linear": ("linear", 1e-4, 0.02), "quadratic": ("scaled_linear", 0.00085, 0.012),
             "cosine": ("squaredcos_cap_v2", 1e-4, 0.02)}
SCHEDULERS = {"euler": "EulerDiscreteScheduler", "euler_ancestral": "EulerAncestralDiscreteScheduler",
              "heun": "HeunDiscreteScheduler", "dpm_solver": "DPMSolverMultistepScheduler"}


def make_diffusion(schedule, objective):
    _, beta_start, beta_end = SCHEDULES[schedule]
    # clip_denoised=False: diffusers' Euler-family schedulers do not clip
    return GaussianDiffusion(get_beta_schedule(schedule, T, beta_start, beta_end), objective=objective,
                             clip_denoised=False)


def ms_model(x, t):
    return ms.Tensor(dummy_model(x.asnumpy(), t.asnumpy()))


def reference_scheduler(diffusers, name, schedule, objective, karras, spacing):
    beta_schedule, beta_start, beta_end = SCHEDULES[schedule]
    kwargs = dict(num_train_timesteps=T, beta_schedule=beta_schedule, beta_start=beta_start, beta_end=beta_end,
                  prediction_type=PREDICTION_TYPES[objective], timestep_spacing=spacing)
    if name == "dpm_solver":
        kwargs.update(algorithm_type="dpmsolver++", solver_order=2)
    if name != "euler_ancestral":
        kwargs["use_karras_sigmas"] = karras
    return getattr(diffusers, SCHEDULERS[name])(**kwargs)


def reference_loop(torch, diffusers, name, steps, schedule, objective, karras, spacing, seed):
    """diffusers' loop (scale_model_input, network, step), fed the draws our `sample()` makes: x_T, then one noise
    array per step for the ancestral sampler (through the scheduler module's `randn_tensor`)."""
    ref = reference_scheduler(diffusers, name, schedule, objective, karras, spacing)
    ref.set_timesteps(steps)
    if name == "euler_ancestral" and karras:
        # diffusers' ancestral scheduler has no Karras option: run its step on EulerDiscreteScheduler's Karras grid
        grid = reference_scheduler(diffusers, "euler", schedule, objective, True, spacing)
        grid.set_timesteps(steps)
        ref.sigmas, ref.timesteps = grid.sigmas, grid.timesteps
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.standard_normal(SHAPE, dtype=np.float32)) * ref.init_noise_sigma
    for t in ref.timesteps:
        model_input = ref.scale_model_input(x, t)
        out = torch.from_numpy(dummy_model(model_input.numpy(), np.full(SHAPE[0], float(t))))
        if name == "euler_ancestral":
            noise = torch.from_numpy(rng.standard_normal(SHAPE, dtype=np.float32))
            with mock.patch("diffusers.schedulers.scheduling_euler_ancestral_discrete.randn_tensor",
                            return_value=noise):
                x = ref.step(out, t, x).prev_sample
        else:
            x = ref.step(out, t, x).prev_sample
    return ref.timesteps.numpy(), x.numpy()


CASES = [
    # (sampler, steps, schedule, objective, karras, spacing)
    ("euler", 10, "linear", "eps", False, "linspace"),
    ("euler", 20, "quadratic", "v", True, "linspace"),
    ("euler", 15, "cosine", "eps", True, "linspace"),
    ("euler", 12, "linear", "v", False, "leading"),
    ("euler", 10, "quadratic", "x0", False, "trailing"),
    ("euler_ancestral", 15, "linear", "eps", False, "linspace"),
    ("euler_ancestral", 10, "quadratic", "v", False, "leading"),
    ("euler_ancestral", 12, "cosine", "v", False, "trailing"),
    ("euler_ancestral", 15, "quadratic", "eps", True, "linspace"),
    ("heun", 10, "linear", "eps", False, "linspace"),
    ("heun", 15, "quadratic", "v", True, "linspace"),
    ("heun", 10, "cosine", "eps", False, "trailing"),
    ("heun", 12, "linear", "x0", True, "leading"),
    ("dpm_solver", 15, "linear", "eps", True, "linspace"),
    ("dpm_solver", 20, "quadratic", "v", True, "linspace"),
]


@pytest.mark.parametrize("name,steps,schedule,objective,karras,spacing", CASES)
def test_sampling_loop_matches_diffusers(name, steps, schedule, objective, karras, spacing):
    torch, diffusers = import_torch_reference()
    sampler = create_sampler(name, make_diffusion(schedule, objective), timestep_spacing=spacing,
                             karras_sigmas=karras)
    sampler.set_timesteps(steps)
    ours = sampler.sample(ms_model, SHAPE, seed=7, progress=False).asnumpy()
    ref_timesteps, ref = reference_loop(torch, diffusers, name, steps, schedule, objective, karras, spacing, seed=7)
    # the same calls, at float32 timesteps (integers for dpm_solver); Karras ones fractional (see the module doc)
    np.testing.assert_allclose(sampler.timesteps, ref_timesteps, rtol=2e-4 if karras else 0, atol=0.02 if karras else 0)
    np.testing.assert_allclose(ours, ref, rtol=RTOL, atol=RTOL * np.abs(ref).max())
    assert np.abs(ours).std() > 0.1  # the loop did not collapse to a constant


@pytest.mark.parametrize("name,karras", [("euler", True), ("heun", False), ("dpm_solver", True)])
def test_a_loop_written_for_diffusers_runs_unchanged(name, karras):
    """diffusers' loop, verbatim, over our sampler lands on `sample()`'s numbers."""
    sampler = create_sampler(name, make_diffusion("quadratic", "eps"), karras_sigmas=karras)
    sampler.set_timesteps(10)
    x = ms.Tensor(np.random.default_rng(3).standard_normal(SHAPE, dtype=np.float32)) * sampler.init_noise_sigma
    expected = sampler.sample(ms_model, SHAPE, x_T=x, progress=False).asnumpy()
    sampler.set_timesteps(10)
    for t in sampler.timesteps:
        model_input = sampler.scale_model_input(x, t)
        out = ms_model(model_input, ms.Tensor(np.full(SHAPE[0], t)))
        x = sampler.step(out, t, x).prev_sample
    np.testing.assert_array_equal(x.asnumpy(), expected)


@pytest.mark.parametrize("name", ["euler", "euler_ancestral", "heun", "dpm_solver"])
def test_graph_mode_equals_pynative(name):
    """GRAPH_MODE runs each call (each of Heun's two stages) as one compiled step with float32 coefficients and
    input scale (dpm_solver: the compiled network, then its update); PyNative the same update op by op with float64
    coefficients: the chains agree to float32 rounding."""
    sampler = create_sampler(name, make_diffusion("quadratic", "v"), karras_sigmas=True)
    sampler.set_timesteps(8)
    model = CellModel()
    with execution_mode(ms.PYNATIVE_MODE):
        op_by_op = sampler.sample(model, SHAPE, seed=5, progress=False).asnumpy()
        assert sampler._fused_step(model) is None
    with execution_mode(ms.GRAPH_MODE):
        graph = sampler.sample(model, SHAPE, seed=5, progress=False).asnumpy()
        assert isinstance(sampler._fused_step(model), FusedStep) == (name != "dpm_solver")
    np.testing.assert_allclose(graph, op_by_op, rtol=1e-5, atol=1e-5 * np.abs(op_by_op).max())
    assert np.abs(graph).std() > 0.1


KNOWN_ANSWER_CASES = [("euler", 100, False), ("euler_ancestral", 200, False), ("heun", 30, False),
                      ("heun", 30, True), ("dpm_solver", 30, True)]


@pytest.mark.parametrize("name,steps,karras", KNOWN_ANSWER_CASES)
def test_exact_model_reproduces_gaussian_data(name, steps, karras):
    """The exact eps-network of N(MU, S^2) data (tests/test_score_samplers.py, same tolerances) sampled through the
    sigma frame: the samples have the data's mean and spread."""
    diffusion = linear_diffusion()
    sampler = create_sampler(name, diffusion, karras_sigmas=karras)
    sampler.set_timesteps(steps)

    class InterpolatedAlphaBar:  # alpha_bar at the fractional timesteps the samplers hand the network
        def __getitem__(self, t):
            return alpha_bar_at(diffusion.alphas_cumprod, t)

    x = sampler.sample(exact_eps_model(InterpolatedAlphaBar()), GAUSSIAN_SHAPE, seed=0, progress=False).asnumpy()
    assert np.all(np.isfinite(x))
    assert abs(x.mean() - MU) < TOL_MEAN, (x.mean(), MU, TOL_MEAN)
    assert abs(x.std() - S) < TOL_STD, (x.std(), S, TOL_STD)


def test_sigma_grids_match_diffusers():
    torch, diffusers = import_torch_reference()
    diffusion = make_diffusion("quadratic", "eps")
    ref = reference_scheduler(diffusers, "euler", "quadratic", "eps", True, "linspace")
    ref.set_timesteps(12)
    ours = EulerSampler(diffusion, karras_sigmas=True)
    ours.set_timesteps(12)
    np.testing.assert_allclose(ours.sigmas, ref.sigmas.numpy(), rtol=2e-4)
    assert ours.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-5)
    # Eq. 5 at its ends, and sigma_timesteps inverting timestep_sigmas on the training grid
    sigmas = karras_sigmas(0.1, 80.0, 5)
    assert sigmas[0] == pytest.approx(80.0) and sigmas[-1] == pytest.approx(0.1) and np.all(np.diff(sigmas) < 0)
    t = np.array([999.0, 500.0, 37.0, 0.0])
    np.testing.assert_allclose(sigma_timesteps(diffusion.alphas_cumprod,
                                               timestep_sigmas(diffusion.alphas_cumprod, t)), t, atol=1e-9)
    # add_noise in the sigma frame: x_0 + sigma(t) noise, as diffusers'
    x0, noise = (np.random.default_rng(i).standard_normal(SHAPE, dtype=np.float32) for i in (0, 1))
    picks = [0, 4, 11]  # each at its own grid's timesteps (the Karras ones differ in float32 rounding)
    ref_noised = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), ref.timesteps[picks]).numpy()
    noised = ours.add_noise(ms.Tensor(x0), ms.Tensor(noise), ms.Tensor(ours.timesteps[picks])).asnumpy()
    np.testing.assert_allclose(noised, ref_noised, rtol=2e-4, atol=1e-5)


def test_heun_alternates_predictor_and_correction():
    """Algorithm 1, lines 5 and 8, in closed form: with the x0 objective and a zero network output, D = 0 and
    d(x, sigma) = x / sigma; the first call returns x_e = x + h d(x, sigma_i), the second x + h/2 (d + d(x_e))."""
    sampler = HeunSampler(make_diffusion("linear", "x0"))
    sampler.set_timesteps(4)
    assert len(sampler.timesteps) == 7 and np.all(sampler.timesteps[1::2] == sampler.timesteps[2::2])
    x = ms.Tensor(np.ones(SHAPE, np.float32))
    zero = ms.Tensor(np.zeros(SHAPE, np.float32))  # x0 objective: D = 0
    s0, s1 = sampler.sigmas[0], sampler.sigmas[1]
    x_e = sampler.step(zero, sampler.timesteps[0], x).prev_sample
    x_next = sampler.step(zero, sampler.timesteps[1], x_e).prev_sample
    h = s1 - s0
    d, d_e = 1.0 / s0, (1.0 + h / s0) / s1
    np.testing.assert_allclose(x_e.asnumpy(), 1.0 + h * d, rtol=1e-5)
    np.testing.assert_allclose(x_next.asnumpy(), 1.0 + h / 2 * (d + d_e), rtol=1e-5)
    with pytest.raises(ValueError, match="step called out of order: call 2 got timestep"):
        sampler.step(zero, sampler.timesteps[0], x)


def test_float_timesteps_reach_the_time_embedding():
    """Both U-Nets embed t through `timestep_embedding`, which takes float time: a float32 integer gives the int32
    embedding, and a fractional one lies between its neighbours' features."""
    ints = timestep_embedding(ms.Tensor(np.array([3, 7], np.int32)), 8).asnumpy()
    floats = timestep_embedding(ms.Tensor(np.array([3.0, 7.0], np.float32)), 8).asnumpy()
    np.testing.assert_array_equal(ints, floats)
    half = timestep_embedding(ms.Tensor(np.array([3.5], np.float32)), 8).asnumpy()
    freqs = np.exp(-np.log(10000.0) * np.arange(4) / 3)
    np.testing.assert_allclose(half[0], np.concatenate([np.sin(3.5 * freqs), np.cos(3.5 * freqs)]), atol=1e-6)


def test_the_samplers_are_registered_and_refuse_an_ncsn_process():
    for name in ("euler", "euler_ancestral", "heun"):
        assert name in samplers_for("ddpm") and name not in samplers_for("ncsn")
    for cls in (EulerSampler, EulerAncestralSampler, HeunSampler):
        with pytest.raises(ValueError, match=rf"^{cls.__name__} does not run process 'ncsn'; it runs "
                                             r"\['ddpm', 'edm', 'flow'\]$|\['ddpm', 'edm'\]$"):
            cls(VESDE(N=10))
    ncsn = Config.from_dict({"diffusion": {"process": "ncsn"}})
    with pytest.raises(ConfigError, match=r"sampler 'heun' does not sample a network of diffusion.process 'ncsn'; "
                                          r"use one of \['euler_maruyama', 'pc', 'ode', 'ald'\]$"):
        build_sampler(ncsn, None, "heun")
    ddpm = Config.from_dict({"diffusion": {"process": "ddpm", "num_timesteps": 50}})
    sampler = build_sampler(ddpm, make_diffusion("linear", "eps"), "euler_ancestral", karras_sigmas=True)
    assert isinstance(sampler, EulerAncestralSampler) and sampler.karras_sigmas and sampler.stochastic


def test_cli_samples_with_a_karras_sampler(tmp_path, capsys):
    """`ms-ddpm sample --sampler heun --karras-sigmas` on a (untrained) DDPM checkpoint; --karras-sigmas with a
    sampler that has no such grid is refused with one line."""
    cfg = ncsn_config(tmp_path / "ddpm", {"process": "ddpm", "num_timesteps": 20}, mode="pynative",
                      sampler="ddim", sample_steps=5)
    (tmp_path / "ddpm").mkdir()
    ckpt = Trainer(cfg).save()  # untrained weights suffice
    code, stdout, err = run_cli(capsys, "sample", "--ckpt", ckpt, "--sampler", "heun", "--karras-sigmas",
                                "--steps", 3, "--num", 2, "--mode", "pynative", "--out", tmp_path / "heun")
    assert code == 0, err
    assert "sampler heun" in stdout
    samples = np.load(tmp_path / "heun" / "samples.npz")["samples"]
    assert samples.shape == (2, 1, 8, 8) and np.isfinite(samples).all()
    code, _, err = run_cli(capsys, "sample", "--ckpt", ckpt, "--sampler", "ddim", "--karras-sigmas",
                           "--mode", "pynative", "--out", tmp_path / "ddim")
    assert code == 2 and "Traceback" not in err
    assert "--karras-sigmas applies to the samplers ['euler', 'euler_ancestral', 'heun', 'dpm_solver'], " \
           "not 'ddim'" in err
