"""Learned reverse variances and the variational bound (Nichol & Dhariwal 2021, "Improved Denoising Diffusion
Probabilistic Models"): DDPM sampling with `variance_type: learned_range` against diffusers' `DDPMScheduler` through
its own loop, the bound's terms and the hybrid loss against NumPy transcriptions of improved-diffusion
(`losses.normal_kl`, `losses.discretized_gaussian_log_likelihood`, `GaussianDiffusion.training_losses` with
`LossType.RESCALED_MSE`), the stopped gradient, guidance of the prediction half, and a tiny trained run.

Tolerances: the sampler comparisons rtol 1e-5 (atol 1e-5 of the largest value), float32 against PyTorch float32;
improved-diffusion's decoder uses a tanh approximation of the normal CDF, ours the exact one (through erfc), so the
bound is compared with it at the approximation's size (see the tests).
"""
import json
import math

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn, ops

from ms_ddpm.config import Config, ConfigError
from ms_ddpm.guidance import ClassifierFreeGuidance
from ms_ddpm.losses import DiffusionLoss
from ms_ddpm.metrics.likelihood import calc_bpd_loop, discretized_gaussian_log_likelihood, normal_kl
from ms_ddpm.pipeline import DiffusionPipeline, network_kwargs
from ms_ddpm.processes import create_process
from ms_ddpm.samplers import create_sampler
from ms_ddpm.train.trainer import Trainer
from tests.helpers import MNIST5K, execution_mode, import_torch_reference
from tests.test_samplers import dummy_model

SHAPE = (2, 3, 4, 4)  # C = 3: the network outputs 6 channels
RTOL = 1e-5


def two_halves(x, t):
    """A stand-in network of 2C outputs: `dummy_model` as the eps half, a v in (-1, 1) that varies with x and t."""
    eps = dummy_model(x, t)
    tt = np.asarray(t, dtype=np.float64).reshape(-1, 1, 1, 1)
    v = np.tanh(1.5 * x - 0.5 + tt / 40.0).astype(np.float32)
    return np.concatenate([eps, v], axis=1)


class TwoHalves(nn.Cell):
    """`two_halves` as a Cell (graph mode compiles it into the sampler's fused step)."""

    def construct(self, x, t):
        tt = t.astype(ms.float32).reshape(-1, 1, 1, 1)
        eps = 0.8 * x + 0.3 * ops.sin(2 * x + tt / 150.0)
        return ops.cat((eps, ops.tanh(1.5 * x - 0.5 + tt / 40.0)), axis=1)


def learned_process(schedule="linear", num_timesteps=50, **keys):
    return create_process(Config.from_dict({"diffusion": {
        "variance_type": "learned_range", "beta_schedule": schedule, "num_timesteps": num_timesteps,
        "clip_denoised": True, **keys}}).diffusion)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("steps", [50, 10])
def test_ddpm_with_learned_variance_is_diffusers_ddpm_scheduler(schedule, steps, monkeypatch):
    """Our DDPM sampler driven by diffusers' loop with 2C-channel outputs and injected noise lands on
    `DDPMScheduler(variance_type="learned_range")`'s samples, on the full chain and a respaced one."""
    torch, diffusers = import_torch_reference()
    from diffusers.schedulers import scheduling_ddpm

    sampler = create_sampler("ddpm", learned_process(schedule))
    sampler.set_timesteps(steps)
    ref = diffusers.DDPMScheduler(num_train_timesteps=50, variance_type="learned_range", clip_sample=True,
                                  beta_schedule={"linear": "linear", "cosine": "squaredcos_cap_v2"}[schedule])
    ref.set_timesteps(steps)
    np.testing.assert_array_equal(sampler.timesteps, ref.timesteps.numpy())
    rng = np.random.default_rng(0)
    x_T = rng.standard_normal(SHAPE).astype(np.float32)
    noises = [rng.standard_normal(SHAPE).astype(np.float32) for _ in sampler.timesteps]
    queue = list(noises)
    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda shape, **kwargs: torch.from_numpy(queue.pop(0)))
    x = torch.from_numpy(x_T)
    for t in ref.timesteps:
        x = ref.step(torch.from_numpy(two_halves(x.numpy(), np.full(SHAPE[0], int(t)))), t, x).prev_sample
    expected = x.numpy()
    ours = ms.Tensor(x_T)
    for t, noise in zip(sampler.timesteps, noises):
        out = ms.Tensor(two_halves(ours.asnumpy(), np.full(SHAPE[0], int(t))))
        ours = sampler.step(out, int(t), ours, noise=ms.Tensor(noise)).prev_sample
    np.testing.assert_allclose(ours.asnumpy(), expected, rtol=RTOL, atol=RTOL * np.abs(expected).max())
    assert len(queue) == 1  # diffusers draws no noise for the last step


