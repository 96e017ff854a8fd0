"""The training system: overflow skipping, resume, atomic checkpoints, EMA, LR schedule, mixed precision, CLI errors."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
from mindspore import amp, nn, ops

from ms_ddpm.cli import main as cli_main
from ms_ddpm.config import Config, ConfigError
from ms_ddpm.processes import GaussianDiffusion
from ms_ddpm.losses import DiffusionLoss
from ms_ddpm.models import create_model, recompute_blocks
from ms_ddpm.models.unet import Unet
from ms_ddpm.pipeline import DiffusionPipeline
from ms_ddpm.schedules import get_beta_schedule
from ms_ddpm.checkpoint import CheckpointError, list_checkpoints, load_checkpoint, save_checkpoint
from ms_ddpm.train.ema import EMA
from ms_ddpm.train.lr_schedule import warmup_cosine_lr
from ms_ddpm.train.randomness import TrainingDraws
from ms_ddpm.train.step import TrainStep
from ms_ddpm.train.trainer import Trainer
from tests.helpers import MNIST5K

# one level (no downsampling): the trainer tests need a network, not a deep one, and each of them compiles a step
TINY_MODEL = {"dim": 8, "dim_mults": [1], "channels": 1, "heads": 1, "dim_head": 8}


def tiny_config(output_dir, **train):
    """A run small enough for CI: 8x8 MNIST digits, an 18k-parameter U-Net, batch 4."""
    t = {"output_dir": str(output_dir), "batch_size": 4, "steps": 8, "warmup_steps": 2, "lr": 1e-3, "log_every": 1,
         "sample_every": 0, "save_every": 4, "ema_decay": 0.9, "seed": 3}
    t.update(train)
    return Config.from_dict({
        "model": {"name": "unet", "kwargs": TINY_MODEL},
        "diffusion": {"num_timesteps": 100},
        "data": {"name": "mnist", "root": str(MNIST5K), "image_size": 8},
        "train": t,
    })


def read_log(output_dir):
    lines = (Path(output_dir) / "train_log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def weights(net):
    return {p.name: p.asnumpy().copy() for p in net.trainable_params()}


# --- the step ----------------------------------------------------------------------------------------------------
def test_overflowing_step_is_skipped_and_scale_halved():
    ms.set_seed(0)
    net = Unet(**TINY_MODEL)
    loss_fn = DiffusionLoss(net, GaussianDiffusion(get_beta_schedule("linear", 100)))
    optimizer = nn.Adam(net.trainable_params(), learning_rate=1e-3)
    step = TrainStep(loss_fn, optimizer, amp.DynamicLossScaler(1024.0, 2, 2), TrainingDraws(0, 100), jit=False)
    x = ms.Tensor(np.random.default_rng(0).uniform(-1, 1, (2, 1, 8, 8)).astype(np.float32))
    bad_x = ms.Tensor(np.full((2, 1, 8, 8), np.inf, np.float32))  # makes the loss and every gradient non-finite

    before = weights(net)
    _, finite, _ = step(bad_x)
    assert not bool(finite)
    for name, value in weights(net).items():
        np.testing.assert_array_equal(value, before[name], err_msg=name)
    assert float(step.loss_scaler.scale_value.asnumpy()) == 512.0
    assert int(optimizer.global_step.asnumpy()[0]) == 0  # no optimizer step was taken

    for _ in range(2):  # a window of 2 good steps doubles the scale again
        _, finite, _ = step(x)
        assert bool(finite)
    assert float(step.loss_scaler.scale_value.asnumpy()) == 1024.0
    assert any(not np.array_equal(v, before[k]) for k, v in weights(net).items())


class OneNanGradient(nn.Cell):
    """A finite loss, sqrt(|a|) + b * mean(x) at a = 0, whose gradient is NaN for a only (inf * sign(0))."""

    def __init__(self):
        super().__init__()
        self.a = ms.Parameter(ms.Tensor(0.0, ms.float32), name="a")
        self.b = ms.Parameter(ms.Tensor(1.0, ms.float32), name="b")

    def construct(self, x_start, t, noise, cond):
        return ops.sqrt(ops.abs(self.a)) + self.b * x_start.mean()


@pytest.mark.parametrize("jit", [False, True], ids=["pynative", "graph"])
def test_one_non_finite_gradient_with_a_finite_loss_skips_the_step_without_all_finite(jit, monkeypatch):
    """Off Ascend, with one micro-batch, the step reads finiteness off the gradient norm, not `all_finite`: a NaN in
    one gradient tensor of two, with a finite loss, still skips the update and lowers the scale."""
    import ms_ddpm.train.step as step_module

    def no_call(grads):
        raise AssertionError("all_finite called")

    monkeypatch.setattr(step_module.amp, "all_finite", no_call)
    ms.set_context(mode=ms.GRAPH_MODE if jit else ms.PYNATIVE_MODE)
    loss_fn = OneNanGradient()
    optimizer = nn.Adam(loss_fn.trainable_params(), learning_rate=1e-3)
    step = TrainStep(loss_fn, optimizer, amp.DynamicLossScaler(1024.0, 2, 2), TrainingDraws(0, 100), jit=jit)
    loss, finite, norm = step(ms.Tensor(np.ones((2, 1, 8, 8), np.float32)))
    assert np.isfinite(float(loss.asnumpy())) and not bool(finite) and np.isnan(float(norm.asnumpy()))
    assert float(loss_fn.b.asnumpy()) == 1.0 and float(step.loss_scaler.scale_value.asnumpy()) == 512.0


def accumulating_step(accumulation=2, reduce=None):
    """A PyNative TrainStep over a tiny U-Net with `accumulation` micro-batches, a dynamic scaler at 1024, and
    images for micro-batches of 2."""
    ms.set_seed(0)
    net = Unet(**TINY_MODEL)
    loss_fn = DiffusionLoss(net, GaussianDiffusion(get_beta_schedule("linear", 100)))
    step = TrainStep(loss_fn, nn.Adam(net.trainable_params(), learning_rate=1e-3), amp.DynamicLossScaler(1024.0, 2, 2),
                     TrainingDraws(0, 100), grad_accumulation=accumulation, reduce=reduce, jit=False)
    x = ms.Tensor(np.random.default_rng(0).uniform(-1, 1, (2, 1, 8, 8)).astype(np.float32))
    return net, step, x


def test_overflow_in_the_first_of_two_micro_batches_skips_the_update():
    net, step, x = accumulating_step()
    before = weights(net)
    _, finite, _ = step(ms.Tensor(np.full((2, 1, 8, 8), np.inf, np.float32)), update=False)
    assert not bool(finite)
    _, finite, _ = step(x, update=True)
    assert not bool(finite)
    assert all(np.array_equal(v, before[k]) for k, v in weights(net).items())
    assert float(step.loss_scaler.scale_value.asnumpy()) == 512.0
    _, finite, _ = step(x, update=False)  # the flag was reset: the next update goes through
    _, finite, _ = step(x, update=True)
    assert bool(finite) and any(not np.array_equal(v, before[k]) for k, v in weights(net).items())


def test_an_overflow_flag_read_and_cleared_by_the_first_check_still_skips_the_update(monkeypatch):
    """On 910A (and 910B in saturation mode) all_finite reads and clears the device's overflow flag: the check of
    micro-batch 1 sees the overflow, later checks do not. A stand-in with that behaviour on finite values."""
    import ms_ddpm.train.step as step_module

    net, step, x = accumulating_step()
    step.overflow_flag = True  # as on Ascend (elsewhere the step checks values, through the gradient norm)
    calls = []

    def read_and_clear_flag(grads):
        calls.append(len(calls))
        return ms.Tensor(len(calls) > 1)  # overflow on the first call only, then the flag is clear

    monkeypatch.setattr(step_module.amp, "all_finite", read_and_clear_flag)
    before = weights(net)
    step(x, update=False)
    _, finite, _ = step(x, update=True)
    assert len(calls) >= 2 and not bool(finite)
    assert all(np.array_equal(v, before[k]) for k, v in weights(net).items())


class CountingReduce(nn.Cell):
    """A stand-in DataParallelReduce on one device that counts its calls."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def construct(self, grads, finite):
        self.calls += 1
        return grads, finite


