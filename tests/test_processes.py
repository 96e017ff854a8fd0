"""The processes beyond the DDPM chain (EDM, rectified flow) on the one protocol: their samplers against diffusers'
schedulers through the reference's own loop, EDM's Algorithm 2 against a transcription of the paper written here
(and Euler ancestral against k-diffusion's `sample_euler_ancestral`, transcribed),
their training terms against the papers' formulas, the continuous time draws, and a tiny run of each through the
trainer in graph mode.

Tolerance of the diffusers comparisons: rtol 1e-4 (atol 1e-4 of the largest value) in float32, as
tests/test_karras_samplers.py (diffusers builds its grids in float32, ms_ddpm in float64).
"""
import math
from unittest import mock

import mindspore as ms
import numpy as np
import pytest

from ms_ddpm.config import Config, ConfigError
from ms_ddpm.losses import DiffusionLoss
from ms_ddpm.processes import EDM, PROCESSES, GaussianDiffusion, RectifiedFlow, create_process, predict_eps, predict_x0
from ms_ddpm.samplers import SAMPLERS, HeunSampler, create_sampler, samplers_for
from ms_ddpm.samplers.base import FusedStep
from ms_ddpm.schedules import karras_sigmas
from ms_ddpm.train.randomness import TrainingDraws
from ms_ddpm.train.trainer import Trainer
from tests.helpers import MNIST5K, execution_mode, import_torch_reference
from tests.test_samplers import CellModel, dummy_model

SHAPE = (3, 2, 4, 5)
RTOL = 1e-4


def ms_model(x, t):
    return ms.Tensor(dummy_model(x.asnumpy(), t.asnumpy()))


def process(name, **keys):
    """The process of a config, as a user builds it (clip off: diffusers' schedulers do not clip)."""
    return create_process(Config.from_dict({"diffusion": {"process": name, "clip_denoised": False, **keys}}).diffusion)


def diffusers_loop(torch, scheduler, steps, seed):
    """diffusers' loop, fed our `sample()`'s x_T draw (the flow schedulers have no init_noise_sigma: x_T is N(0, I))."""
    scheduler.set_timesteps(steps)
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.standard_normal(SHAPE, dtype=np.float32)) * getattr(scheduler, "init_noise_sigma", 1.0)
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        out = torch.from_numpy(dummy_model(model_input.numpy(), np.full(SHAPE[0], float(t))))
        x = scheduler.step(out, t, x).prev_sample
    return scheduler.timesteps.numpy(), x.numpy()


def ours(name, proc, steps, seed, **kwargs):
    sampler = create_sampler(name, proc, **kwargs)
    sampler.set_timesteps(steps)
    return sampler, sampler.sample(ms_model, SHAPE, seed=seed, progress=False).asnumpy()


@pytest.mark.parametrize("steps,keys", [(10, {}), (18, {"sigma_max": 40.0, "sigma_data": 0.8, "rho": 5.0})])
def test_edm_euler_matches_diffusers_edm_euler_scheduler(steps, keys):
    torch, diffusers = import_torch_reference()
    proc = process("edm", **keys)
    ref = diffusers.EDMEulerScheduler(sigma_min=proc.sigma_min, sigma_max=proc.sigma_max, sigma_data=proc.sigma_data,
                                      rho=proc.rho, prediction_type="epsilon")
    ref_timesteps, expected = diffusers_loop(torch, ref, steps, seed=3)
    sampler, x = ours("euler", proc, steps, seed=3)
    np.testing.assert_allclose(sampler.timesteps, ref_timesteps, rtol=1e-6, atol=1e-6)
    assert sampler.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma))
    np.testing.assert_allclose(x, expected, rtol=RTOL, atol=RTOL * np.abs(expected).max())
    assert np.abs(x).std() > 0.1


@pytest.mark.parametrize("name,shift,steps", [("euler", 1.0, 10), ("euler", 3.0, 20), ("heun", 1.0, 10),
                                              ("heun", 3.0, 12)])
def test_flow_samplers_match_diffusers_flow_match_schedulers(name, shift, steps):
    torch, diffusers = import_torch_reference()
    cls = diffusers.FlowMatchEulerDiscreteScheduler if name == "euler" else diffusers.FlowMatchHeunDiscreteScheduler
    ref_timesteps, expected = diffusers_loop(torch, cls(num_train_timesteps=1000, shift=shift), steps, seed=4)
    sampler, x = ours(name, process("flow", shift=shift), steps, seed=4)
    np.testing.assert_allclose(sampler.timesteps, ref_timesteps, rtol=1e-6)
    np.testing.assert_allclose(x, expected, rtol=RTOL, atol=RTOL * np.abs(expected).max())
    assert np.abs(x).std() > 0.1


