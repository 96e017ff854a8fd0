"""`ms-ddpm export` and `DiffusionPipeline.from_pretrained`: checkpoints as diffusers folders, and diffusers folders
sampled here without a conversion step.

Run checkpoints of tiny DDPMUNets (unconditional, class-conditional with a null row, and with a learned variance:
2C output channels, `variance_type: learned_range`) and of a tiny autoencoder
are written directly, not trained: their norms and biases drawn away from 1 and 0 (so a gamma/beta swap shows) and
EMA weights that differ from the raw ones. diffusers loads the exported folders in PyTorch; its networks give our
outputs on the same inputs (graph and PyNative mode, each network compiled once) and its scheduler the run's betas.
The other way, a folder diffusers writes itself (DDPMPipeline.save_pretrained) samples here as diffusers samples it
from the same noise.
"""
import json
import re
import shutil

import mindspore as ms
import numpy as np
import pytest
from safetensors.numpy import load_file

from ms_ddpm.checkpoint import save_checkpoint
from ms_ddpm.cli import main as cli_main
from ms_ddpm.config import Config
from ms_ddpm.data import create_dataset, iterate
from ms_ddpm.diffusers_format import ConversionError
from ms_ddpm.export import export_checkpoint
from ms_ddpm.models.ddpm_unet import convert_diffusers_state_dict
from ms_ddpm.pipeline import DiffusionPipeline, create_network
from ms_ddpm.processes import create_process
from tests.helpers import assert_matches_reference as assert_matches
from tests.helpers import execution_mode, import_torch_reference, randomise_norms_and_biases