def test_gradients_are_reduced_once_per_update_with_accumulation():
    reduce = CountingReduce()
    _, step, x = accumulating_step(accumulation=3, reduce=reduce)
    for update in range(2):
        for micro in range(3):
            step(x, update=micro == 2)
    assert reduce.calls == 2


def test_ema_matches_its_formula():
    net = nn.Dense(3, 2)
    ema = EMA(net, decay=0.9, warmup=True)
    theta = [p.asnumpy().astype(np.float64) for p in net.trainable_params()]
    expected = [w.copy() for w in theta]
    rng = np.random.default_rng(0)
    for n in range(5):
        for p in net.trainable_params():
            p.set_data(ms.Tensor(rng.standard_normal(p.shape).astype(np.float32)))
        d = min(0.9, (1 + n) / (10 + n))
        got_d = float(ema(tuple(net.trainable_params())).asnumpy())
        assert got_d == pytest.approx(d, rel=1e-6)
        expected = [d * e + (1 - d) * p.asnumpy() for e, p in zip(expected, net.trainable_params())]
    for e, w in zip(expected, ema.ema_weights):
        np.testing.assert_allclose(w.asnumpy(), e, rtol=1e-5, atol=1e-6)
    target = nn.Dense(3, 2)
    ema.copy_to(target)
    np.testing.assert_allclose(target.weight.asnumpy(), expected[0], rtol=1e-5, atol=1e-6)