def algorithm_2(denoiser, x, levels, s_churn, s_tmin, s_tmax, s_noise, noises):
    """Karras et al. 2022, Algorithm 2, transcribed: levels t_0 > ... > t_{N-1}, t_N = 0 appended; `noises` one
    standard-normal array per level i (the churn's eps_i)."""
    t = np.append(levels, 0.0)
    n = len(levels)
    for i in range(n):
        gamma = min(s_churn / n, math.sqrt(2) - 1) if s_tmin <= t[i] <= s_tmax else 0.0   # line 4
        t_hat = t[i] + gamma * t[i]                                                          # line 5
        x_hat = x + math.sqrt(t_hat**2 - t[i] ** 2) * s_noise * noises[i]                   # line 6
        d = (x_hat - denoiser(x_hat, t_hat)) / t_hat                                         # line 7
        x = x_hat + (t[i + 1] - t_hat) * d                                                   # line 8
        if t[i + 1] != 0:                                                                    # line 9
            d_prime = (x - denoiser(x, t[i + 1])) / t[i + 1]                                 # line 10
            x = x_hat + (t[i + 1] - t_hat) * (0.5 * d + 0.5 * d_prime)                       # line 11
    return x


@pytest.mark.parametrize("churn", [dict(s_churn=0.0), dict(s_churn=40.0, s_tmin=0.05, s_tmax=50.0, s_noise=1.003),
                                   dict(s_churn=10.0)])
def test_edm_heun_is_algorithm_2(churn):
    """`heun` on EDM, with and without churn, equals the paper's Algorithm 2 given the same x_0 and churn draws:
    ours draws the first level's churn in `start` and each later one at the correction before it (so the noise of
    call 2i + 1 is level i + 1's)."""
    proc = process("edm", sigma_max=20.0)
    steps = 6
    sampler = create_sampler("heun", proc, **churn)
    sampler.set_timesteps(steps)
    levels = karras_sigmas(proc.sigma_min, proc.sigma_max, steps, proc.rho)  # Eq. 5

    def denoiser(x, sigma):  # D = c_skip x + c_out F(c_in x, c_noise), in float64
        c_skip, c_out, c_in, c_noise = proc.preconditioning(float(sigma))
        return c_skip * x + c_out * dummy_model(c_in * x, np.full(SHAPE[0], c_noise)).astype(np.float64)

    rng = np.random.default_rng(8)
    x_T = rng.standard_normal(SHAPE).astype(np.float32) * np.float32(sampler.init_noise_sigma)
    # our loop's draws: the start's churn, then one array per call (used at the corrections)
    draws = np.random.default_rng(9)
    first = draws.standard_normal(SHAPE, dtype=np.float32) if sampler._churn[0] > 0 else None
    per_call = [draws.standard_normal(SHAPE, dtype=np.float32) if sampler.stochastic else None
                for _ in sampler.timesteps]
    noises = [first] + [per_call[2 * i + 1] for i in range(steps - 1)]
    noises = [np.zeros(SHAPE) if n is None else n for n in noises]  # no churn: unused
    expected = algorithm_2(denoiser, x_T.astype(np.float64), levels, churn.get("s_churn", 0.0),
                           churn.get("s_tmin", 0.0), churn.get("s_tmax", float("inf")), churn.get("s_noise", 1.0),
                           noises)

    class Draws:  # stands in for the loop's generator, in the same order
        def __init__(self):
            self.queue = ([first] if first is not None else []) + [n for n in per_call if n is not None]

        def standard_normal(self, shape, dtype=None):
            return self.queue.pop(0)

    with mock.patch("numpy.random.default_rng", return_value=Draws()):
        x = sampler.sample(ms_model, SHAPE, x_T=ms.Tensor(x_T), progress=False).asnumpy()
    np.testing.assert_allclose(x, expected, rtol=RTOL, atol=RTOL * np.abs(expected).max())
    assert len(sampler.timesteps) == 2 * steps - 1 and sampler.stochastic == (churn["s_churn"] > 0)


