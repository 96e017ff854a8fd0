"""Latent diffusion in the training system: the autoencoder trained by `ms-ddpm train` (model.name autoencoder_kl:
its loss, an overfit, resume == uninterrupted, PSNR and reconstruction grids), then a class-conditional
cross-attention U-Net trained in its latent space (the latent cache, scaling_factor auto, the autoencoder in the
checkpoint, `ms-ddpm sample` / `evaluate` decoding), and the refusals of bad latent configs.

One graph-mode autoencoder run (8 steps, 8x8 digits) serves the module; its resumed half and the latent run are
PyNative (a handful of steps of tiny networks, cheaper op by op than a compile), and the latent run once more in
graph mode, as configs/ldm_mnist5k_cpu.yaml trains, must take the same steps."""
import json
import re

import mindspore as ms
import numpy as np
import pytest
import yaml
from mindspore import nn

from ms_ddpm.checkpoint import load_checkpoint
from ms_ddpm.cli import main as cli_main
from ms_ddpm.config import Config
from ms_ddpm.data import create_dataset, iterate
from ms_ddpm.latent import FirstStage, LatentCache, _Encoder, auto_scaling_factor, encode_split, load_autoencoder
from ms_ddpm.losses import AutoencoderLoss
from ms_ddpm.metrics.reconstruction import psnr
from ms_ddpm.models import AutoencoderKL, create_model
from ms_ddpm.pipeline import DiffusionPipeline
from ms_ddpm.train.tasks import AutoencoderTask
from ms_ddpm.train.trainer import Trainer
from tests.helpers import (MNIST5K, assert_matches_reference, assert_same_network, execution_mode,
                           import_torch_reference, load_script, randomise_norms_and_biases, save_diffusers_model)
from tests.test_ncsn_training import assert_resumed_like_uninterrupted, read_losses

# f = 2: 8x8 digits -> 2 x 4 x 4 latents; 9,830 parameters
AE_KWARGS = {"in_channels": 1, "out_channels": 1, "block_out_channels": [8, 8], "layers_per_block": 1,
             "latent_channels": 2, "norm_num_groups": 4}
# a class-conditional U-Net on the latents, the labels through cross-attention (level 0 and the bottleneck)
LDM_KWARGS = {"dim": 8, "dim_mults": [1, 2], "channels": 2, "heads": 1, "dim_head": 8, "num_classes": 10,
              "context_dim": 8, "cross_attention_levels": [0]}


def ae_config(output_dir, **train):
    t = {"output_dir": str(output_dir), "batch_size": 4, "steps": 8, "warmup_steps": 2, "lr": 3e-3, "log_every": 1,
         "sample_every": 8, "save_every": 4, "eval_every": 4, "eval_batch_size": 500, "ema_decay": 0.9, "seed": 3,
         "num_samples": 8}
    t.update(train)
    return Config.from_dict({
        "model": {"name": "autoencoder_kl", "kwargs": AE_KWARGS},
        "autoencoder": {"loss_type": "l1", "kl_weight": 1e-3},
        "data": {"name": "mnist", "root": str(MNIST5K), "image_size": 8},
        "train": t,
    })


def ldm_config(output_dir, autoencoder, model=None, diffusion=None, **train):
    t = {"output_dir": str(output_dir), "batch_size": 8, "steps": 4, "warmup_steps": 1, "lr": 3e-3, "log_every": 1,
         "sample_every": 4, "save_every": 4, "ema_decay": 0.9, "seed": 5, "mode": "pynative", "sample_steps": 2,
         "num_samples": 10}
    t.update(train)
    return Config.from_dict({
        "model": {"name": "unet", "kwargs": {**LDM_KWARGS, **(model or {})}},
        "diffusion": diffusion or {"num_timesteps": 50, "cond_drop_prob": 0.2},
        "data": {"name": "mnist", "root": str(MNIST5K), "image_size": 8},
        "latent": {"autoencoder": str(autoencoder)},
        "train": t,
    })


