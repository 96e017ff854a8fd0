"""FD and KID while training (`train.eval_every`): the logged evaluations, the best checkpoint, metrics.png, and the
feature classifier trained once and reused; on 8x8 digits of a 200 + 64-digit cut of mnist5k, a tiny U-Net and a
classifier trained for 2 steps (what is tested is the plumbing, not the numbers' quality)."""
import json
import math
import shutil

import mindspore as ms
import numpy as np
import pytest
from matplotlib import image

from ms_ddpm.checkpoint import BEST_CHECKPOINT, list_checkpoints, load_checkpoint
from ms_ddpm.config import Config, ConfigError
from ms_ddpm.metrics import classifier_training
from ms_ddpm.metrics.features import load_feature_extractor
from ms_ddpm.pipeline import DiffusionPipeline
from ms_ddpm.train import evaluation
from ms_ddpm.train.evaluation import TrainingEvaluation, auto_feature_checkpoint, run_records
from ms_ddpm.train.trainer import Trainer
from ms_ddpm.visualize import save_training_curves
from tests.helpers import MNIST5K
from tests.test_data import idx_bytes, read_idx_images
from tests.test_trainer import tiny_config

EVAL = dict(steps=4, eval_every=3, eval_num=8, eval_batch_size=8, eval_steps=2, save_every=1, keep_checkpoints=4,
            mode="pynative")