# three levels (8, 4, 2 pixels), attention on the middle one: one attention level downsamples, one upsamples
UNET_KWARGS = {"in_channels": 1, "ch": 8, "ch_mult": [1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [4],
               "image_size": 8, "dropout": 0.0, "num_groups": 4}
RUNS = {
    "unconditional": {
        "model": {"name": "ddpm_unet", "kwargs": UNET_KWARGS},
        "diffusion": {"num_timesteps": 20, "beta_schedule": "linear", "variance_type": "fixed_large",
                      "clip_denoised": False},
        "data": {"image_size": 8, "channels": 1},
    },
    "class-conditional": {  # ten classes and the null row of classifier-free guidance
        "model": {"name": "ddpm_unet", "kwargs": {**UNET_KWARGS, "in_channels": 3, "num_class_embeds": 11}},
        "diffusion": {"num_timesteps": 20, "beta_schedule": "cosine", "objective": "v", "cond_drop_prob": 0.1},
        "data": {"name": "cifar10", "image_size": 8, "channels": 3, "class_names": [f"c{i}" for i in range(10)]},
    },
    "learned-variance": {  # out_channels 2 from the config (`network_kwargs`), not written in it
        "model": {"name": "ddpm_unet", "kwargs": UNET_KWARGS},
        "diffusion": {"num_timesteps": 20, "beta_schedule": "linear", "variance_type": "learned_range"},
        "data": {"image_size": 8, "channels": 1},
    },
}
# f = 2: 8x8 digits -> 2 x 4 x 4 latents
AE_KWARGS = {"in_channels": 1, "out_channels": 1, "block_out_channels": [8, 16], "layers_per_block": 1,
             "latent_channels": 2, "norm_num_groups": 4}


@pytest.fixture(params=[ms.GRAPH_MODE, ms.PYNATIVE_MODE], ids=["graph", "pynative"])
def mode(request):
    with execution_mode(request.param):
        yield request.param


def write_run_checkpoint(folder, raw_config, seed):
    """A checkpoint in `ms-ddpm train`'s layout of the config's network: raw weights with norms ~ N(1, 0.1) and
    biases ~ N(0, 0.1), and EMA weights ("ema.*") that differ from them. Returns (path, the network with its EMA
    weights, the raw weights by name)."""
    cfg = Config.from_dict(raw_config)
    ms.set_seed(seed)
    net = create_network(cfg)
    rng = np.random.default_rng(seed)
    for p in net.get_parameters():
        if p.name.endswith(("gamma", "beta", "bias")):
            p.set_data(ms.Tensor(rng.normal(p.name.endswith("gamma"), 0.1, p.shape).astype(np.float32)))
    raw = {p.name: p.asnumpy() for p in net.get_parameters()}
    ema = [ms.Parameter(ms.Tensor(value + rng.normal(0, 0.05, value.shape).astype(np.float32)), name="ema." + name)
           for name, value in raw.items()]
    folder.mkdir(parents=True, exist_ok=True)
    path = save_checkpoint(folder, 7, list(net.get_parameters()) + ema, cfg.to_yaml())
    for p, average in zip(net.get_parameters(), ema):
        p.set_data(average.value())
    net.set_train(False)
    return path, net, raw


def exported(path, out, **kwargs):
    # export sets graph mode for its own work; the test's mode comes back after it
    with execution_mode(ms.get_context("mode")):
        return export_checkpoint(path, out, **kwargs)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each run of RUNS: its checkpoint, network (EMA weights), raw weights and exported folder."""
    root = tmp_path_factory.mktemp("export")
    found = {}
    for seed, (name, raw_config) in enumerate(RUNS.items()):
        path, net, raw = write_run_checkpoint(root / name, raw_config, seed)
        written, kind, _ = exported(path, root / name / "diffusers")
        assert kind == "ema" and [p.name for p in written] == ["unet", "scheduler", "model_index.json"]
        found[name] = dict(ckpt=path, net=net, raw=raw, folder=root / name / "diffusers", config=raw_config)
    return found


@pytest.fixture(scope="module")
def torch_pipelines(runs):
    """diffusers' DDPMPipeline.from_pretrained of each exported folder, and an input batch and its output."""
    torch, diffusers = import_torch_reference()
    loaded = {}
    rng = np.random.default_rng(5)
    for name, run in runs.items():
        pipe = diffusers.DDPMPipeline.from_pretrained(str(run["folder"]))
        channels = run["config"]["data"]["channels"]
        x = rng.standard_normal((3, channels, 8, 8)).astype(np.float32)
        t = np.array([0, 9, 19], np.int64)
        labels = np.array([3, 9, 10], np.int32) if "num_class_embeds" in run["config"]["model"]["kwargs"] else None
        with torch.no_grad():
            out = pipe.unet(torch.from_numpy(x), torch.from_numpy(t),
                            class_labels=None if labels is None else torch.from_numpy(labels).long()).sample.numpy()
        loaded[name] = dict(pipe=pipe, x=x, t=t, labels=labels, out=out)
    return loaded


@pytest.mark.parametrize("run", list(RUNS))
def test_diffusers_loads_the_export_and_its_unet_gives_our_outputs(run, runs, torch_pipelines, mode):
    ref, net = torch_pipelines[run], runs[run]["net"]
    cond = None if ref["labels"] is None else ms.Tensor(ref["labels"])
    out = net(ms.Tensor(ref["x"]), ms.Tensor(ref["t"].astype(np.int32)), cond).asnumpy()
    assert_matches(out, ref["out"])


@pytest.mark.parametrize("run", list(RUNS))
def test_the_scheduler_is_the_runs_chain(run, runs, torch_pipelines):
    """DDPMScheduler rebuilt from scheduler_config.json has the run's betas (cosine -> squaredcos_cap_v2),
    objective (eps -> epsilon, v -> v_prediction), reverse variance and clipping."""
    scheduler = torch_pipelines[run]["pipe"].scheduler
    cfg = Config.from_dict(runs[run]["config"])
    process = create_process(cfg.diffusion)
    np.testing.assert_allclose(scheduler.betas.numpy(), process.betas, rtol=1e-6)
    expected = {"unconditional": ("epsilon", "fixed_large", False),
                "class-conditional": ("v_prediction", "fixed_small", True),
                "learned-variance": ("epsilon", "learned_range", True)}[run]
    c = scheduler.config
    assert (c.prediction_type, c.variance_type, c.clip_sample) == expected
    unet = torch_pipelines[run]["pipe"].unet
    assert type(unet).__name__ == "UNet2DModel"
    assert unet.config.out_channels == unet.config.in_channels * (2 if run == "learned-variance" else 1)


def patch_diffusers_noise(torch, monkeypatch, seed):
    """diffusers' DDPMPipeline and DDPMScheduler draw the noise our sampler draws from `seed` (x_T, then one
    array per step; diffusers skips the last step's, which ours draws unused)."""
    from diffusers.pipelines.ddpm import pipeline_ddpm
    from diffusers.schedulers import scheduling_ddpm

    rng = np.random.default_rng(seed)

    def our_noise(shape, generator=None, device=None, dtype=None, layout=None):
        return torch.from_numpy(rng.standard_normal(tuple(shape), dtype=np.float32))

    monkeypatch.setattr(pipeline_ddpm, "randn_tensor", our_noise)
    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", our_noise)


def test_a_learned_variance_export_samples_in_diffusers_as_here(runs, torch_pipelines, monkeypatch):
    """DDPM ancestral sampling with the learned variance over the whole chain: diffusers' DDPMPipeline on the
    exported folder (DDPMScheduler's learned_range) from the same noise returns our checkpoint's samples."""
    torch, _ = import_torch_reference()
    patch_diffusers_noise(torch, monkeypatch, seed=3)
    theirs = torch_pipelines["learned-variance"]["pipe"](batch_size=2, num_inference_steps=20, output_type="np").images
    with execution_mode(ms.PYNATIVE_MODE):
        ours, _ = DiffusionPipeline.from_checkpoint(runs["learned-variance"]["ckpt"], mode="pynative")(
            2, sampler="ddpm", seed=3, progress=False)
    assert_matches(ours.transpose(0, 2, 3, 1) * 0.5 + 0.5, theirs)


def test_no_ema_exports_the_raw_weights(runs, tmp_path, capsys):
    """The default export holds the EMA weights, --no-ema the raw ones (read back without torch)."""
    run = runs["unconditional"]
    assert cli_main(["export", "--ckpt", str(run["ckpt"]), "--out", str(tmp_path / "raw"), "--no-ema"]) == 0
    assert "raw weights" in capsys.readouterr().out
    raw, ema = (convert_diffusers_state_dict(load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors")))
                for folder in (tmp_path / "raw", run["folder"]))
    assert raw.keys() == run["raw"].keys() == ema.keys()
    for p in run["net"].get_parameters():
        np.testing.assert_array_equal(raw[p.name], run["raw"][p.name])
        np.testing.assert_array_equal(ema[p.name], p.asnumpy())
    index = json.loads((tmp_path / "raw" / "model_index.json").read_text())
    assert index == {"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"],
                     "scheduler": ["diffusers", "DDPMScheduler"]}


def test_from_pretrained_reads_an_export_back(runs):
    """Our folder read by our pipeline: the same network outputs (the UNet config and the weight names go both
    ways), the run's chain, labels 0..10 without guidance (a diffusers folder names no classes), a short sample."""
    run = runs["class-conditional"]
    pipe = DiffusionPipeline.from_pretrained(run["folder"], mode="pynative")
    assert pipe.config.model.kwargs == {**UNET_KWARGS, "in_channels": 3, "out_channels": 3, "num_class_embeds": 11,
                                        "eps": 1e-6}
    d = pipe.config.diffusion
    assert (d.num_timesteps, d.beta_schedule, d.objective, d.clip_denoised) == (20, "cosine", "v", True)
    assert pipe.class_names == [str(i) for i in range(11)] and pipe.null_label is None
    rng = np.random.default_rng(0)
    x, t, labels = (ms.Tensor(rng.standard_normal((2, 3, 8, 8)).astype(np.float32)), ms.Tensor(np.array([1, 15])),
                    ms.Tensor(np.array([2, 10], np.int32)))
    np.testing.assert_allclose(pipe.network(x, t, labels).asnumpy(), run["net"](x, t, labels).asnumpy(), rtol=1e-6,
                               atol=1e-6)
    samples, drawn = pipe(2, class_labels=[4], sampler="ddim", steps=2, progress=False)
    assert samples.shape == (2, 3, 8, 8) and np.isfinite(samples).all() and list(drawn) == [4, 4]


@pytest.mark.parametrize("raw_config, message", [
    ({"model": {"name": "unet", "kwargs": {"dim": 4, "dim_mults": [1], "channels": 1}}},
     r"diffusers has no class for the annotated U-Net; export takes DDPMUNet runs \(model.name ddpm_unet"),
    ({**RUNS["unconditional"], "diffusion": {"process": "ncsn"}},
     "diffusion.process 'ncsn' has no diffusers scheduler"),
    ({**RUNS["unconditional"], "latent": {"autoencoder": "vae.ckpt", "autoencoder_kwargs": AE_KWARGS,
                                          "scaling_factor": 0.3}},
     "is a latent run: DDPMPipeline samples pixels"),
], ids=["annotated U-Net", "NCSN", "latent"])
def test_runs_without_a_diffusers_form_are_refused_in_one_line(raw_config, message, tmp_path, capsys):
    # refused before any weight is read: one stands in for the network's
    ckpt = save_checkpoint(tmp_path, 1, [ms.Parameter(ms.Tensor(np.zeros(1, np.float32)), name="w")],
                           Config.from_dict(raw_config).to_yaml())
    assert cli_main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_export_into_a_file_is_refused_in_one_line(runs, tmp_path, capsys):
    (tmp_path / "out").write_text("")
    assert cli_main(["export", "--ckpt", str(runs["unconditional"]["ckpt"]), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "is a file; name a folder" in err, err


# --- an autoencoder -----------------------------------------------------------------------------------------------
class EncodeDecode(ms.nn.Cell):
    """The posterior mean of x and the decoding of z in one Cell, so that graph mode compiles them once."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def construct(self, x, z):
        return self.vae.encode(x)[0], self.vae.decode(z)


@pytest.fixture(scope="module")
def autoencoder_export(tmp_path_factory):
    """A tiny autoencoder run on the digits the package carries, exported: (its network, the vae/ folder, the
    scaling factor written)."""
    root = tmp_path_factory.mktemp("vae")
    raw_config = {"model": {"name": "autoencoder_kl", "kwargs": AE_KWARGS}, "data": {"image_size": 8}}
    path, net, _ = write_run_checkpoint(root, raw_config, seed=3)
    written, kind, scale = exported(path, root / "diffusers")
    assert kind == "ema" and written == [root / "diffusers" / "vae"]
    return EncodeDecode(net), written[0], scale


def test_autoencoder_exports_as_a_diffusers_vae(autoencoder_export, mode):
    """diffusers' AutoencoderKL.from_pretrained(vae/) encodes and decodes as ours does."""
    torch, diffusers = import_torch_reference()
    ours, folder, _ = autoencoder_export
    vae = diffusers.AutoencoderKL.from_pretrained(str(folder)).eval()
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, (2, 1, 8, 8)).astype(np.float32)
    z = rng.standard_normal((2, 2, 4, 4)).astype(np.float32)
    with torch.no_grad():
        mean = vae.encode(torch.from_numpy(x)).latent_dist.mean.numpy()
        decoded = vae.decode(torch.from_numpy(z)).sample.numpy()
    our_mean, our_decoded = (v.asnumpy() for v in ours(ms.Tensor(x), ms.Tensor(z)))
    assert_matches(our_mean, mean)
    assert_matches(our_decoded, decoded)


def test_autoencoder_export_carries_the_scaling_factor_of_its_latents(autoencoder_export):
    """An autoencoder trained here has no factor of its own: the export writes what `latent.scaling_factor: auto`
    would use, 1 / std of its latents of the training split, so that diffusers' encoder of those digits, scaled,
    has unit variance."""
    torch, diffusers = import_torch_reference()
    _, folder, scale = autoencoder_export
    assert json.loads((folder / "config.json").read_text())["scaling_factor"] == scale
    (digits,), = iterate(create_dataset("mnist", None, "train", 8, 1, 4000, shuffle=False))
    vae = diffusers.AutoencoderKL.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        latents = vae.encode(torch.from_numpy(digits)).latent_dist.mean.double()
    assert latents.shape == (4000, 2, 4, 4)
    np.testing.assert_allclose(float((latents * vae.config.scaling_factor).std()), 1.0, rtol=1e-4)


# --- a folder diffusers wrote --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def diffusers_folder(tmp_path_factory):
    """A tiny random UNet2DModel with DDPM's options and a DDPMScheduler, saved by DDPMPipeline.save_pretrained."""
    torch, diffusers = import_torch_reference()
    torch.manual_seed(0)
    unet = randomise_norms_and_biases(torch, diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=4,
        norm_eps=1e-6, flip_sin_to_cos=False, freq_shift=1, downsample_padding=0, attention_head_dim=None))
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=12, beta_schedule="squaredcos_cap_v2")
    folder = tmp_path_factory.mktemp("from_diffusers") / "ddpm"
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def pretrained(diffusers_folder):
    with execution_mode(ms.get_context("mode")):
        return DiffusionPipeline.from_pretrained(diffusers_folder)


