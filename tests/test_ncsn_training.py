"""NCSN (Song & Ermon 2019) in the training system: `diffusion.process: ncsn` trains a noise-conditional score
network with its denoising score matching loss, writes annealed-Langevin grids, checkpoints, resumes, and `ms-ddpm sample` draws from it.

One graph-mode training run per module and one resumed graph-mode run (compiles dominate the time); the sampling
runs in PyNative mode and the error cases build no network.
"""
import json
from pathlib import Path

import numpy as np
import pytest

from ms_ddpm.cli import main as cli_main
from ms_ddpm.config import Config, ConfigError
from ms_ddpm.losses import DiffusionLoss
from ms_ddpm.pipeline import DiffusionPipeline, build_sampler
from ms_ddpm.processes import VESDE, create_process, geometric_sigmas
from ms_ddpm.samplers import AnnealedLangevinSampler, samplers_for
from ms_ddpm.train.trainer import Trainer
from tests.helpers import MNIST5K

# 4,581 parameters: one U-Net level at width 4
TINY_MODEL = {"dim": 4, "dim_mults": [1], "channels": 1, "heads": 1, "dim_head": 4}
STEPS = 12


def ncsn_config(output_dir, diffusion=None, **train):
    """8x8 MNIST digits, batch 8, the default NCSN levels (the paper's, rescaled to [-1, 1]), ALD grids of 2 steps
    per level; `diffusion` updates the diffusion section, `train` the train section."""
    t = {"output_dir": str(output_dir), "batch_size": 8, "steps": STEPS, "warmup_steps": 2, "lr": 3e-3,
         "log_every": 1, "sample_every": STEPS, "save_every": STEPS // 2, "ema_decay": 0.9, "seed": 5,
         "sampler": "ald", "sample_steps": 2, "num_samples": 4}
    t.update(train)
    return Config.from_dict({
        "model": {"name": "unet", "kwargs": TINY_MODEL},
        "diffusion": {"process": "ncsn", **(diffusion or {})},
        "data": {"name": "mnist", "root": str(MNIST5K), "image_size": 8},
        "train": t,
    })