def eval_records(output_dir):
    lines = (output_dir / "train_log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("event") == "eval"]


@pytest.fixture(scope="module")
def ae_run(tmp_path_factory):
    """8 graph-mode steps of the autoencoder, checkpoints at 4 and 8, PSNR at 4 and 8, a reconstruction grid."""
    out = tmp_path_factory.mktemp("ae_full")
    trainer = Trainer(ae_config(out))
    trainer.train()
    return trainer, out


# --- the first stage ---------------------------------------------------------------------------------------------
def test_autoencoder_loss_is_reconstruction_plus_weighted_closed_form_kl():
    """The loss is sum |x - D(mean + std eps)| + kl_weight KL with the Gaussian KL in closed form (Kingma & Welling
    2014, Appendix B), per image, averaged over the batch; l2 squares the error."""
    ms.set_seed(0)
    ae = AutoencoderKL(**AE_KWARGS)
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (3, 1, 8, 8)).astype(np.float32)
    eps = rng.standard_normal((3, 2, 4, 4)).astype(np.float32)
    mean, logvar = (v.asnumpy() for v in ae.encode(ms.Tensor(x)))
    reconstruction = ae.decode(ms.Tensor(mean + np.exp(0.5 * logvar) * eps)).asnumpy()
    kl = 0.5 * (mean**2 + np.exp(logvar) - 1 - logvar).sum(axis=(1, 2, 3))
    for loss_type, error in [("l1", np.abs), ("l2", np.square)]:
        loss = AutoencoderLoss(ae, loss_type, kl_weight=0.5)
        assert loss.noise_shape((3, 1, 8, 8)) == (3, 2, 4, 4)
        expected = (error(reconstruction - x).sum(axis=(1, 2, 3)) + 0.5 * kl).mean()
        got = float(loss(ms.Tensor(x), ms.Tensor(np.zeros(3, np.int32)), ms.Tensor(eps)).asnumpy())
        np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_tiny_autoencoder_overfits_four_images():
    """Four digits, 150 Adam steps in graph mode: the PSNR of their reconstructions rises from under 10 dB to over
    20 dB."""
    images = next(create_dataset("mnist", str(MNIST5K), "test", 8, 1, 4, shuffle=False)
                  .create_tuple_iterator(output_numpy=True, num_epochs=1))[0]
    ms.set_seed(0)
    ae = AutoencoderKL(**AE_KWARGS)
    rng = np.random.default_rng(0)
    x, t = ms.Tensor(images), ms.Tensor(np.zeros(4, np.int32))
    start = psnr(ae(x).asnumpy(), images)
    step = nn.TrainOneStepCell(AutoencoderLoss(ae, "l1", 1e-6), nn.Adam(ae.trainable_params(), learning_rate=3e-3))
    with execution_mode(ms.GRAPH_MODE):
        for _ in range(150):
            step(x, t, ms.Tensor(rng.standard_normal((4, 2, 4, 4), dtype=np.float32)))
    ae.set_train(False)
    end = psnr(ae(x).asnumpy(), images)
    assert start < 10 < 20 < end, (start, end)


def test_autoencoder_run_logs_psnr_and_writes_reconstructions(ae_run):
    trainer, out = ae_run
    assert isinstance(trainer.loss_fn, AutoencoderLoss) and isinstance(trainer.task, AutoencoderTask)
    losses = read_losses(out)
    assert len(losses) == 8 and all(np.isfinite(losses))
    records = eval_records(out)
    assert [r["step"] for r in records] == [4, 8] and all(np.isfinite(r["psnr"]) for r in records)
    assert records[0]["num"] == 1000  # the whole test split
    assert (out / "samples_00000008.png").is_file()


def test_autoencoder_resume_equals_uninterrupted(ae_run, tmp_path):
    """4 steps + resume + 4 steps == 8 uninterrupted steps: the posterior samples' eps come from the step's
    (seed, step) draws, the weights, optimizer and EMA from the checkpoint."""
    full, out = ae_run
    (tmp_path / "ckpt_00000004.ckpt").write_bytes((out / "ckpt_00000004.ckpt").read_bytes())
    resumed = Trainer(ae_config(tmp_path, sample_every=0, eval_every=0))
    assert resumed.resume().name == "ckpt_00000004.ckpt" and resumed.step == 4
    resumed.train()
    assert_resumed_like_uninterrupted(full, out, resumed, tmp_path, 4)