def test_from_pretrained_unet_gives_diffusers_outputs(diffusers_folder, pretrained, mode):
    torch, diffusers = import_torch_reference()
    unet = diffusers.UNet2DModel.from_pretrained(str(diffusers_folder / "unet")).eval()
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    t = np.array([1, 11])
    with torch.no_grad():
        expected = unet(torch.from_numpy(x), torch.from_numpy(t)).sample.numpy()
    assert_matches(pretrained.network(ms.Tensor(x), ms.Tensor(t.astype(np.int32))).asnumpy(), expected)


def test_from_pretrained_samples_as_diffusers_from_the_same_noise(diffusers_folder, pretrained, monkeypatch):
    """DDPM ancestral sampling over all 12 timesteps: diffusers' DDPMPipeline, its noise replaced by the draws our
    sampler makes from seed 0 (x_T, then one draw per step), returns our samples (in [0, 1], channels last)."""
    torch, diffusers = import_torch_reference()
    patch_diffusers_noise(torch, monkeypatch, seed=0)
    theirs = diffusers.DDPMPipeline.from_pretrained(str(diffusers_folder))(
        batch_size=2, num_inference_steps=12, output_type="np").images
    d = pretrained.config.diffusion
    assert (d.num_timesteps, d.beta_schedule, d.objective, d.clip_denoised) == (12, "cosine", "eps", True)
    with execution_mode(ms.PYNATIVE_MODE):
        ours, labels = pretrained(2, sampler="ddpm", seed=0, progress=False)
    assert labels is None
    assert_matches(ours.transpose(0, 2, 3, 1) * 0.5 + 0.5, theirs)


