"""DiffusionPipeline: an old-format checkpoint samples bit for bit as before, the label rules, guided sampling equal in
graph and PyNative mode, and `ms-ddpm sample` / `evaluate` with class labels and guidance, errors in one line."""
import subprocess
import sys
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest

from ms_ddpm.checkpoint import save_checkpoint
from ms_ddpm.cli import main as cli_main
from ms_ddpm.config import Config, ConfigError
from ms_ddpm.guidance import ClassifierFreeGuidance
from ms_ddpm.kernels import build as kernel_build
from ms_ddpm.models import Unet
from ms_ddpm.pipeline import DiffusionPipeline
from ms_ddpm.processes import create_process

FIXTURES = Path(__file__).resolve().parent / "fixtures"
CLASSES = ["cat", "dog", "owl"]
TINY = {"dim": 4, "dim_mults": [1, 2], "channels": 1, "heads": 1, "dim_head": 4}


def conditional_config(cond_drop_prob=0.1, class_names=CLASSES, **model):
    return Config.from_dict({
        "model": {"name": "unet", "kwargs": {**TINY, "num_classes": len(CLASSES), **model}},
        "diffusion": {"num_timesteps": 20, "cond_drop_prob": cond_drop_prob},
        "data": {"name": "folder", "image_size": 8, "channels": 1, "class_names": class_names},
    })


@pytest.fixture(scope="module")
def pipe():
    """A randomly initialised 3-class U-Net with its null row, trained (by its config) with label dropout."""
    ms.set_seed(0)
    cfg = conditional_config()
    return DiffusionPipeline(Unet(**cfg.model.kwargs), create_process(cfg.diffusion), cfg)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, pipe):
    """The pipeline's network as a run checkpoint (raw weights, no EMA), for the command line."""
    root = tmp_path_factory.mktemp("pipeline")
    ckpt = save_checkpoint(root, 1, pipe.network.get_parameters(), pipe.config.to_yaml())
    return {"conditional": ckpt, "unconditional": FIXTURES / "old_format_unet.ckpt", "root": root}


@pytest.mark.parametrize("ops_used", ["native ops", "CPU kernels"])
def test_old_format_checkpoint_samples_as_before(ops_used, monkeypatch):
    """The unconditional checkpoint written before class conditioning existed (tests/fixtures/README.md): the same
    EMA weights, and DDIM-5 in graph mode draws the samples the old code drew. Bit for bit through the conditioning
    reshape; since GroupNorm left BatchNorm's kernel for MindSpore's GroupNorm op (native ops) or ms_ddpm's CPU
    kernels, which sum in other orders, to float32 rounding (measured: 2.4e-7 at most with the native ops, 3.0e-7
    with the kernels)."""
    if ops_used == "native ops":
        monkeypatch.setattr(kernel_build, "_loaded", {"library": None})  # as if the kernels could not be built
    elif kernel_build.load() is None:
        pytest.skip("the CPU kernels cannot be built here")
    ms.set_context(mode=ms.GRAPH_MODE)
    old = DiffusionPipeline.from_checkpoint(FIXTURES / "old_format_unet.ckpt", mode="graph")
    assert old.weights == "ema" and old.checkpoint_step == 3 and not old.conditional
    samples, labels = old(6, sampler="ddim", steps=5, seed=11, progress=False)
    assert labels is None
    expected = np.load(FIXTURES / "old_format_ddim5_seed11.npy")
    np.testing.assert_allclose(samples, expected, rtol=0, atol=2e-6)


def test_labels_repeat_or_cover_every_class_equally(pipe):
    np.testing.assert_array_equal(pipe.labels(7), [0, 1, 2, 0, 1, 2, 0])
    np.testing.assert_array_equal(pipe.labels(5, [2, 0]), [2, 0, 2, 0, 2])
    assert pipe.labels(6).dtype == np.int32 and pipe.null_label == 3 and pipe.class_names == CLASSES
    with pytest.raises(ValueError, match=r"class label\(s\) \[3, 5\] outside the model's 3 classes 0..2 "
                                         r"\(0: cat, 1: dog, 2: owl\)"):
        pipe.labels(4, [1, 3, 5])
    with pytest.raises(ValueError, match="non-empty list of integers"):
        pipe.labels(4, [])


def test_guidance_scale_one_is_the_network_itself(pipe):
    assert pipe.guided(1.0) is pipe.network  # no doubled batch at scale 1
    guided = pipe.guided(2.0)
    assert isinstance(guided, ClassifierFreeGuidance) and guided.null_label == 3
    assert pipe.guided(4.0) is guided and float(guided.guidance_scale.asnumpy()) == 4.0  # re-scaled, not rebuilt
    with pytest.raises(ValueError, match="guidance scale must be a number >= 0"):
        pipe.guided(-1.0)