def read_losses(output_dir):
    lines = (Path(output_dir) / "train_log.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]


def weights(net):
    return {p.name: p.asnumpy().copy() for p in net.trainable_params()}


def assert_resumed_like_uninterrupted(full, full_dir, resumed, resumed_dir, first_step):
    """The resumed trainer logged the uninterrupted run's losses from `first_step` on and ends with its weights and
    EMA weights."""
    np.testing.assert_allclose(read_losses(resumed_dir), read_losses(full_dir)[first_step:], rtol=1e-6)
    for name, value in weights(full.model).items():
        np.testing.assert_allclose(weights(resumed.model)[name], value, rtol=1e-6, atol=1e-7, err_msg=name)
    for a, b in zip(full.ema.ema_weights, resumed.ema.ema_weights):
        np.testing.assert_allclose(b.asnumpy(), a.asnumpy(), rtol=1e-6, atol=1e-7)


@pytest.fixture(scope="module")
def graph_run(tmp_path_factory):
    """STEPS graph-mode steps, a checkpoint half way and at the end, one ALD grid at the end."""
    out = tmp_path_factory.mktemp("ncsn_graph")
    trainer = Trainer(ncsn_config(out))
    trainer.train()
    return trainer, out


def test_ncsn_trains_with_falling_loss_and_writes_an_ald_grid(graph_run):
    trainer, out = graph_run
    assert isinstance(trainer.loss_fn, DiffusionLoss) and trainer.loss_fn.process.name == "ncsn" and isinstance(trainer.task.grid_sampler, AnnealedLangevinSampler)
    np.testing.assert_allclose(trainer.loss_fn.process._sigmas.asnumpy(), geometric_sigmas(2.0, 0.02, 10), rtol=1e-6)
    assert trainer.task.grid_sampler.step_lr == 8e-5 and trainer.task.grid_sampler.n_steps_each == 2
    losses = read_losses(out)
    assert len(losses) == STEPS and all(np.isfinite(losses))
    # the zero score scores D / 2 = 32 at every level (1/2 E||z||^2 over 64 pixels); training must go below it
    assert np.mean(losses[-4:]) < min(np.mean(losses[:4]), 32.0), losses
    assert (out / f"samples_{STEPS:08d}.png").stat().st_size > 0
    assert [p.name for p in sorted(out.glob("ckpt_*.ckpt"))] == ["ckpt_00000006.ckpt", "ckpt_00000012.ckpt"]


def test_resume_continues_exactly_like_the_uninterrupted_run(graph_run, tmp_path):
    """Steps 7..12 resumed from the step-6 checkpoint repeat the uninterrupted run's: the same level indices and
    noise from the host RNG, the same batches, and the optimizer, loss-scaler and EMA state from the checkpoint."""
    full, out = graph_run
    split = tmp_path / "split"
    split.mkdir()
    (split / "ckpt_00000006.ckpt").write_bytes((out / "ckpt_00000006.ckpt").read_bytes())
    resumed = Trainer(ncsn_config(split, sample_every=0))
    assert resumed.resume().name == "ckpt_00000006.ckpt" and resumed.step == 6
    resumed.train()
    assert_resumed_like_uninterrupted(full, out, resumed, split, 6)


def run_cli(capsys, *argv):
    code = cli_main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_samples_an_ncsn_checkpoint(graph_run, tmp_path, capsys):
    _, out = graph_run
    ckpt = out / f"ckpt_{STEPS:08d}.ckpt"
    pipe = DiffusionPipeline.from_checkpoint(ckpt, mode="pynative")
    cfg, process = pipe.config, pipe.process
    assert cfg.diffusion.process == "ncsn" and pipe.checkpoint_step == STEPS and pipe.weights == "ema"
    assert isinstance(process, VESDE) and np.allclose(process.sigmas, geometric_sigmas(2.0, 0.02, 10))

    code, stdout, err = run_cli(capsys, "sample", "--ckpt", ckpt, "--steps", 2, "--num", 3, "--mode", "pynative",
                                "--out", tmp_path / "ald")
    assert code == 0, err
    assert "sampler ald" in stdout  # the default for an NCSN checkpoint
    samples = np.load(tmp_path / "ald" / "samples.npz")["samples"]
    assert samples.shape == (3, 1, 8, 8) and np.isfinite(samples).all()
    assert (tmp_path / "ald" / "samples.png").stat().st_size > 0

    # the VE SDE samplers run on the same levels
    code, stdout, err = run_cli(capsys, "sample", "--ckpt", ckpt, "--sampler", "pc", "--steps", 5, "--num", 2,
                                "--mode", "pynative", "--out", tmp_path / "pc")
    assert code == 0, err
    assert np.isfinite(np.load(tmp_path / "pc" / "samples.npz")["samples"]).all()

    code, _, err = run_cli(capsys, "sample", "--ckpt", ckpt, "--sampler", "ddim", "--mode", "pynative",
                           "--out", tmp_path / "ddim")
    assert code == 2 and "sampler 'ddim' does not sample a network of diffusion.process 'ncsn'" in err
    assert str(list(samplers_for("ncsn"))) in err and "Traceback" not in err


def test_evaluate_measures_an_ncsn_checkpoint_with_ald(graph_run, capsys):
    """`ms-ddpm evaluate` on an NCSN checkpoint: annealed Langevin by default, FD in pixel space; the DDPM bound is
    refused with one line."""
    _, out = graph_run
    ckpt = out / f"ckpt_{STEPS:08d}.ckpt"
    common = ["--ckpt", ckpt, "--steps", 1, "--num", 4, "--batch-size", 4, "--mode", "pynative"]
    code, stdout, err = run_cli(capsys, "evaluate", *common)
    assert code == 0, err
    assert "FD:" in stdout and "samples/s:" in stdout and "(ald, " in stdout
    code, _, err = run_cli(capsys, "evaluate", *common, "--bpd-batches", 1)
    assert code == 2 and "needs a DDPM chain" in err and "Traceback" not in err


def test_cli_refuses_ald_for_a_ddpm_checkpoint(tmp_path, capsys):
    cfg = ncsn_config(tmp_path / "ddpm", {"process": "ddpm", "num_timesteps": 20}, mode="pynative",
                      sampler="ddim", sample_steps=5)
    (tmp_path / "ddpm").mkdir()
    ckpt = Trainer(cfg).save()  # untrained weights suffice: the sampler is refused before any network call
    code, _, err = run_cli(capsys, "sample", "--ckpt", ckpt, "--sampler", "ald", "--mode", "pynative",
                           "--out", tmp_path / "out")
    assert code == 2 and "sampler 'ald' does not sample a network of diffusion.process 'ddpm'; use one of " \
                         "['ddpm', 'ddim'" in err


def test_bad_ncsn_configs_name_the_fix(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"diffusion.process must be one of \['ddpm', 'ncsn', 'edm', 'flow', "
                                          r"'consistency'\], got 'smld'"):
        Config.from_dict({"diffusion": {"process": "smld"}})
    with pytest.raises(ConfigError, match=r"diffusion key\(s\) \['num_timesteps', 'objective'\] are settings of "
                                          r"process 'ddpm' and do nothing with diffusion.process 'ncsn'"):
        Config.from_dict({"diffusion": {"process": "ncsn", "objective": "v", "num_timesteps": 10}})
    with pytest.raises(ConfigError, match=r"\['sigma_max'\] are settings of process 'ncsn' and do nothing with "
                                          r"diffusion.process 'ddpm': remove them, or set diffusion.process: ncsn"):
        Config.from_dict({"diffusion": {"sigma_max": 50.0}})
    # a config written out in full (defaults of the other process included) loads back
    cfg = ncsn_config(tmp_path / "run", mode="pynative")
    good = tmp_path / "ncsn.yaml"
    good.write_text(cfg.to_yaml())
    assert Config.load(good) == cfg

    for overrides, message in [
        (["train.sampler=ddim"], "train.sampler='ddim', train.sample_steps=2: sampler 'ddim' does not sample a "
                                 "network of diffusion.process 'ncsn'; use one of ['euler_maruyama', 'pc', 'ode', "
                                 "'ald']"),
        (["train.sample_steps=0"], "n_steps_each must be an integer >= 1"),
        (["diffusion.langevin_step_lr=0"], "step_lr must be > 0"),
        (["diffusion.sigma_min=3.0"], "need 0 < sigma_min < sigma_max, got sigma_min=3.0, sigma_max=2.0"),
        (["diffusion.loss_type=l1"], "diffusion key(s) ['loss_type'] are settings of process 'ddpm'"),
    ]:
        code, _, err = run_cli(capsys, "train", "--config", good, "--set", *overrides)
        assert code == 2 and message in err and "Traceback" not in err, (overrides, err)


def test_ncsn_samplers_are_built_on_the_checkpoint_levels():
    cfg = Config.from_dict({"diffusion": {"process": "ncsn", "num_noise_levels": 4, "langevin_step_lr": 1e-4}})
    process = create_process(cfg.diffusion)
    np.testing.assert_allclose(process.sigmas, geometric_sigmas(2.0, 0.02, 4), rtol=1e-12)
    for name in samplers_for("ncsn"):
        sampler = build_sampler(cfg, process, name)
        assert sampler.num_train_timesteps == 4 and sampler.init_noise_sigma == 2.0, name
    assert build_sampler(cfg, process, "ald").step_lr == 1e-4