class TinyEps(nn.Cell):
    """A 3x3 convolution whose output grows with t: a 10-parameter noise predictor that compiles in a second."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, pad_mode="same", has_bias=True)

    def construct(self, x, t):
        return self.conv(x) * (1 + t.astype(ms.float32) / 100).reshape(-1, 1, 1, 1)


def test_ema_in_the_compiled_step_follows_the_update_it_replaced():
    """Graph mode, EMA after every 2nd step, step 4 overflowing: the EMA the compiled step folds in equals the
    formula applied to the weights after each taken update, on the steps the separate update ran on (finite and
    step % ema_every == 0)."""
    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_seed(0)
    net = TinyEps()
    loss_fn = DiffusionLoss(net, GaussianDiffusion(get_beta_schedule("linear", 100)))
    ema = EMA(net, decay=0.8, warmup=True)
    optimizer = nn.Adam(net.trainable_params(), learning_rate=1e-2)
    step = TrainStep(loss_fn, optimizer, amp.DynamicLossScaler(1024.0, 2, 100), TrainingDraws(0, 100), ema=ema,
                     ema_every=2)
    x = ms.Tensor(np.random.default_rng(0).uniform(-1, 1, (4, 1, 8, 8)).astype(np.float32))
    bad_x = ms.Tensor(np.full((4, 1, 8, 8), np.inf, np.float32))
    expected = [p.asnumpy().astype(np.float64) for p in net.trainable_params()]
    n = 0
    for s in range(1, 9):  # s: the steps taken with this one
        _, finite, _ = step(bad_x if s == 4 else x)
        assert bool(finite) == (s != 4)
        if s != 4 and s % 2 == 0:
            d = min(0.8, (1 + n) / (10 + n))
            expected = [d * e + (1 - d) * p.asnumpy() for e, p in zip(expected, net.trainable_params())]
            n += 1
    assert int(ema.num_updates.asnumpy()) == n == 3
    for e, w in zip(expected, ema.ema_weights):
        np.testing.assert_allclose(w.asnumpy(), e, rtol=1e-5, atol=1e-6)


def test_compiled_step_equals_the_step_run_op_by_op():
    """Graph mode == PyNative for the whole step (draws, 2 micro-batches, clipping, scaler, EMA, counters), one
    update overflowing: every state the step writes agrees after 4 updates. (Graph mode warns that "some side effect
    nodes were eliminated": the node is an unused output of the gradient call; nothing the step writes is lost.)"""
    x = ms.Tensor(np.random.default_rng(0).uniform(-1, 1, (2, 1, 8, 8)).astype(np.float32))
    bad_x = ms.Tensor(np.full((2, 1, 8, 8), np.inf, np.float32))
    results = {}
    for jit in (False, True):
        ms.set_context(mode=ms.GRAPH_MODE if jit else ms.PYNATIVE_MODE)
        ms.set_seed(0)
        net = TinyEps()
        loss_fn = DiffusionLoss(net, GaussianDiffusion(get_beta_schedule("linear", 100)))
        step = TrainStep(loss_fn, nn.Adam(net.trainable_params(), learning_rate=1e-2),
                         amp.DynamicLossScaler(1024.0, 2, 2), TrainingDraws(0, 100), grad_clip=0.5,
                         grad_accumulation=2, ema=EMA(net, decay=0.8), jit=jit)
        losses = []
        for s in range(4):
            for micro in range(2):
                loss, _, _ = step(bad_x if (s, micro) == (2, 0) else x, update=micro == 1)
                losses.append(float(loss.asnumpy()))
        state = [p.asnumpy() for p in net.trainable_params() + step.state_parameters() + list(step.ema.ema_weights)]
        counters = [int(c.asnumpy()) for c in (step.ema.num_updates, step.micro_batches, step.nonfinite_steps)]
        results[jit] = losses, state, counters
    (losses, state, counters), (losses_g, state_g, counters_g) = results[False], results[True]
    np.testing.assert_allclose(losses_g, losses, rtol=1e-6)
    assert counters_g == counters == [3, 8, 0]
    for a, b in zip(state, state_g):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)