def test_edm_euler_ancestral_is_k_diffusions_sample_euler_ancestral():
    """`euler_ancestral` on EDM equals k-diffusion's `sample_euler_ancestral` (eta 1; its `get_ancestral_step` and
    `to_d`, transcribed here) on the Karras grid with a final 0, given the same x_T and per-step noise."""
    proc = process("edm", sigma_max=20.0)
    steps = 7
    sampler = create_sampler("euler_ancestral", proc)
    sampler.set_timesteps(steps)
    sigmas = np.append(karras_sigmas(proc.sigma_min, proc.sigma_max, steps, proc.rho), 0.0)

    def denoiser(x, sigma):
        c_skip, c_out, c_in, c_noise = proc.preconditioning(float(sigma))
        return c_skip * x + c_out * dummy_model(c_in * x, np.full(SHAPE[0], c_noise)).astype(np.float64)

    x_T = np.random.default_rng(4).standard_normal(SHAPE).astype(np.float32) * np.float32(sampler.init_noise_sigma)
    drawn = []

    class Draws:  # the loop's generator, recording what each step drew
        rng = np.random.default_rng(5)

        def standard_normal(self, shape, dtype=None):
            drawn.append(self.rng.standard_normal(shape, dtype=np.float32))
            return drawn[-1]

    with mock.patch("numpy.random.default_rng", return_value=Draws()):
        x = sampler.sample(ms_model, SHAPE, x_T=ms.Tensor(x_T), progress=False).asnumpy()
    expected = x_T.astype(np.float64)
    for i in range(steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        sigma_up = min(sigma_next, (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2) ** 0.5)
        sigma_down = (sigma_next ** 2 - sigma_up ** 2) ** 0.5
        expected = expected + (expected - denoiser(expected, sigma)) / sigma * (sigma_down - sigma)
        if sigma_next > 0:
            expected = expected + drawn[i] * sigma_up
    assert len(drawn) >= steps - 1
    np.testing.assert_allclose(x, expected, rtol=RTOL, atol=RTOL * np.abs(expected).max())


@pytest.mark.parametrize("process_name,name,kwargs", [("edm", "heun", dict(s_churn=20.0)),
                                                      ("edm", "euler_ancestral", {}), ("edm", "euler", {}),
                                                      ("consistency", "consistency", {})])
def test_sigma_frame_graph_mode_equals_pynative(process_name, name, kwargs):
    """GRAPH_MODE runs each call as one compiled step with float32 coefficients; PyNative op by op in float64."""
    sampler = create_sampler(name, process(process_name), **kwargs)
    sampler.set_timesteps(6)
    model = CellModel()
    with execution_mode(ms.PYNATIVE_MODE):
        op_by_op = sampler.sample(model, SHAPE, seed=5, progress=False).asnumpy()
    with execution_mode(ms.GRAPH_MODE):
        graph = sampler.sample(model, SHAPE, seed=5, progress=False).asnumpy()
        assert isinstance(sampler._fused_step(model), FusedStep)
    np.testing.assert_allclose(graph, op_by_op, rtol=1e-5, atol=1e-5 * np.abs(op_by_op).max())


def test_every_pairing_is_named_and_bad_ones_are_refused_in_one_line():
    assert samplers_for("edm") == ("euler", "euler_ancestral", "heun")
    assert samplers_for("flow") == ("euler", "heun")
    for name, cls in PROCESSES.items():
        assert cls.default_sampler in samplers_for(name)
    for sampler_name in SAMPLERS:
        for proc in (process("edm"), process("flow")):
            if sampler_name not in samplers_for(proc.name):
                with pytest.raises(ValueError, match=rf"^sampler '{sampler_name}' does not run process "
                                                     rf"'{proc.name}'; its samplers: \[.*\]$"):
                    create_sampler(sampler_name, proc)
    with pytest.raises(ValueError, match="s_churn: the churn of Algorithm 2 adds noise in the sigma frame"):
        HeunSampler(process("flow"), s_churn=1.0)
    with pytest.raises(ValueError, match="the flow grid is diffusers' FlowMatchEulerDiscreteScheduler's"):
        create_sampler("euler", process("flow"), karras_sigmas=True)


def test_each_process_owns_its_keys():
    edm = Config.from_dict({"diffusion": {"process": "edm", "sigma_max": 40}}).diffusion
    assert edm.sigma_max == 40.0 and edm.p_mean == -1.2 and edm.to_dict()["process"] == "edm"
    assert "num_timesteps" not in edm.to_dict()
    with pytest.raises(ConfigError, match=r"diffusion key\(s\) \['num_timesteps'\] are settings of process 'ddpm' "
                                          r"and do nothing with diffusion.process 'edm'"):
        Config.from_dict({"diffusion": {"process": "edm", "num_timesteps": 10}})
    with pytest.raises(ConfigError, match=r"diffusion key\(s\) \['logit_std'\] are settings of process 'flow'"):
        Config.from_dict({"diffusion": {"logit_std": 2.0}})
    with pytest.raises(ConfigError, match="diffusion.p_std must be a number, got 'wide'"):
        Config.from_dict({"diffusion": {"process": "edm", "p_std": "wide"}})
    with pytest.raises(ConfigError, match=r"diffusion \(process edm\): need 0 < sigma_min < sigma_max"):
        Config.from_dict({"diffusion": {"process": "edm", "sigma_min": 100.0}})
    with pytest.raises(ConfigError, match=r"time_sampling must be one of \['uniform', 'logit_normal'\]"):
        Config.from_dict({"diffusion": {"process": "flow", "time_sampling": "cosine"}})
    # an override may change the process of a file that sets none of its keys
    assert Config.load(None, ["diffusion.process=flow", "diffusion.shift=3"]).diffusion.shift == 3.0


def test_conversions_are_one_linear_readout():
    """predict_x0 / predict_eps invert x = alpha x_0 + sigma eps for every prediction at random (alpha, sigma) (v:
    on the VP circle, velocity: on flow's line alpha + sigma = 1 and off it)."""
    rng = np.random.default_rng(0)
    x0, eps = rng.standard_normal((2, 5))
    for prediction, alpha, sigma in (("eps", 0.7, 0.4), ("x0", 1.0, 3.0), ("v", 0.6, 0.8), ("score", 1.0, 2.5),
                                     ("velocity", 0.3, 0.7), ("velocity", 0.9, 0.5)):
        x = alpha * x0 + sigma * eps
        output = {"eps": eps, "x0": x0, "v": alpha * eps - sigma * x0, "score": -eps / sigma,
                  "velocity": eps - x0}[prediction]
        np.testing.assert_allclose(predict_x0(prediction, output, x, alpha, sigma), x0, atol=1e-12)
        np.testing.assert_allclose(predict_eps(prediction, output, x, alpha, sigma), eps, atol=1e-12)


def test_edm_loss_is_the_weighted_denoiser_loss():
    """Eq. 8: the unweighted loss of F on (x_0 - c_skip x) / c_out equals lambda(sigma) ||D - x_0||^2, lambda =
    (sigma^2 + sigma_data^2) / (sigma sigma_data)^2, D = c_skip x + c_out F(c_in x; ln(sigma) / 4)."""
    proc = process("edm")
    rng = np.random.default_rng(1)
    x0 = rng.uniform(-1, 1, SHAPE).astype(np.float32)
    noise = rng.standard_normal(SHAPE).astype(np.float32)
    sigma = np.array([0.01, 0.7, 30.0], np.float32)
    loss = float(DiffusionLoss(ms_model, proc)(ms.Tensor(x0), ms.Tensor(sigma), ms.Tensor(noise)).asnumpy())
    s, sd = sigma.astype(np.float64).reshape(-1, 1, 1, 1), 0.5
    x = x0 + s * noise
    c_skip, c_out, c_in = sd**2 / (s**2 + sd**2), s * sd / np.sqrt(s**2 + sd**2), 1 / np.sqrt(s**2 + sd**2)
    f = np.stack([dummy_model(c_in[i] * x[i:i + 1], [np.log(sigma[i]) / 4]) for i in range(3)])[:, 0]
    weight = (s**2 + sd**2) / (s * sd) ** 2
    expected = np.mean(weight[:, 0, 0, 0] * ((c_skip * x + c_out * f - x0) ** 2).mean(axis=(1, 2, 3)))
    assert loss == pytest.approx(expected, rel=1e-4)


def test_flow_loss_regresses_the_velocity_at_1000_t():
    proc = process("flow")
    rng = np.random.default_rng(2)
    x0, noise = rng.uniform(-1, 1, SHAPE).astype(np.float32), rng.standard_normal(SHAPE).astype(np.float32)
    t = np.array([0.1, 0.5, 0.97], np.float32)
    loss = float(DiffusionLoss(ms_model, proc)(ms.Tensor(x0), ms.Tensor(t), ms.Tensor(noise)).asnumpy())
    tb = t.reshape(-1, 1, 1, 1)
    x_t = (1 - tb) * x0 + tb * noise
    expected = np.mean((dummy_model(x_t, 1000 * t) - (noise - x0)) ** 2)
    assert loss == pytest.approx(float(expected), rel=1e-5)
    with pytest.raises(ValueError, match="loss_type and loss weighting are settings of process ddpm"):
        DiffusionLoss(ms_model, proc, loss_type="huber")


@pytest.mark.parametrize("name,keys", [("edm", {}), ("flow", {}), ("flow", {"time_sampling": "uniform"}),
                                       ("flow", {"logit_mean": 0.5, "logit_std": 0.7})])
def test_continuous_time_draws_follow_their_distributions(name, keys):
    """16,384 draws: EDM's ln sigma ~ N(p_mean, p_std^2), flow's logit(t) ~ N(m, s^2) or t uniform, within 5 standard
    errors; the integer draws of the discrete processes are untouched (tests/test_randomness.py pins them)."""
    proc = process(name, **keys)
    draws = TrainingDraws(seed=3, num_labels=None, training_time=proc.training_time)
    t, _, _ = draws(ms.Tensor(0, ms.int32), ms.Tensor(0, ms.int32), (16384, 1, 1, 1))
    t = t.asnumpy().astype(np.float64)
    assert t.dtype == np.float64 and np.all(np.isfinite(t))
    n = len(t)
    if name == "edm":
        z, mean, std = np.log(t), proc.p_mean, proc.p_std
    elif proc.time_sampling == "uniform":
        z, mean, std = t, 0.5, math.sqrt(1 / 12)
    else:
        z, mean, std = np.log(t / (1 - t)), proc.logit_mean, proc.logit_std
    assert abs(z.mean() - mean) < 5 * std / math.sqrt(n) and abs(z.std() - std) < 5 * std / math.sqrt(2 * n)


def tiny_config(name, root, mode):
    return Config.from_dict({
        "model": {"name": "unet", "kwargs": {"dim": 4, "dim_mults": [1, 2], "channels": 1, "heads": 1,
                                             "dim_head": 4}},
        "diffusion": {"process": name},
        "data": {"name": "mnist", "root": str(MNIST5K), "image_size": 8},
        "train": {"output_dir": str(root / f"{name}_{mode}"), "batch_size": 4, "steps": 4, "warmup_steps": 1,
                  "lr": 1e-2, "log_every": 1, "sample_every": 4, "save_every": 4, "num_samples": 4,
                  "sample_steps": 3, "mode": mode, "ema_decay": 0.5},
    })


@pytest.mark.parametrize("name", ["edm", "flow"])
def test_trainer_runs_each_process_the_same_in_graph_and_pynative(name, tmp_path):
    """The trainer draws the process's continuous time inside the compiled step; graph and PyNative runs log the
    same losses, write a grid with the process's default sampler, and the checkpoint samples through the pipeline."""
    import json

    from ms_ddpm.pipeline import DiffusionPipeline

    losses = {}
    for mode in ("graph", "pynative"):
        with execution_mode(ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE):
            trainer = Trainer(tiny_config(name, tmp_path, mode))
            trainer.train()
        log = [json.loads(line) for line in (trainer.output_dir / "train_log.jsonl").read_text().splitlines()]
        losses[mode] = [r["loss"] for r in log if "loss" in r]
        assert (trainer.output_dir / "samples_00000004.png").is_file()
    np.testing.assert_allclose(losses["graph"], losses["pynative"], rtol=1e-5)
    assert type(trainer.task.grid_sampler).__name__ == ("HeunSampler" if name == "edm" else "EulerSampler")
    pipe = DiffusionPipeline.from_checkpoint(trainer.output_dir / "ckpt_00000004.ckpt", mode="pynative")
    assert isinstance(pipe.process, EDM if name == "edm" else RectifiedFlow)
    samples, _ = pipe(2, steps=2, progress=False)
    assert samples.shape == (2, 1, 8, 8) and np.all(np.isfinite(samples))


def test_ddpm_protocol_keeps_the_chains_numbers():
    """The DDPM chain's training terms are its q_sample and target at integer t, and its frame's denoiser the
    Karras coefficients of Table 1 (eps: c_skip 1, c_out -s)."""
    diffusion = process("ddpm", num_timesteps=50)
    assert isinstance(diffusion, GaussianDiffusion) and diffusion.prediction == "eps"
    c_skip, c_out, c_in = diffusion.denoiser(2.0)
    assert (c_skip, c_out, c_in) == pytest.approx((1.0, -2.0, 1 / math.sqrt(5)))
