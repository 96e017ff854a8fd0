"""`ms-ddpm evaluate`: the feature-classifier checkpoint round trip, the CLI's numbers, the real-data floor and its
one-line errors, on a 2-step model of 8x8 mnist5k digits."""
import json
import math
import subprocess
import sys
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest

from ms_ddpm.cli import main as cli_main
from ms_ddpm.metrics.evaluate import class_accuracy, confident_share
from ms_ddpm.metrics.features import MNISTClassifier, load_feature_extractor, save_feature_extractor
from ms_ddpm.checkpoint import CheckpointError
from tests.helpers import MNIST5K
from tests.test_trainer import tiny_config

SMALL_CLASSIFIER = {"widths": (4, 8, 8), "feature_dim": 16, "groups": 4}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-step tiny model and an untrained small classifier (what matters here is the plumbing, not its weights)."""
    ms.set_context(mode=ms.PYNATIVE_MODE)
    root = tmp_path_factory.mktemp("evaluate")
    cfg = tiny_config(root / "run", steps=2, save_every=2, mode="pynative")
    config_file = root / "tiny.yaml"
    config_file.write_text(cfg.to_yaml())
    assert cli_main(["train", "--config", str(config_file)]) == 0
    ms.set_seed(0)
    classifier = save_feature_extractor(MNISTClassifier(**SMALL_CLASSIFIER), root / "classifier.ckpt",
                                        {"test_accuracy": "0.1"})
    return {"root": root, "ckpt": root / "run" / "ckpt_00000002.ckpt", "classifier": classifier}


def run_cli(capsys, *argv):
    code = cli_main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_feature_extractor_round_trip_and_refusals(run, tmp_path):
    net = load_feature_extractor(run["classifier"])
    assert net.config == {"channels": 1, "widths": [4, 8, 8], "feature_dim": 16, "num_classes": 10, "groups": 4}
    assert net.checkpoint_info["test_accuracy"] == "0.1"
    ms.set_seed(0)
    original = MNISTClassifier(**SMALL_CLASSIFIER)
    original.set_train(False)
    x = ms.Tensor(np.random.default_rng(0).uniform(-1, 1, (3, 1, 8, 8)).astype(np.float32))  # resized to 28x28
    np.testing.assert_array_equal(net.features(x).asnumpy(), original.features(x).asnumpy())
    assert net.features(x).shape == (3, 16) and net(x).shape == (3, 10)

    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(run["classifier"].read_bytes()[:500])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_feature_extractor(broken)
    with pytest.raises(CheckpointError, match="not a feature-extractor checkpoint"):
        load_feature_extractor(run["ckpt"])  # a diffusion checkpoint
    with pytest.raises(CheckpointError, match="does not exist"):
        load_feature_extractor(tmp_path / "missing.ckpt")


def test_evaluate_prints_finite_numbers_and_the_floor_is_below_the_model(run, capsys):
    out_json = run["root"] / "eval.json"
    code, out, err = run_cli(capsys, "evaluate", "--ckpt", run["ckpt"], "--sampler", "ddim", "--steps", 3,
                             "--num", 16, "--batch-size", 8, "--bpd-batches", 1, "--features", run["classifier"],
                             "--mode", "graph", "--json", out_json)  # the bound's 100 calls: 0.5 s each op by op
    assert code == 0, err
    lines = {line.split(":", 1)[0]: line for line in out.splitlines()}
    assert set(lines) == {"FD", "KID", "confident", "bits/dim", "samples/s", "machine", "command"}, out
    assert "--ckpt" in lines["command"] and "--bpd-batches 1" in lines["command"]
    result = json.loads(out_json.read_text())
    assert result["features"] == "mnist_classifier" and result["feature_dim"] == 16 and result["weights"] == "ema"
    assert result["num"] == 16 and result["num_real"] == 1000 and result["bpd_images"] == 8
    assert result["network_evaluations_per_sample"] == 3 and result["checkpoint_step"] == 2
    for key in ("fd", "bits_per_dim", "samples_per_s", "sampling_s", "warmup_s"):
        assert math.isfinite(result[key]) and result[key] > 0, key
    assert math.isfinite(result["kid"]) and 0 <= result["confident"] <= 1
    # the bound of an almost untrained model: far above a good model's ~1 bit/dim, below the 8 bits of raw storage
    # plus the prior term's slack
    assert 1.0 < result["bits_per_dim"] < 20.0

    code, out, err = run_cli(capsys, "evaluate", "--ckpt", run["ckpt"], "--num", 16, "--batch-size", 8,
                             "--features", run["classifier"], "--mode", "graph", "--real-floor",
                             "--json", out_json)
    assert code == 0, err
    floor = json.loads(out_json.read_text())
    assert floor["real_floor"] and "samples/s" not in out and "bits/dim" not in out
    assert 0 < floor["fd"] < result["fd"], (floor["fd"], result["fd"])
    assert floor["kid"] < result["kid"]


def test_confident_share_counts_softmax_maxima_above_the_threshold():
    """Known probabilities through the logits the classifier would return: 0.95 and 0.91 count, 0.89, 0.5 and a
    three-way tie do not."""
    probabilities = np.array([[0.95, 0.05, 0.0], [0.09, 0.91, 0.0], [0.89, 0.11, 0.0], [0.5, 0.25, 0.25],
                              [1 / 3, 1 / 3, 1 / 3]])
    logits = np.log(probabilities + 1e-12) + 7.0  # a shift changes no softmax

    def classifier(x):
        return ms.Tensor(logits[np.round(x.asnumpy()[:, 0, 0, 0]).astype(int)])

    images = np.arange(5, dtype=np.float32).reshape(5, 1, 1, 1)  # image i -> row i of the logits
    assert confident_share(images, classifier, batch_size=2) == pytest.approx(2 / 5)
    assert confident_share(images, classifier, batch_size=5, threshold=0.4) == pytest.approx(4 / 5)


def test_class_accuracy_counts_argmax_hits_over_every_batch():
    """A classifier whose predictions are known (image i -> row i of the logits): predicted 0, 2, 1, 1, 3, 0 against
    labels 0, 2, 2, 1, 0, 0 is 4 hits of 6, in batches of 4 and 2 as in one of 6."""
    logits = np.full((6, 4), -1.0)
    logits[np.arange(6), [0, 2, 1, 1, 3, 0]] = 2.0

    def classifier(x):
        return ms.Tensor(logits[np.round(x.asnumpy()[:, 0, 0, 0]).astype(int)])

    images = np.arange(6, dtype=np.float32).reshape(6, 1, 1, 1)
    labels = np.array([0, 2, 2, 1, 0, 0])
    for batch_size in (4, 6):
        assert class_accuracy(images, labels, classifier, batch_size) == pytest.approx(4 / 6)


def test_pixel_space_is_announced_and_both_modes_agree(run, capsys):
    fds = []
    for mode in ("pynative", "graph"):
        out_json = run["root"] / f"pixels_{mode}.json"
        code, out, err = run_cli(capsys, "evaluate", "--ckpt", run["ckpt"], "--steps", 1, "--num", 4,
                                 "--batch-size", 3, "--mode", mode, "--json", out_json)  # batches of 3 and 1
        assert code == 0, err
        assert "pixel-space FD, not comparable to FID" in err and "pixel-space FD, not comparable to FID" in out
        assert "raw pixels, 64-d" in out and "bits/dim" not in out
        fds.append(json.loads(out_json.read_text())["fd"])
    assert fds[0] == pytest.approx(fds[1], rel=1e-4)


def test_evaluate_reports_the_ode_bits_per_dim(run, capsys):
    """The ODE bits/dim through the CLI, at 2 noise levels (2 network calls with their vector-Jacobian products)."""
    out_json = run["root"] / "ode.json"
    code, out, err = run_cli(capsys, "evaluate", "--ckpt", run["ckpt"], "--steps", 1, "--num", 4, "--batch-size", 3,
                             "--bpd-ode-batches", 1, "--bpd-ode-steps", 2, "--mode", "pynative", "--json", out_json)
    assert code == 0, err
    lines = {line.split(":", 1)[0]: line for line in out.splitlines()}
    assert "bits/dim (ODE)" in lines and "bits/dim" not in lines, out
    assert "3 test images uniformly dequantised" in lines["bits/dim (ODE)"] and "--bpd-ode-steps 2" in lines["command"]
    result = json.loads(out_json.read_text())
    assert result["bpd_ode_images"] == 3 and result["bpd_ode_steps"] == 2 and result["bits_per_dim"] is None
    # an almost untrained network: far from a good model's ~1 bit/dim, but a finite density
    assert math.isfinite(result["bits_per_dim_ode"]) and 0.0 < result["bits_per_dim_ode"] < 50.0
    code, out, err = run_cli(capsys, "evaluate", "--ckpt", run["ckpt"], "--num", 2, "--real-floor",
                             "--bpd-ode-batches", 1)
    assert code == 2 and "drop --bpd-batches and --bpd-ode-batches" in err


@pytest.mark.parametrize("case", ["missing ckpt", "missing features", "unknown sampler", "ald", "num 1", "num 0",
                                  "num -5", "batch size 0", "missing data"])
def test_bad_inputs_end_with_one_line_and_status_2(run, capsys, case):
    args = {"--ckpt": run["ckpt"], "--num": 4, "--steps": 2, "--mode": "pynative"}
    expected = {"missing ckpt": "does not exist", "missing features": "does not exist",
                "unknown sampler": "use one of ['ddpm', 'ddim'", "ald": "'ald' does not sample a network of diffusion.process 'ddpm'",
                "num 1": "num must be an integer >= 2", "num 0": "num must be an integer >= 2, got 0",
                "num -5": "num must be an integer >= 2, got -5",
                "batch size 0": "batch_size must be an integer >= 1, got 0", "missing data": "not found"}[case]
    if case == "missing ckpt":
        args["--ckpt"] = run["root"] / "nope.ckpt"
    elif case == "missing features":
        args["--features"] = run["root"] / "no_classifier.ckpt"
    elif case == "unknown sampler":
        args["--sampler"] = "unipc"
    elif case == "ald":
        args["--sampler"] = "ald"
    elif case.startswith("num"):
        args["--num"] = int(case.split()[1])
    elif case == "batch size 0":
        args["--batch-size"] = 0
    else:
        args["--data-root"] = run["root"] / "no_data"
    code, out, err = run_cli(capsys, "evaluate", *[x for kv in args.items() for x in kv])
    assert code == 2
    assert err.startswith("ms-ddpm evaluate: error: ") and err.count("\n") == 1 and expected in err, err
    assert "Traceback" not in err and out == ""


@pytest.mark.slow
def test_train_classifier_script_writes_a_loadable_checkpoint(tmp_path):
    """The script end to end on 200 digits for one epoch (graph mode: compiling the step dominates)."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "train_classifier.py"
    out = tmp_path / "classifier.ckpt"
    proc = subprocess.run([sys.executable, str(script), "--data", str(MNIST5K), "--out", str(out), "--epochs", "1",
                           "--train-images", "200"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "test accuracy" in proc.stdout and "on 1000 test digits" in proc.stdout
    net = load_feature_extractor(out)
    assert net.feature_dim == 128 and 0 <= float(net.checkpoint_info["test_accuracy"]) <= 1
    assert float(net.feature_scale.asnumpy()) != 1.0  # calibrated
    proc = subprocess.run([sys.executable, str(script), "--data", str(tmp_path / "nowhere"), "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "train_classifier: error: MNIST train split unusable" in proc.stderr
