"""Class-conditional training: labels from the data (label dropout at its rate: test_randomness.py), the class
names in the checkpoint, conditioning that survives a resume, one sampling network per run, `ms-ddpm evaluate`
with class accuracy; and in graph mode, as configs/unet_mnist5k_cond_cpu.yaml trains: the compiled step drops labels
to the null label at its rate, takes the PyNative steps, and a tiny model learns three classes of simple images.

The digit runs are PyNative (8 steps of a 12k-parameter U-Net on 8x8 digits take seconds op by op); one graph-mode
run of 200 steps serves the graph-mode tests (its compile dominates)."""
import functools
import json
from unittest import mock

import mindspore as ms
import numpy as np
import pytest
import yaml
from mindspore import nn, ops
from PIL import Image

from ms_ddpm.checkpoint import load_checkpoint
from ms_ddpm.cli import main as cli_main
from ms_ddpm.config import Config
from ms_ddpm.metrics.features import MNISTClassifier, save_feature_extractor
from ms_ddpm.models import create_model
from ms_ddpm.train.randomness import TrainingDraws
from ms_ddpm.train.trainer import Trainer
from tests.helpers import MNIST5K, assert_same_network
from tests.test_ncsn_training import assert_resumed_like_uninterrupted, read_losses

DIGITS = [str(d) for d in range(10)]


def cond_config(output_dir, **train):
    """8x8 MNIST digits with their labels, a 10-class U-Net (dim 4), label dropout 0.3, PyNative."""
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
    with mock.patch("ms_ddpm.pipeline.create_model", wraps=create_model) as builds:  # via create_network
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
    for ema, p in zip(trainer.ema.ema_weights, trainer.task.grid_pipeline.network.trainable_params()):
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


# --- graph mode, as configs/unet_mnist5k_cond_cpu.yaml trains -----------------------------------------------------
# Three classes of 8x8 images far apart from each other, in label order (the sorted folder names): a bright square in
# the centre, a bright left half, a bright top half, on a dark ground.
CLASS_REGIONS = {"centre": np.s_[2:6, 2:6], "left": np.s_[:, :4], "top": np.s_[:4, :]}
GRAPH_STEPS, GRAPH_BATCH = 200, 32


def class_templates():
    """(3, 8, 8) uint8: each class's image before noise."""
    templates = np.full((len(CLASS_REGIONS), 8, 8), 40, np.uint8)
    for template, region in zip(templates, CLASS_REGIONS.values()):
        template[region] = 210
    return templates


def write_classes(root, per_class=64):
    """A folder data set of the three classes: each image its class's template plus Gaussian noise (std 20)."""
    rng = np.random.default_rng(0)
    for name, template in zip(CLASS_REGIONS, class_templates()):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            noisy = np.clip(template + rng.normal(0, 20, template.shape), 0, 255).astype(np.uint8)
            Image.fromarray(noisy).save(root / name / f"{i}.png")
    return root


def classes_config(output_dir, data_root, mode):
    """The three classes, a 3-class U-Net (dim 4, 12k parameters), label dropout 0.2, GRAPH_STEPS steps."""
    return Config.from_dict({
        "model": {"name": "unet", "kwargs": {"dim": 4, "dim_mults": [1, 2], "channels": 1, "heads": 1, "dim_head": 4,
                                             "num_classes": 3}},
        "diffusion": {"num_timesteps": 100, "cond_drop_prob": 0.2},
        "data": {"name": "folder", "root": str(data_root), "image_size": 8, "channels": 1},
        "train": {"output_dir": str(output_dir), "batch_size": GRAPH_BATCH, "steps": GRAPH_STEPS, "warmup_steps": 10,
                  "lr": 1e-2, "log_every": 1, "sample_every": 0, "save_every": 0, "ema_decay": 0.95, "seed": 3,
                  "mode": mode},
    })