def test_guidance_needs_a_trained_null_label():
    no_dropout = conditional_config(cond_drop_prob=0.0)
    pipe = DiffusionPipeline(Unet(**no_dropout.model.kwargs), create_process(no_dropout.diffusion), no_dropout)
    assert pipe.null_label is None and pipe.guided(1.0) is pipe.network
    with pytest.raises(ValueError, match="needs the null label of classifier-free guidance"):
        pipe.guided(2.0)


def test_model_and_classes_must_fit():
    with pytest.raises(ConfigError, match="the model has 3 class embedding rows, the data 3 classes: set "
                                          "model.kwargs.num_classes: 3"):
        cfg = conditional_config(num_classes=2)
        DiffusionPipeline(Unet(**cfg.model.kwargs), create_process(cfg.diffusion), cfg)
    with pytest.raises(ConfigError, match="needs data.class_names"):
        cfg = conditional_config(class_names=None)
        DiffusionPipeline(Unet(**cfg.model.kwargs), create_process(cfg.diffusion), cfg)
    cfg = conditional_config()
    cfg.model.kwargs.pop("num_classes")
    with pytest.raises(ConfigError, match=r"diffusion.cond_drop_prob=0.1 needs a class-conditional model"):
        DiffusionPipeline(Unet(**cfg.model.kwargs), create_process(cfg.diffusion), cfg)
    with pytest.raises(ConfigError, match=r"cond_drop_prob must be in \[0, 1\)"):
        conditional_config(cond_drop_prob=1.0)


def test_guided_sampling_is_the_same_in_graph_and_pynative_mode(pipe):
    """DDIM with guidance: in graph mode each step is one compiled graph (network on the doubled batch + update),
    in PyNative the same ops one by one."""
    draws = {}
    names = [p.name for p in pipe.network.get_parameters()]
    for mode in (ms.PYNATIVE_MODE, ms.GRAPH_MODE):
        ms.set_context(mode=mode)
        draws[mode], labels = pipe(5, [2, 1], guidance_scale=3.0, sampler="ddim", steps=4, seed=2, progress=False)
    np.testing.assert_allclose(draws[ms.GRAPH_MODE], draws[ms.PYNATIVE_MODE], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(labels, [2, 1, 2, 1, 2])
    assert [p.name for p in pipe.network.get_parameters()] == names  # the compiled step renamed no weight
    plain, _ = pipe(5, [2, 1], guidance_scale=1.0, sampler="ddim", steps=4, seed=2, progress=False)
    assert np.abs(plain - draws[ms.GRAPH_MODE]).max() > 1e-3  # guidance changed the samples


def run_cli(capsys, *argv):
    code = cli_main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_samples_requested_classes_with_guidance(checkpoints, tmp_path, capsys):
    code, out, err = run_cli(capsys, "sample", "--ckpt", checkpoints["conditional"], "--class-labels", 2, 0,
                             "--guidance-scale", 2, "--steps", 3, "--num", 5, "--batch-size", 3, "--mode", "pynative",
                             "--out", tmp_path)
    assert code == 0, err
    assert "3 classes, guidance scale 2" in out and "one row per class" in out
    data = np.load(tmp_path / "samples.npz")
    assert data["samples"].shape == (5, 1, 8, 8) and np.isfinite(data["samples"]).all()
    np.testing.assert_array_equal(data["labels"], [2, 0, 2, 0, 2])
    assert (tmp_path / "samples.png").stat().st_size > 0


@pytest.mark.parametrize("which, args, message", [
    ("conditional", ["--class-labels", 1, 7], "class label(s) [7] outside the model's 3 classes 0..2"),
    ("conditional", ["--guidance-scale", -1], "guidance scale must be a number >= 0"),
    ("unconditional", ["--class-labels", 3], "the model is unconditional (trained without labels): drop --class-labels"),
    ("unconditional", ["--guidance-scale", 2], "needs a class-conditional model; this one is unconditional"),
])
def test_cli_refuses_labels_and_scales_the_model_cannot_take(checkpoints, tmp_path, capsys, which, args, message):
    code, _, err = run_cli(capsys, "sample", "--ckpt", checkpoints[which], *args, "--steps", 2, "--num", 2,
                           "--mode", "pynative", "--out", tmp_path)
    assert code == 2 and message in err and "Traceback" not in err, err
    assert err.strip().count("\n") == 0


def test_sampling_and_evaluation_never_import_the_trainer():
    code = ("import sys; import ms_ddpm.cli, ms_ddpm.metrics, ms_ddpm.pipeline; "
            "print([m for m in sys.modules if m.startswith('ms_ddpm.train')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