@pytest.mark.parametrize("file, change, message", [
    ("scheduler/scheduler_config.json", {"variance_type": "learned"},
     "variance_type 'learned' has no counterpart in ms_ddpm"),
    ("scheduler/scheduler_config.json", {"variance_type": "learned_range"},
     "the UNet has 3 output channels for 3 input channels and variance_type 'learned_range'; ms_ddpm's samplers "
     "take 6"),
    ("scheduler/scheduler_config.json", {"beta_schedule": "laplace"}, "beta_schedule 'laplace' has no counterpart"),
    ("scheduler/scheduler_config.json", {"thresholding": True}, "needs thresholding=False"),
    ("unet/config.json", {"flip_sin_to_cos": True}, "DDPMUNet needs flip_sin_to_cos=False"),
    ("model_index.json", {"_class_name": "DDIMPipeline"}, "holds a 'DDIMPipeline' pipeline"),
])
def test_from_pretrained_refuses_settings_it_cannot_represent(file, change, message, diffusers_folder, tmp_path):
    folder = tmp_path / "changed"
    shutil.copytree(diffusers_folder, folder)
    config = json.loads((folder / file).read_text())
    (folder / file).write_text(json.dumps({**config, **change}))
    with pytest.raises(ConversionError, match=message) as info:
        DiffusionPipeline.from_pretrained(folder)
    assert "\n" not in str(info.value)