def test_warmup_cosine_matches_its_formula():
    lr = warmup_cosine_lr(1e-3, total_steps=110, warmup_steps=10, min_lr=1e-5)
    s = np.arange(110)
    expected = np.where(s < 10, 1e-3 * (s + 1) / 10,
                        1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + np.cos(np.pi * (s - 10) / 100)))
    np.testing.assert_allclose(lr, expected, rtol=1e-6)
    assert lr[9] == pytest.approx(1e-3, rel=1e-6) and lr[-1] == pytest.approx(1e-5, rel=3e-2)
    np.testing.assert_allclose(warmup_cosine_lr(2e-4, 20, 5, schedule="constant")[5:], 2e-4)
    with pytest.raises(ValueError, match=r"lr_schedule must be one of \['cosine', 'constant'\]"):
        warmup_cosine_lr(1e-3, 10, schedule="step")


TINY_DDPM_UNET = {"in_channels": 1, "ch": 8, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [4],
                  "image_size": 8, "num_groups": 4, "dropout": 0.0}


def recompute_marks(network):
    """For each of the network's RECOMPUTE_UNITS blocks, whether `Cell.recompute()` marked it. MindSpore 2.8 has no
    public getter: it prefixes the cell's scope with "recompute_" (what graph mode's compiler reads) and wraps its
    construct for PyNative (`_recompute_cell`)."""
    return [bool(cell._scope and cell._scope.startswith("recompute_")) and cell._recompute_cell is not None
            for _, cell in network.cells_and_names() if isinstance(cell, network.RECOMPUTE_UNITS)]


@pytest.mark.parametrize("name,kwargs", [("unet", TINY_MODEL),
                                         pytest.param("ddpm_unet", TINY_DDPM_UNET, marks=pytest.mark.slow)])
def test_recompute_leaves_losses_and_gradients_unchanged(name, kwargs):
    """Graph mode: the loss and every gradient of three batches are the same (1e-6) with the blocks recomputed
    (train.recompute) as without, and the blocks are marked for recomputation (otherwise the comparison would be of
    two identical runs)."""
    ms.set_context(mode=ms.GRAPH_MODE)
    rng = np.random.default_rng(0)
    batches = [(ms.Tensor(rng.uniform(-1, 1, (2, 1, 8, 8)).astype(np.float32)),
                ms.Tensor(rng.integers(0, 100, 2).astype(np.int32)),
                ms.Tensor(rng.standard_normal((2, 1, 8, 8)).astype(np.float32))) for _ in range(3)]
    results = {}
    for recompute in (False, True):
        ms.set_seed(0)
        net = create_model(name, **kwargs)
        if recompute:
            assert recompute_blocks(net) == sum(isinstance(c, net.RECOMPUTE_UNITS) for _, c in net.cells_and_names())
        marks = recompute_marks(net)
        assert marks and all(m == recompute for m in marks), marks
        loss_fn = DiffusionLoss(net, GaussianDiffusion(get_beta_schedule("linear", 100)))
        grad_fn = ms.value_and_grad(loss_fn, None, net.trainable_params())

        @ms.jit
        def loss_and_grads(x, t, noise):
            return grad_fn(x, t, noise, None)

        results[recompute] = [(float(loss.asnumpy()), [g.asnumpy() for g in grads])
                              for loss, grads in (loss_and_grads(*b) for b in batches)]
    for (loss, grads), (loss_r, grads_r) in zip(results[False], results[True]):
        assert loss_r == pytest.approx(loss, rel=1e-6)
        for g, g_r in zip(grads, grads_r):
            np.testing.assert_allclose(g_r, g, rtol=1e-6, atol=1e-7)


