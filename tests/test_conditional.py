"""Class-conditional training: labels from the data (label dropout at its rate: test_randomness.py), the class
names in the checkpoint, conditioning that survives a resume, one sampling network per run, `ms-ddpm evaluate`
with class accuracy.

The runs are PyNative (8 steps of a 12k-parameter U-Net on 8x8 digits take seconds op by op; graph-mode conditional
training runs in tutorials/07_conditional_guidance.ipynb)."""
import json
from unittest import mock

import mindspore as ms
import numpy as np
import pytest
import yaml
from PIL import Image

from ms_ddpm.checkpoint import load_checkpoint
from ms_ddpm.cli import main as cli_main
from ms_ddpm.config import Config
from ms_ddpm.metrics.features import MNISTClassifier, save_feature_extractor
from ms_ddpm.models import create_model
from ms_ddpm.train.trainer import Trainer
from tests.helpers import MNIST5K
from tests.test_ncsn_training import assert_resumed_like_uninterrupted, read_losses

DIGITS = [str(d) for d in range(10)]


def cond_config(output_dir, **train):
    """8x8 MNIST digits with their labels, a 10-class U-Net (dim 4), label dropout 0.3, PyNative."""
    if not MNIST5K.is_dir():
        pytest.skip(f"the mnist5k data set is not at {MNIST5K}")
    t = {"output_dir": str(output_dir), "batch_size": 8, "steps": 8, "warmup_steps": 2, "lr": 3e-3, "log_every": 1,
         "sample_every": 4, "save_every": 4, "ema_decay": 0.9, "seed": 7, "mode": "pynative", "sample_steps": 2,
         "num_samples": 10}
    t.update(train)
    return Config.from_dict({
        "model": {"name": "unet", "kwargs": {"dim": 4, "dim_mults": [1, 2], "channels": 1, "heads": 1, "dim_head": 4,
                                             "num_classes": 10}},
        "diffusion": {"num_timesteps": 50, "cond_drop_prob": 0.3},
        "data": {"name": "mnist", "root": str(MNIST5K), "image_size": 8},
        "train": t,
    })


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """8 uninterrupted steps with grids at steps 4 and 8, counting the networks the trainer builds."""
    out = tmp_path_factory.mktemp("cond_full")
    with mock.patch("ms_ddpm.train.trainer.create_model", wraps=create_model) as builds:
        trainer = Trainer(cond_config(out))
        trainer.train()
    return trainer, out, builds.call_count


def test_class_names_go_into_the_config_and_checkpoint(full_run):
    trainer, out, _ = full_run
    assert trainer.cfg.data.class_names == DIGITS and trainer.null_label == 10
    saved = Config.from_dict(yaml.safe_load(load_checkpoint(out / "ckpt_00000008.ckpt")["config"]))
    assert saved.data.class_names == DIGITS and saved.diffusion.cond_drop_prob == 0.3
    assert all(np.isfinite(read_losses(out)))


def test_one_sampling_network_per_run(full_run):
    """Two grids, and besides the training network one sampling network, built at the first grid (issue: a new
    network, and in graph mode a new compile, per grid)."""
    trainer, out, builds = full_run
    assert builds == 2
    assert (out / "samples_00000004.png").is_file() and (out / "samples_00000008.png").is_file()
    for ema, p in zip(trainer.ema.ema_weights, trainer.grid_pipeline.network.trainable_params()):
        np.testing.assert_array_equal(p.asnumpy(), ema.asnumpy())  # the last grid used the EMA weights


def test_conditioning_survives_resume(full_run, tmp_path):
    """4 steps + resume + 4 steps == 8 uninterrupted steps (the resumed run starts from the full run's step-4
    checkpoint): labels, dropped labels, t and noise all come from the data order and the (seed, step)
    generator, the weights, optimizer and EMA state from the checkpoint."""
    full, out, _ = full_run
    (tmp_path / "ckpt_00000004.ckpt").write_bytes((out / "ckpt_00000004.ckpt").read_bytes())
    resumed = Trainer(cond_config(tmp_path, sample_every=0))
    assert resumed.resume().name == "ckpt_00000004.ckpt" and resumed.step == 4
    resumed.train()
    assert_resumed_like_uninterrupted(full, out, resumed, tmp_path, 4)


def test_evaluate_reports_class_accuracy(full_run, tmp_path, capsys):
    _, out, _ = full_run
    ms.set_seed(0)
    classifier = save_feature_extractor(MNISTClassifier(widths=(4, 8, 8), feature_dim=16, groups=4),
                                        tmp_path / "classifier.ckpt")
    code = cli_main(["evaluate", "--ckpt", str(out / "ckpt_00000008.ckpt"), "--steps", "2", "--num", "10",
                     "--batch-size", "10", "--guidance-scale", "2", "--features", str(classifier), "--mode",
                     "pynative", "--json", str(tmp_path / "eval.json")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads((tmp_path / "eval.json").read_text())
    assert 0 <= result["class_accuracy"] <= 1 and result["guidance_scale"] == 2.0
    assert result["network_evaluations_per_sample"] == 4  # 2 steps, each on the doubled batch
    assert "class accuracy:" in captured.out


def test_a_folder_with_one_class_is_refused(tmp_path, capsys):
    folder = tmp_path / "images" / "cat"
    folder.mkdir(parents=True)
    for i in range(4):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(folder / f"{i}.png")
    cfg = cond_config(tmp_path / "run")
    cfg.data.name, cfg.data.root, cfg.data.channels = "folder", str(tmp_path / "images"), 1
    config_file = tmp_path / "one_class.yaml"
    config_file.write_text(cfg.to_yaml())
    code = cli_main(["train", "--config", str(config_file)])
    err = capsys.readouterr().err
    assert code == 2 and "needs a data set with at least 2 classes" in err and "['cat']" in err, err
    assert err.strip().count("\n") == 0