def test_learned_variance_sampling_is_the_same_in_graph_mode():
    """The fused step (network + update in one graph, the log-variance bounds as 0-d tensors) equals PyNative."""
    sampler = create_sampler("ddpm", learned_process())
    sampler.set_timesteps(10)
    with execution_mode(ms.PYNATIVE_MODE):
        op_by_op = sampler.sample(TwoHalves(), SHAPE, seed=5, progress=False).asnumpy()
    with execution_mode(ms.GRAPH_MODE):
        graph = sampler.sample(TwoHalves(), SHAPE, seed=5, progress=False).asnumpy()
    np.testing.assert_allclose(graph, op_by_op, rtol=1e-5, atol=1e-5 * np.abs(op_by_op).max())


@pytest.mark.parametrize("name", ["ddim", "dpm_solver", "euler", "heun"])
def test_every_other_sampler_reads_the_prediction_half(name):
    """A learned-variance network samples as the C-channel network of its prediction half."""
    process = learned_process()
    plain = create_process(Config.from_dict({"diffusion": {"num_timesteps": 50, "clip_denoised": True}}).diffusion)
    results = []
    for proc, model in [(process, lambda x, t: ms.Tensor(two_halves(x.asnumpy(), t.asnumpy()))),
                        (plain, lambda x, t: ms.Tensor(dummy_model(x.asnumpy(), t.asnumpy())))]:
        sampler = create_sampler(name, proc)
        sampler.set_timesteps(6)
        results.append(sampler.sample(model, SHAPE, seed=2, progress=False).asnumpy())
    np.testing.assert_allclose(results[0], results[1], rtol=1e-6, atol=1e-6)


# --- the bound: NumPy transcriptions of improved-diffusion (improved_diffusion/losses.py, gaussian_diffusion.py) --
def id_normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + np.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * np.exp(-logvar2))


def id_approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * np.power(x, 3))))