def test_settings_that_do_nothing_are_refused(tmp_path, capsys):
    cfg = ae_config(tmp_path)
    cfg.diffusion.num_timesteps = 50
    (tmp_path / "ae.yaml").write_text(cfg.to_yaml())
    assert cli_main(["train", "--config", str(tmp_path / "ae.yaml")]) == 2
    assert "diffusion.num_timesteps: model.name autoencoder_kl trains the autoencoder" in capsys.readouterr().err
    code = cli_main(["train", "--set", "model.kwargs={dim: 4, dim_mults: [1], channels: 1}",
                     "autoencoder.kl_weight=0.1", f"train.output_dir={tmp_path / 'x'}"])
    assert code == 2 and "the autoencoder section sets the loss" in capsys.readouterr().err


# --- diffusion in its latent space -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def autoencoder_ckpt(ae_run):
    return ae_run[1] / "ckpt_00000008.ckpt"


def test_load_autoencoder_takes_the_ema_weights(ae_run, autoencoder_ckpt):
    trainer, _ = ae_run
    ae, kwargs = load_autoencoder(autoencoder_ckpt)
    assert kwargs == AE_KWARGS
    for ema, p in zip(trainer.ema.ema_weights, ae.trainable_params()):
        np.testing.assert_array_equal(p.asnumpy(), ema.asnumpy())


def test_latent_cache_equals_encoding_on_the_fly(autoencoder_ckpt):
    """The cache's shuffled batches (seed 11) are the scaled posterior means of the image pipeline's batches of the
    same seed, labels included; auto scaling gives the training latents unit variance."""
    ae, _ = load_autoencoder(autoencoder_ckpt)
    cfg = ldm_config("unused", autoencoder_ckpt)
    cache = encode_split(ae, cfg.data, "train", labels=True)
    assert cache.latents.shape == (4000, 2, 4, 4) and cache.labels.shape == (4000,)
    scale = auto_scaling_factor(cache.latents)
    np.testing.assert_allclose((cache.latents.astype(np.float64) * scale).std(), 1.0, rtol=1e-6)
    cached = cache.dataset(32, scale, seed=11).create_tuple_iterator(output_numpy=True, num_epochs=1)
    images = create_dataset("mnist", str(MNIST5K), "train", 8, 1, 32, seed=11, labels=True)
    encoder = _Encoder(ae)
    for i, ((z, z_labels), (x, x_labels)) in enumerate(zip(cached, images.create_tuple_iterator(output_numpy=True,
                                                                                               num_epochs=1))):
        np.testing.assert_array_equal(z_labels, x_labels)
        np.testing.assert_allclose(z, encoder(ms.Tensor(x))[0].asnumpy() * np.float32(scale), rtol=1e-4, atol=1e-5)
        if i == 2:
            break


def test_the_diffusion_sees_z_times_the_factor_and_first_stage_decodes_z_over_it():
    """Rombach et al. 2022, Sec. 4.3.2: the diffusion model is trained on z * scaling_factor (the cache's batches)
    and its samples x are decoded as D(x / scaling_factor). With a factor of 7.5, far from 1, the cache multiplies by
    it and FirstStage gives the decoder's images of the unscaled latents, so a factor applied the wrong way fails."""
    ms.set_seed(0)
    ae = AutoencoderKL(**AE_KWARGS)
    latents = np.random.default_rng(0).standard_normal((6, 2, 4, 4)).astype(np.float32)
    (batch,), = iterate(LatentCache(latents, None, 0.0).dataset(6, 7.5, shuffle=False))
    np.testing.assert_allclose(batch, latents * 7.5, rtol=1e-6)
    images = ae.decode(ms.Tensor(latents)).asnumpy()
    np.testing.assert_allclose(FirstStage(ae, 7.5)(ms.Tensor(batch)).asnumpy(), images, rtol=1e-5, atol=1e-5)
    # the decoder is not scale-invariant (its GroupNorms follow a biased convolution and a residual path)
    assert np.abs(ae.decode(ms.Tensor(batch)).asnumpy() - images).max() > 0.1