class RecordedDraws(nn.Cell):
    """The run's `TrainingDraws`, also writing the labels the step was given and the condition drawn from them into
    two parameters, inside the compiled step: those of the last `size` samples, oldest first (-1 until written)."""

    def __init__(self, *args, size, **kwargs):
        super().__init__()
        self.draws = TrainingDraws(*args, **kwargs)
        self.labels = ms.Parameter(ops.full((size,), -1, dtype=ms.int32), name="recorded.labels", requires_grad=False)
        self.cond = ms.Parameter(ops.full((size,), -1, dtype=ms.int32), name="recorded.cond", requires_grad=False)

    def construct(self, step, first, shape, labels=None):
        t, noise, cond = self.draws(step, first, shape, labels)
        b = shape[0]
        ops.assign(self.labels, ops.concat((self.labels[b:], labels.astype(ms.int32))))
        ops.assign(self.cond, ops.concat((self.cond[b:], cond)))
        return t, noise, cond


@pytest.fixture(scope="module")
def graph_classes_run(tmp_path_factory):
    """GRAPH_STEPS graph-mode steps on the three classes, every label and condition of the run recorded; the weights
    and EMA weights after step 3 kept (arrays in trainable-parameter order)."""
    root = tmp_path_factory.mktemp("classes")
    write_classes(root / "images")
    with mock.patch("ms_ddpm.train.trainer.TrainingDraws",
                    functools.partial(RecordedDraws, size=GRAPH_STEPS * GRAPH_BATCH)):
        trainer = Trainer(classes_config(root / "graph", root / "images", "graph"))
    trainer.train(until=3)
    after_3 = ([p.asnumpy().copy() for p in trainer.model.trainable_params()],
               [w.asnumpy().copy() for w in trainer.ema.ema_weights])
    trainer.train()
    return trainer, root, after_3


def test_graph_mode_step_drops_labels_to_the_null_label_at_its_rate(graph_classes_run):
    """In the compiled step each label is the data's or the null label (3), the null label for 20% of the 6,400
    samples within 4 standard errors (Ho & Salimans 2021, Algorithm 1)."""
    trainer, _, _ = graph_classes_run
    assert trainer.cfg.data.class_names == list(CLASS_REGIONS) and trainer.null_label == 3
    labels, cond = trainer.step_fn.draws.labels.asnumpy(), trainer.step_fn.draws.cond.asnumpy()
    assert np.isin(labels, [0, 1, 2]).all()  # every sample of every step recorded
    dropped = cond == trainer.null_label
    np.testing.assert_array_equal(cond[~dropped], labels[~dropped])
    assert abs(dropped.mean() - 0.2) < 4 * np.sqrt(0.2 * 0.8 / dropped.size), dropped.mean()
    for c in range(3):  # whichever the class
        assert 0.1 < dropped[labels == c].mean() < 0.3


def test_graph_mode_conditional_steps_equal_pynative(graph_classes_run):
    """Three PyNative steps of the same run log the graph-mode losses, and their weights and EMA weights give the
    network the outputs the graph-mode run's give it, for every class and the null label."""
    trainer, root, (graph_weights, graph_ema) = graph_classes_run
    pynative = Trainer(classes_config(root / "pynative", root / "images", "pynative"))
    pynative.train(until=3)
    np.testing.assert_allclose(read_losses(root / "pynative"), read_losses(root / "graph")[:3], rtol=1e-6)
    x = ms.Tensor(np.random.default_rng(1).standard_normal((4, 1, 8, 8)), ms.float32)
    t, labels = ms.Tensor([0, 30, 60, 99], ms.int32), ms.Tensor([0, 1, 2, 3], ms.int32)
    net = create_model("unet", **trainer.cfg.model.kwargs)
    assert_same_network(net, graph_weights, [p.asnumpy() for p in pynative.model.trainable_params()], x, t, labels)
    assert_same_network(net, graph_ema, [w.asnumpy() for w in pynative.ema.ema_weights], x, t, labels)


def test_tiny_conditional_model_learns_its_classes(graph_classes_run):
    """20 DDIM steps from the EMA weights, 20 samples per class (no guidance): each sample's nearest class template
    is its own class for 80% of them or more (chance: 1/3)."""
    trainer, _, _ = graph_classes_run
    samples, labels = trainer.task.sampling_pipeline()(60, sampler="ddim", steps=20, seed=0, batch_size=60,
                                                  progress=False)
    templates = class_templates().astype(np.float32) / 127.5 - 1
    nearest = np.square(samples[:, 0, None] - templates).sum(axis=(2, 3)).argmin(axis=1)
    accuracy = np.mean(nearest == labels)
    assert accuracy >= 0.8, (accuracy, nearest, labels)