def write_digits(folder, num_train=200, num_test=64):
    """The first digits of mnist5k, with their labels, as an IDX data set in `folder`."""
    folder.mkdir(parents=True)
    for prefix, n in (("train", num_train), ("t10k", num_test)):
        images = read_idx_images(MNIST5K / f"{prefix}-images-idx3-ubyte")[:n]
        labels = np.fromfile(MNIST5K / f"{prefix}-labels-idx1-ubyte", dtype=np.uint8)[8:8 + n]
        (folder / f"{prefix}-images-idx3-ubyte").write_bytes(idx_bytes(images=images))
        (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(idx_bytes(labels=labels))
    return folder


def eval_records(output_dir):
    return [r for r in run_records(output_dir / "train_log.jsonl") if r.get("event") == "eval"]


def checkpoint_arrays(path):
    state = load_checkpoint(path)
    return state["step"], {k: v.asnumpy() for k, v in state.items() if isinstance(v, ms.Parameter)}


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    """A run evaluated at steps 3 and 4 (eval_every 3, and the last step) with the classifier trained on first use into a cache folder of its own;
    counts how often the test split is read and the sampling pipeline built."""
    root = tmp_path_factory.mktemp("train_eval")
    data = write_digits(root / "digits")
    calls = {"real_images": 0, "pipelines": 0}
    real_images, pipeline = evaluation.real_images, DiffusionPipeline.__init__

    def counted_real_images(*args, **kwargs):
        calls["real_images"] += 1
        return real_images(*args, **kwargs)

    def counted_pipeline(self, *args):
        calls["pipelines"] += 1
        pipeline(self, *args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(root / "cache"))
        mp.setattr(classifier_training, "AUTO_TRAINING", {"epochs": 1, "train_images": 100, "seed": 0})
        mp.setattr(evaluation, "real_images", counted_real_images)
        mp.setattr(DiffusionPipeline, "__init__", counted_pipeline)
        cfg = tiny_config(root / "run", **EVAL)
        cfg.data.root = str(data)
        trainer = Trainer(cfg)
        trainer.train()
        yield {"root": root, "cfg": cfg, "calls": calls}


def test_fd_and_kid_are_logged_at_the_evaluation_steps(setting):
    records = eval_records(setting["root"] / "run")
    assert [r["step"] for r in records] == [3, 4]
    for r in records:
        assert math.isfinite(r["fd"]) and r["fd"] > 0 and math.isfinite(r["kid"]), r
        assert r["features"] == "mnist_classifier" and r["num"] == 8 and r["sampler"] == "ddim" and r["steps"] == 2
    # the test split's features once per run, and the grids' sampling network serves every evaluation
    assert setting["calls"] == {"real_images": 1, "pipelines": 1}


def test_the_best_checkpoint_is_the_step_of_the_lowest_logged_fd(setting):
    run = setting["root"] / "run"
    records = eval_records(run)
    best = min(records, key=lambda r: r["fd"])
    assert [r["best"] for r in records] == [r["fd"] == min(q["fd"] for q in records[:i + 1])
                                           for i, r in enumerate(records)]
    step, arrays = checkpoint_arrays(run / BEST_CHECKPOINT)
    assert step == best["step"]
    # a regular checkpoint's contents, and not one of the checkpoints that keep_checkpoints counts or --resume takes
    regular_step, regular = checkpoint_arrays(run / f"ckpt_{best['step']:08d}.ckpt")
    assert regular.keys() == arrays.keys()
    for name, value in regular.items():
        np.testing.assert_array_equal(arrays[name], value, err_msg=name)
    assert [p.name for p in list_checkpoints(run)] == [f"ckpt_{s:08d}.ckpt" for s in (1, 2, 3, 4)]
    samples, _ = DiffusionPipeline.from_checkpoint(run / BEST_CHECKPOINT, mode="pynative")(3, steps=2, progress=False)
    assert samples.shape == (3, 1, 8, 8) and np.isfinite(samples).all()


def test_a_lower_fd_replaces_the_best_checkpoint_and_a_resumed_run_remembers_it(setting, tmp_path, monkeypatch):
    """Scripted FDs 3, 1, 2 for the weights of steps 1, 2, 3 keep step 2; a new process resumed at step 4 with FD
    1.5 keeps it too (the best so far comes from the log)."""
    fds = iter([3.0, 1.0, 2.0, 1.5])
    monkeypatch.setattr(TrainingEvaluation, "measure", lambda self, pipeline: (next(fds), 0.0))
    cfg = Config.from_dict(setting["cfg"].to_dict())
    cfg.train.output_dir = str(tmp_path)
    trainer = Trainer(cfg)
    for step in (1, 2, 3):  # the fixture run's weights of each step, as if this run had reached it
        shutil.copy(setting["root"] / "run" / f"ckpt_{step:08d}.ckpt", tmp_path)
        assert trainer.resume().name == f"ckpt_{step:08d}.ckpt"
        trainer.evaluation(trainer)
    assert [r["best"] for r in eval_records(tmp_path)] == [True, True, False]
    step, best = checkpoint_arrays(tmp_path / BEST_CHECKPOINT)
    _, at_2 = checkpoint_arrays(tmp_path / "ckpt_00000002.ckpt")
    _, at_3 = checkpoint_arrays(tmp_path / "ckpt_00000003.ckpt")
    assert step == 2 and best.keys() == at_2.keys() and all(np.array_equal(best[k], at_2[k]) for k in best)
    assert not all(np.array_equal(best[k], at_3[k]) for k in best)

    shutil.copy(setting["root"] / "run" / "ckpt_00000004.ckpt", tmp_path)
    resumed = Trainer(cfg)
    assert resumed.resume().name == "ckpt_00000004.ckpt"
    resumed.evaluation(resumed)
    records = eval_records(tmp_path)
    assert [(r["step"], r["fd"], r["best"]) for r in records] == [(1, 3.0, True), (2, 1.0, True), (3, 2.0, False),
                                                                 (4, 1.5, False)]
    assert load_checkpoint(tmp_path / BEST_CHECKPOINT)["step"] == 2


def test_the_classifier_is_trained_once_and_reused(setting, tmp_path, capsys, monkeypatch):
    cache = setting["root"] / "cache" / "ms_ddpm" / "classifiers"
    (path,) = cache.iterdir()
    net = load_feature_extractor(path)
    assert net.kind == "mnist_classifier" and float(net.feature_scale.asnumpy()) != 1.0  # calibrated
    mtime = path.stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("the cached classifier was trained again")

    monkeypatch.setattr(classifier_training, "train_classifier", no_training)
    cfg = Config.from_dict(setting["cfg"].to_dict())
    cfg.train.output_dir = str(tmp_path)
    Trainer(cfg)
    assert "FD features: the classifier cached at" in capsys.readouterr().out
    assert path.stat().st_mtime_ns == mtime and list(cache.iterdir()) == [path]
    # other data files: another classifier (trained here, as the patch shows)
    cfg.data.root = str(write_digits(tmp_path / "fewer", num_train=150))
    with pytest.raises(AssertionError, match="trained again"):
        Trainer(cfg)


def test_metrics_png_plots_loss_lr_and_fd(setting, tmp_path):
    picture = image.imread(setting["root"] / "run" / "metrics.png")
    assert picture.shape[:2] == (320, 1200)  # three panels of 4 x 3.2 inches at 100 dpi
    records = [{"step": s, "loss": 1.0 / s, "lr": 1e-3} for s in range(1, 5)]
    save_training_curves(records, tmp_path / "curves.png")  # no evaluation logged: loss and lr only
    assert image.imread(tmp_path / "curves.png").shape[:2] == (320, 800)


def test_the_feature_space_and_bad_settings(setting):
    rgb = Config.from_dict({"data": {"name": "cifar10", "channels": 3, "root": "anywhere"}})
    assert auto_feature_checkpoint(rgb) is None  # raw pixels, announced as a pixel-space FD
    rgb.train.eval_features = "inception.ckpt"
    assert auto_feature_checkpoint(rgb) == "inception.ckpt"
    for key, value, message in [("eval_sampler", "ald", "'ald' does not sample a network of diffusion.process"),
                                ("eval_num", 1, "train.eval_num must be an integer >= 2"),
                                ("eval_every", -1, "train.eval_every must be an integer >= 0")]:
        cfg = Config.from_dict(setting["cfg"].to_dict())
        setattr(cfg.train, key, value)
        with pytest.raises(ConfigError, match=message):
            Trainer(cfg)


def test_run_records_start_again_at_a_fresh_start(tmp_path):
    log = tmp_path / "train_log.jsonl"
    lines = [{"event": "start", "step": 0}, {"step": 2, "loss": 1.0}, {"event": "eval", "step": 2, "fd": 1.0},
             {"event": "start", "step": 0}, {"step": 2, "loss": 3.0}, {"event": "eval", "step": 2, "fd": 5.0},
             {"step": 4, "loss": 2.0}, {"event": "start", "step": 2}, {"step": 4, "loss": 2.5}]
    log.write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert run_records(log) == [{"step": 2, "loss": 3.0}, {"event": "eval", "step": 2, "fd": 5.0},
                                {"step": 4, "loss": 2.5}]