def id_discretized_gaussian_log_likelihood(x, means, log_scales):
    centered_x = x - means
    inv_stdv = np.exp(-log_scales)
    cdf_plus = id_approx_standard_normal_cdf(inv_stdv * (centered_x + 1.0 / 255.0))
    cdf_min = id_approx_standard_normal_cdf(inv_stdv * (centered_x - 1.0 / 255.0))
    log_cdf_plus = np.log(np.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = np.log(np.maximum(1.0 - cdf_min, 1e-12))
    cdf_delta = cdf_plus - cdf_min
    return np.where(x < -0.999, log_cdf_plus,
                    np.where(x > 0.999, log_one_minus_cdf_min, np.log(np.maximum(cdf_delta, 1e-12))))


def id_training_losses(process, out, x_start, t, noise):
    """improved-diffusion's `training_losses` for LossType.RESCALED_MSE, ModelMeanType.EPSILON,
    ModelVarType.LEARNED_RANGE, with the network's output `out` (B, 2C, H, W), in float64."""
    def g(table):
        return table[t].reshape(-1, 1, 1, 1)

    ab = process.alphas_cumprod
    x_t = np.sqrt(g(ab)) * x_start + np.sqrt(1 - g(ab)) * noise
    c = x_start.shape[1]
    eps, v = out[:, :c], out[:, c:]
    mse = ((noise - eps) ** 2).mean(axis=(1, 2, 3))
    # _vb_terms_bpd on the frozen output (the mean's gradient stopped; values unchanged)
    coef1, coef2 = process.posterior_mean_coef1, process.posterior_mean_coef2
    true_mean = g(coef1) * x_start + g(coef2) * x_t
    true_log_var = g(process.posterior_log_variance_clipped)
    frac = (v + 1) / 2
    model_log_var = frac * g(np.log(process.betas)) + (1 - frac) * true_log_var
    pred_x0 = np.clip(np.sqrt(1 / g(ab)) * x_t - np.sqrt(1 / g(ab) - 1) * eps, -1, 1)
    model_mean = g(coef1) * pred_x0 + g(coef2) * x_t
    kl = id_normal_kl(true_mean, true_log_var, model_mean, model_log_var).mean(axis=(1, 2, 3)) / np.log(2.0)
    nll = -id_discretized_gaussian_log_likelihood(x_start, model_mean, 0.5 * model_log_var)
    nll = nll.mean(axis=(1, 2, 3)) / np.log(2.0)
    vb = np.where(t == 0, nll, kl) * process.num_timesteps / 1000.0  # RESCALED_MSE
    return (mse + vb).mean()


def test_bound_terms_are_improved_diffusions():
    """normal_kl equals the transcription to float32 rounding; the discretised decoder equals it to the size of the
    tanh approximation of the CDF: its error is below 1.8e-4 in Phi, so a bin's mass m (a difference of two CDF
    values) moves by at most 3.6e-4 and its log by at most 3.6e-4 / m, compared where m >= 0.01."""
    rng = np.random.default_rng(0)
    a = [rng.normal(0, 1, 200), rng.normal(-2, 1.5, 200), rng.normal(0, 1, 200), rng.normal(-2, 1.5, 200)]
    np.testing.assert_allclose(normal_kl(*(ms.Tensor(v.astype(np.float32)) for v in a)).asnumpy(),
                               id_normal_kl(*a), rtol=1e-5, atol=1e-5)
    x = rng.integers(0, 256, 400) / 127.5 - 1.0
    log_scales = rng.uniform(np.log(0.005), np.log(0.5), 400)
    means = x + rng.normal(0, 1, 400) * np.exp(log_scales)
    ours = discretized_gaussian_log_likelihood(*(ms.Tensor(v.astype(np.float32)) for v in (x, means, log_scales)))
    theirs = id_discretized_gaussian_log_likelihood(x, means, log_scales)
    bulk = theirs > np.log(0.01)
    assert bulk.sum() > 200
    bound = 3.6e-4 / np.exp(theirs[bulk]) + 1e-4  # the approximation, and float32 rounding
    assert np.all(np.abs(ours.asnumpy()[bulk] - theirs[bulk]) <= bound)


class FixedOutput(nn.Cell):
    """A network whose output is its one Parameter, whatever the input: the loss's gradient with respect to the
    output is the Parameter's."""

    def __init__(self, value):
        super().__init__()
        self.out = ms.Parameter(ms.Tensor(value), name="out")

    def construct(self, x, t):
        return self.out * 1.0


def loss_inputs(process, batch=6):
    rng = np.random.default_rng(1)
    c = 1
    x_start = (rng.integers(0, 256, (batch, c, 4, 4)) / 127.5 - 1.0).astype(np.float32)
    noise = rng.standard_normal(x_start.shape).astype(np.float32)
    t = np.array([0, 1, 7, 30, 60, 99][:batch], np.int32)  # t = 0: the decoder term
    out = np.concatenate([rng.normal(0, 1, x_start.shape), np.tanh(rng.normal(0, 1, x_start.shape))], axis=1)
    return x_start, noise, t, out.astype(np.float32)


def test_hybrid_loss_is_improved_diffusions_rescaled_mse():
    """L_hybrid = L_simple + lambda L_vlb at lambda = 0.001 equals improved-diffusion's training loss with
    RESCALED_MSE (vb times T / 1000) on the same output, noise and t (the decoder's CDF approximation aside)."""
    process = learned_process(num_timesteps=100)
    x_start, noise, t, out = loss_inputs(process)
    loss = DiffusionLoss(FixedOutput(out), process, vlb_weight=0.001)
    got = float(loss(ms.Tensor(x_start), ms.Tensor(t), ms.Tensor(noise)).asnumpy())
    expected = id_training_losses(process, out.astype(np.float64), x_start.astype(np.float64), t,
                                  noise.astype(np.float64))
    assert got == pytest.approx(expected, rel=2e-3)


def test_the_bound_trains_the_variance_half_only():
    """The gradient of L_vlb with respect to the prediction half is zero (Sec. 3.1: stop-gradient on the mean):
    changing lambda changes only the variance half's gradient, which is all lambda L_vlb's."""
    process = learned_process(num_timesteps=100)
    x_start, noise, t, out = loss_inputs(process)
    grads = []
    for weight in (0.001, 1.0):
        net = FixedOutput(out)
        loss = DiffusionLoss(net, process, vlb_weight=weight)
        grad_fn = ms.value_and_grad(loss, None, net.trainable_params())
        grads.append(grad_fn(ms.Tensor(x_start), ms.Tensor(t), ms.Tensor(noise))[1][0].asnumpy())
    c = x_start.shape[1]
    np.testing.assert_array_equal(grads[0][:, :c], grads[1][:, :c])
    assert np.abs(grads[0][:, c:]).max() > 0
    np.testing.assert_allclose(grads[1][:, c:], 1000.0 * grads[0][:, c:], rtol=1e-4, atol=1e-9)


def test_guidance_mixes_the_prediction_half_and_keeps_the_unconditional_variance():
    class Known(nn.Cell):
        num_class_embeds = 3

        def construct(self, x, t, cond):
            scale = (cond.astype(ms.float32) + 1.0).reshape(-1, 1, 1, 1)
            return ops.cat((x * scale, x - scale), axis=1)

    x = ms.Tensor(np.random.default_rng(0).standard_normal((2, 1, 2, 2)).astype(np.float32))
    t, cond = ms.Tensor(np.array([3, 4], np.int32)), ms.Tensor(np.array([0, 1], np.int32))
    out = ClassifierFreeGuidance(Known(), 2, 2.5, learned_variance=True)(x, t, cond).asnumpy()
    xs, s = x.asnumpy(), np.array([1.0, 2.0]).reshape(-1, 1, 1, 1)
    np.testing.assert_allclose(out[:, :1], 3 * xs + 2.5 * (xs * s - 3 * xs), rtol=1e-6)
    np.testing.assert_allclose(out[:, 1:], xs - 3, rtol=1e-6)


def test_the_network_outputs_the_variance_channels_the_config_implies():
    def cfg(name, kwargs, variance="learned_range"):
        return Config.from_dict({"model": {"name": name, "kwargs": kwargs},
                                 "diffusion": {"variance_type": variance}})

    assert network_kwargs(cfg("unet", {"dim": 8, "channels": 1}))["out_dim"] == 2
    assert network_kwargs(cfg("ddpm_unet", {"in_channels": 3}))["out_channels"] == 6
    assert "out_dim" not in network_kwargs(cfg("unet", {"dim": 8, "channels": 1}, "fixed_small"))
    with pytest.raises(ConfigError, match="model.kwargs.out_dim=1: with diffusion.variance_type learned_range the "
                                          "network outputs the prediction and its variance, 2 channels; drop it"):
        network_kwargs(cfg("unet", {"dim": 8, "channels": 1, "out_dim": 1}))
    with pytest.raises(ConfigError, match="vlb_weight must be > 0 with variance_type learned_range"):
        Config.from_dict({"diffusion": {"variance_type": "learned_range", "vlb_weight": 0.0}})


def test_a_learned_variance_run_trains_samples_and_bounds(tmp_path):
    """A tiny run with L_hybrid in graph mode logs finite losses equal to PyNative's; its checkpoint samples with
    DDPM (the learned variance) and DDIM, and its bits/dim use the learned variance."""
    losses = {}
    for mode in ("graph", "pynative"):
        cfg = Config.from_dict({
            "model": {"name": "unet", "kwargs": {"dim": 8, "dim_mults": [1], "channels": 1, "heads": 1,
                                                 "dim_head": 8}},
            "diffusion": {"num_timesteps": 20, "variance_type": "learned_range"},
            "data": {"name": "mnist", "root": str(MNIST5K), "image_size": 8},
            "train": {"output_dir": str(tmp_path / mode), "batch_size": 4, "steps": 3, "warmup_steps": 1,
                      "lr": 1e-2, "log_every": 1, "sample_every": 0, "sample_steps": 4, "save_every": 3, "mode": mode,
                      "ema_decay": 0},
        })
        with execution_mode(ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE):
            trainer = Trainer(cfg)
            trainer.train()
        log = [json.loads(line) for line in (trainer.output_dir / "train_log.jsonl").read_text().splitlines()]
        losses[mode] = [r["loss"] for r in log if "loss" in r]
    assert all(math.isfinite(v) for v in losses["graph"])
    np.testing.assert_allclose(losses["graph"], losses["pynative"], rtol=1e-5)
    pipe = DiffusionPipeline.from_checkpoint(tmp_path / "graph" / "ckpt_00000003.ckpt", mode="pynative")
    assert pipe.process.learned_variance and pipe.network.out_dim == 2
    for name in ("ddpm", "ddim"):
        samples, _ = pipe(2, sampler=name, steps=4, progress=False)
        assert samples.shape == (2, 1, 8, 8) and np.isfinite(samples).all()
    x = ms.Tensor((np.random.default_rng(0).integers(0, 256, (2, 1, 8, 8)) / 127.5 - 1).astype(np.float32))
    bound = calc_bpd_loop(pipe.process, pipe.network, x, seed=0)
    assert np.isfinite(bound["total_bpd"]).all()