@pytest.fixture(scope="module")
def latent_run(autoencoder_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("ldm")
    trainer = Trainer(ldm_config(out, autoencoder_ckpt))
    trainer.train()
    return trainer, out


def test_latent_run_stores_the_scaling_factor_and_the_autoencoder(latent_run, autoencoder_ckpt):
    trainer, out = latent_run
    assert trainer.task.process.clip_denoised is False  # x0 is not clipped in latent space
    state = load_checkpoint(out / "ckpt_00000004.ckpt")
    saved = Config.from_dict(yaml.safe_load(state["config"]))
    ae, _ = load_autoencoder(autoencoder_ckpt)
    expected = auto_scaling_factor(encode_split(ae, saved.data, "train").latents)
    assert saved.latent.scaling_factor == pytest.approx(expected, rel=1e-12)
    assert saved.latent.autoencoder_kwargs == AE_KWARGS
    for p in ae.get_parameters():  # the decoder travels in the checkpoint
        np.testing.assert_array_equal(state["autoencoder." + p.name].asnumpy(), p.asnumpy())
    assert all(np.isfinite(read_losses(out))) and (out / "samples_00000004.png").is_file()


def test_sample_and_evaluate_decode_a_latent_checkpoint(latent_run, tmp_path, capsys):
    _, out = latent_run
    ckpt = str(out / "ckpt_00000004.ckpt")
    pipe = DiffusionPipeline.from_checkpoint(ckpt, mode="pynative")
    assert pipe.sample_shape == (2, 4, 4) and pipe.process.clip_denoised is False
    code = cli_main(["sample", "--ckpt", ckpt, "--steps", "2", "--num", "4", "--batch-size", "4", "--class-labels",
                     "3", "--guidance-scale", "2", "--mode", "pynative", "--gif", "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert code == 0, err
    with np.load(tmp_path / "s" / "samples.npz") as f:
        assert f["samples"].shape == (4, 1, 8, 8) and list(f["labels"]) == [3, 3, 3, 3]  # decoded images
    assert (tmp_path / "s" / "denoising.gif").is_file()
    code = cli_main(["evaluate", "--ckpt", ckpt, "--steps", "2", "--num", "6", "--batch-size", "4", "--mode",
                     "pynative", "--json", str(tmp_path / "eval.json")])
    err = capsys.readouterr().err
    assert code == 0, err
    assert np.isfinite(json.loads((tmp_path / "eval.json").read_text())["fd"])
    code = cli_main(["evaluate", "--ckpt", ckpt, "--bpd-batches", "1", "--mode", "pynative"])
    err = capsys.readouterr().err
    assert code == 2 and "bits/dim of a latent diffusion model" in err and err.strip().count("\n") == 0


@pytest.mark.parametrize("problem,message", [
    ("missing", "autoencoder checkpoint .*missing.ckpt does not exist"),
    ("not an autoencoder", "is a checkpoint of a model.name 'unet' run, not of an autoencoder"),
    ("channels", "has 2 latent channels, the network takes 3: set model.kwargs.channels: 2"),
])
def test_bad_latent_configs_end_in_one_line(problem, message, latent_run, autoencoder_ckpt, tmp_path, capsys):
    path = {"missing": tmp_path / "missing.ckpt", "not an autoencoder": latent_run[1] / "ckpt_00000004.ckpt",
            "channels": autoencoder_ckpt}[problem]
    cfg = ldm_config(tmp_path / "run", path, model={"channels": 3} if problem == "channels" else None)
    (tmp_path / "ldm.yaml").write_text(cfg.to_yaml())
    assert cli_main(["train", "--config", str(tmp_path / "ldm.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and re.search(message, err), err


@pytest.mark.parametrize("process", ["edm", "flow"])
def test_a_latent_run_may_pick_any_process(process, autoencoder_ckpt, tmp_path):
    """Latent diffusion on EDM or flow: the trainer's continuous time on the latent cache, unclipped x_0, and the
    checkpoint samples decoded images with its process's default sampler and guidance."""
    trainer = Trainer(ldm_config(tmp_path, autoencoder_ckpt, diffusion={"process": process, "cond_drop_prob": 0.2}))
    trainer.train()
    assert trainer.task.process.name == process and trainer.task.process.clip_denoised is False
    assert all(np.isfinite(read_losses(tmp_path)))
    pipe = DiffusionPipeline.from_checkpoint(tmp_path / "ckpt_00000004.ckpt", mode="pynative")
    samples, labels = pipe(4, class_labels=[1, 2], guidance_scale=2.0, steps=2, batch_size=4, progress=False)
    assert samples.shape == (4, 1, 8, 8) and np.isfinite(samples).all() and list(labels) == [1, 2, 1, 2]


@pytest.fixture(scope="module")
def graph_latent_run(autoencoder_ckpt, tmp_path_factory):
    """The latent run in graph mode (no grid: sampling would compile a graph of its own)."""
    out = tmp_path_factory.mktemp("ldm_graph")
    trainer = Trainer(ldm_config(out, autoencoder_ckpt, mode="graph", sample_every=0))
    trainer.train()
    return trainer, out


def test_graph_mode_latent_steps_equal_pynative(latent_run, graph_latent_run):
    """The compiled latent step (the labels through cross-attention, label dropout, the cached latents) logs the
    PyNative run's losses, and its weights and EMA weights give the network the PyNative run's outputs."""
    pynative, pynative_out = latent_run
    graph, graph_out = graph_latent_run
    assert graph.cfg.latent.scaling_factor == pytest.approx(pynative.cfg.latent.scaling_factor, rel=1e-6)
    np.testing.assert_allclose(read_losses(graph_out), read_losses(pynative_out), rtol=1e-6)
    z = ms.Tensor(np.random.default_rng(1).standard_normal((4, 2, 4, 4)), ms.float32)
    t, labels = ms.Tensor([0, 15, 30, 49], ms.int32), ms.Tensor([0, 3, 9, 10], ms.int32)  # 10: the null label
    net = create_model("unet", **graph.cfg.model.kwargs)
    assert_same_network(net, [p.asnumpy() for p in pynative.model.trainable_params()],
                        [p.asnumpy() for p in graph.model.trainable_params()], z, t, labels)
    assert_same_network(net, [w.asnumpy() for w in pynative.ema.ema_weights],
                        [w.asnumpy() for w in graph.ema.ema_weights], z, t, labels)


def test_a_converted_vae_keeps_its_scaling_factor(tmp_path):
    """A diffusers AutoencoderKL (tiny, random, scaling_factor 0.3) converted by scripts/convert_diffusers_vae.py loads
    as latent.autoencoder (its decoder is diffusers'), and `scaling_factor: auto` is then its own factor: in the run's
    config, its first stage and the pipeline of its checkpoint. A number overrides it."""
    torch, diffusers = import_torch_reference()
    torch.manual_seed(0)
    vae = randomise_norms_and_biases(torch, diffusers.AutoencoderKL(
        in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1, latent_channels=2,
        norm_num_groups=4, sample_size=8, scaling_factor=0.3))
    weights, config = save_diffusers_model(vae, tmp_path / "vae", "safetensors")
    ckpt = tmp_path / "vae.ckpt"
    converter = load_script("convert_diffusers_vae")
    assert converter.main(["--input", str(weights), "--config", str(config), "--output", str(ckpt)]) == 0
    ae, kwargs = load_autoencoder(ckpt)
    assert kwargs["scaling_factor"] == ae.scaling_factor == 0.3
    z = np.random.default_rng(0).standard_normal((2, 2, 4, 4)).astype(np.float32)
    with torch.no_grad():
        assert_matches_reference(ae.decode(ms.Tensor(z)).asnumpy(), vae.decode(torch.from_numpy(z)).sample.numpy())

    trainer = Trainer(ldm_config(tmp_path / "run", ckpt, steps=1, save_every=1, sample_every=0))
    assert trainer.cfg.latent.scaling_factor == trainer.task.first_stage.scaling_factor == 0.3
    trainer.train()
    pipe = DiffusionPipeline.from_checkpoint(tmp_path / "run" / "ckpt_00000001.ckpt", mode="pynative")
    assert pipe.config.latent.scaling_factor == pipe.first_stage.scaling_factor == 0.3
    overridden = ldm_config(tmp_path / "other", ckpt)
    overridden.latent.scaling_factor = 0.5
    assert Trainer(overridden).task.first_stage.scaling_factor == 0.5