def test_train_recompute_marks_every_block_of_the_trained_network(tmp_path):
    """train.recompute reaches the network the trainer trains: every block marked with it, none without."""
    for recompute in (False, True):
        trainer = Trainer(tiny_config(tmp_path / str(recompute), recompute=recompute))
        marks = recompute_marks(trainer.model)
        assert marks and all(m == recompute for m in marks), (recompute, marks)


# --- whole runs -------------------------------------------------------------------------------------------------
def test_no_host_read_back_between_logging_steps(tmp_path, monkeypatch):
    """Graph mode, 6 steps logged every 3rd: after the first step (compilation), every read of a tensor's value
    (asnumpy, float(), int(), bool(), item(), tolist()) happens at step 3 or 6, none at steps 2, 4 and 5; each step
    waits for its own dispatch (wait_pipeline, which reads nothing), so no queue of steps builds up."""
    ms.set_context(mode=ms.GRAPH_MODE)
    trainer = Trainer(tiny_config(tmp_path, steps=6, log_every=3, save_every=0))
    trainer.train(until=1)
    reads, waits = [], []
    original_wait = ms.Tensor.wait_pipeline

    def counted_wait(self):
        waits.append(trainer.step)
        return original_wait(self)

    monkeypatch.setattr(ms.Tensor, "wait_pipeline", counted_wait)
    for name in ("asnumpy", "_item", "tolist"):
        original = getattr(ms.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            reads.append(trainer.step)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(ms.Tensor, name, counted)
    trainer.train()
    assert trainer.step == 6 and reads and set(reads) <= {3, 6}, reads
    assert waits == [1, 2, 3, 4, 5], waits  # trainer.step counts the step after its call returns
    assert [r["step"] for r in read_log(tmp_path)] == [3, 6]


@pytest.mark.parametrize("level", ["O1", pytest.param("O2", marks=pytest.mark.slow)])
def test_float16_training_on_cpu_has_finite_falling_loss(tmp_path, level):
    """O1 (MindSpore's white list: convolutions and dense layers in float16) and O2 (all but norms in float16):
    the network trains, keeps the parameter names checkpoints are read by, and keeps its GroupNorms in float32.
    (A float16 training graph compiles for about a minute: O1 runs by default, O2 with -m slow.)"""
    trainer = Trainer(tiny_config(tmp_path, steps=30, amp_level=level, amp_dtype="float16", lr=3e-3, save_every=0))
    trainer.train()
    losses = [r["loss"] for r in read_log(tmp_path)]
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses
    assert [p.name for p in trainer.model.get_parameters()] == [p.name for p in Unet(**TINY_MODEL).get_parameters()]
    norms = [cell for _, cell in trainer.model.cells_and_names() if isinstance(cell, nn.GroupNorm)]
    assert norms and all(cell.get_flags().get("fp32") for cell in norms)
    convs = [cell for _, cell in trainer.model.cells_and_names() if isinstance(cell, nn.Conv2d)]
    assert convs and all(cell.get_flags().get("fp16") for cell in convs)


def test_gradient_accumulation_averages_micro_batches():
    """Two micro-batches of 2 give the update of one batch of 4 of the same images: the same t and noise too,
    since a sample's draws depend on its place in the step's global batch, not on how the batch is split."""
    x = np.random.default_rng(0).uniform(-1, 1, (4, 1, 8, 8)).astype(np.float32)
    results = []
    for accumulation in (1, 2):
        ms.set_seed(0)
        net = Unet(**TINY_MODEL)
        loss_fn = DiffusionLoss(net, GaussianDiffusion(get_beta_schedule("linear", 100)))
        step = TrainStep(loss_fn, nn.SGD(net.trainable_params(), learning_rate=0.1), amp.StaticLossScaler(1.0),
                         TrainingDraws(3, 100), grad_clip=0, grad_accumulation=accumulation, jit=False)
        size = 4 // accumulation
        for k in range(accumulation):
            step(ms.Tensor(x[k * size:(k + 1) * size]), update=k == accumulation - 1)
        results.append(weights(net))
    for name, value in results[0].items():
        np.testing.assert_allclose(results[1][name], value, rtol=1e-5, atol=1e-6, err_msg=name)


# --- checkpoints ------------------------------------------------------------------------------------------------
KILLER = """
import sys
import mindspore as ms, numpy as np
from ms_ddpm.checkpoint import save_checkpoint
params = [ms.Parameter(ms.Tensor(np.full((512, 512), i, np.float32)), name=f"w{i}") for i in range(24)]
step = 0
while True:
    step += 1
    save_checkpoint(sys.argv[1], step, params, "model: {}", keep=2)
    print(step, flush=True)
"""


def test_sigkill_during_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", KILLER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(3):  # wait until a few checkpoints exist, so the kill lands in a later save
            proc.stdout.readline()
        time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    newest = list_checkpoints(tmp_path)[-1]
    state = load_checkpoint(newest)
    assert state["step"] >= 3 and state["config"] == "model: {}"
    np.testing.assert_array_equal(state["w7"].asnumpy(), 7.0)


def test_corrupt_and_foreign_checkpoints_are_refused(tmp_path):
    p = [ms.Parameter(ms.Tensor(np.ones(1000, np.float32)), name="w")]
    path = save_checkpoint(tmp_path, 1, p, "model: {}", keep=3)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(path)
    foreign = tmp_path / "foreign.ckpt"
    ms.save_checkpoint(p, str(foreign))
    with pytest.raises(CheckpointError, match="not written by ms_ddpm"):
        load_checkpoint(foreign)


# --- the command line: clear messages, exit status 2 --------------------------------------------------------------
def run_cli(capsys, *argv):
    code = cli_main(list(argv))
    return code, capsys.readouterr().err


def test_cli_train_then_sample_writes_grid_npz_and_gif(tmp_path, capsys):
    cfg = tiny_config(tmp_path / "run", steps=2, save_every=2)
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(cfg.to_yaml())
    code, err = run_cli(capsys, "train", "--config", str(config_file), "--set", "train.mode=pynative")
    assert code == 0, err
    assert (tmp_path / "run" / "config.yaml").is_file()
    ckpt = tmp_path / "run" / "ckpt_00000002.ckpt"
    code, err = run_cli(capsys, "sample", "--ckpt", str(ckpt), "--steps", "3", "--num", "5", "--batch-size", "4",
                        "--gif", "--mode", "pynative", "--out", str(tmp_path / "samples"))
    assert code == 0, err
    samples = np.load(tmp_path / "samples" / "samples.npz")["samples"]
    assert samples.shape == (5, 1, 8, 8) and np.isfinite(samples).all()
    assert (tmp_path / "samples" / "samples.png").stat().st_size > 0
    assert (tmp_path / "samples" / "denoising.gif").read_bytes()[:3] == b"GIF"


def test_cli_bad_inputs_end_with_a_message_and_status_2(tmp_path, capsys):
    cfg = tiny_config(tmp_path / "run", steps=2, save_every=2, mode="pynative")
    good = tmp_path / "good.yaml"
    good.write_text(cfg.to_yaml())

    code, err = run_cli(capsys, "train", "--config", str(good), "--set", "data.root=" + str(tmp_path / "nowhere"))
    assert code == 2 and "download=True" in err and "Traceback" not in err

    code, err = run_cli(capsys, "train", "--config", str(good), "--set", "train.learning_rate=1")
    assert code == 2 and "unknown key(s) ['learning_rate'] in section 'train'; valid keys: ['output_dir'" in err

    code, err = run_cli(capsys, "train", "--config", str(good), "--set", "train.amp_level=O2",
                        "train.amp_dtype=bfloat16")
    assert code == 2 and "bfloat16 mixed precision is for Ascend and GPU" in err

    code, err = run_cli(capsys, "train", "--config", str(good))
    assert code == 0, err
    code, err = run_cli(capsys, "train", "--config", str(good), "--set", "train.lr=0.5", "--resume")
    assert code == 2 and "cannot resume: the config differs" in err and "train.lr" in err

    ckpt = tmp_path / "run" / "ckpt_00000002.ckpt"
    # sampling arguments are refused before the checkpoint is read
    (tmp_path / "a_file").write_text("")
    for argv, expected in [(["--out", str(tmp_path / "a_file")], "is a file; name a folder"),
                           (["--num", "0"], "--num must be an integer >= 1, got 0"),
                           (["--num", "-3"], "--num must be an integer >= 1, got -3"),
                           (["--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
                           (["--grid", "0"], "--grid must be an integer >= 1, got 0")]:
        code, err = run_cli(capsys, "sample", "--ckpt", str(ckpt), "--mode", "pynative", *argv)
        assert code == 2 and expected in err and err.count("\n") == 1, err

    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    code, err = run_cli(capsys, "sample", "--ckpt", str(ckpt), "--mode", "pynative")
    assert code == 2 and "corrupt or truncated" in err
    code, err = run_cli(capsys, "train", "--config", str(good), "--resume")
    assert code == 2 and "corrupt or truncated" in err


def test_image_size_the_unet_cannot_halve_is_refused_before_compiling(tmp_path, capsys):
    """One line and status 2 from `ms-ddpm train` (graph mode: nothing is compiled, no C++ stack), for both
    U-Nets; the pipeline refuses the same config."""
    cfg = tiny_config(tmp_path / "run")
    cfg.model.kwargs = dict(TINY_MODEL, dim_mults=[1, 2])  # two levels: halved once
    config = tmp_path / "odd.yaml"
    config.write_text(cfg.to_yaml())
    code, err = run_cli(capsys, "train", "--config", str(config), "--set", "data.image_size=9")
    assert code == 2 and err.count("\n") == 1, err
    assert ("data.image_size=9: Unet: image size 9x9 cannot be halved 1 times; height and width must be multiples "
            "of 2") in err
    ddpm_unet = {"in_channels": 1, "ch": 8, "ch_mult": [1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [],
                 "image_size": 8, "num_groups": 4, "dropout": 0.0}
    code, err = run_cli(capsys, "train", "--config", str(config), "--set", "model.name=ddpm_unet",
                        f"model.kwargs={json.dumps(ddpm_unet)}", "data.image_size=10")
    assert code == 2 and err.count("\n") == 1, err
    assert "data.image_size=10: DDPMUNet: image size 10x10 cannot be halved 2 times; height and width must be" in err
    cfg.data.image_size = 7
    with pytest.raises(ConfigError, match="multiples of 2"):
        DiffusionPipeline(Unet(**cfg.model.kwargs), GaussianDiffusion(get_beta_schedule("linear", 100)), cfg)


def test_persistent_nan_loss_aborts_with_a_message(tmp_path, capsys):
    cfg = tiny_config(tmp_path / "run", steps=20, lr=1e30, warmup_steps=0, grad_clip=0, save_every=0,
                      max_nonfinite_steps=3, mode="pynative", loss_scaler="none")
    config_file = tmp_path / "nan.yaml"
    config_file.write_text(cfg.to_yaml())
    code, err = run_cli(capsys, "train", "--config", str(config_file))
    assert code == 2 and "non-finite for 3 steps in a row" in err


def test_config_errors_name_the_fix(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config section\(s\) \['modle'\]; valid sections"):
        Config.from_dict({"modle": {}})
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        Config.load(None, ["lr=3"])
    with pytest.raises(ConfigError, match="does not exist"):
        Config.load(tmp_path / "missing.yaml")
    cfg = Config.load(None, ["model.kwargs={dim: 4}", "train.steps=7", "train.warmup_steps=7"])
    assert cfg.model.kwargs == {"dim": 4} and cfg.train.steps == 7


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_configs_load_and_build(path):
    cfg = Config.load(path)
    from ms_ddpm.models import create_model
    from ms_ddpm.processes import create_process

    create_process(cfg.diffusion)
    if cfg.model.name == "unet":  # the paper network is built by its own tests
        assert sum(p.size for p in create_model(cfg.model.name, **cfg.model.kwargs).trainable_params()) > 0
