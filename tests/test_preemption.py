"""Preemption: SIGTERM or SIGINT during a real `ms-ddpm train` writes a checkpoint of the step reached, prints the
resume command and exits with 128 + the signal number; resuming continues exactly as an uninterrupted run."""
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ms_ddpm.checkpoint import list_checkpoints, load_checkpoint
from ms_ddpm.train.trainer import Trainer
from tests.test_trainer import read_log, tiny_config

STEPS = 16  # more than the signals let the pieces reach (each stops within 2 steps of the step it was sent at)


def ms_ddpm(*argv):
    """`ms-ddpm ARGV` as a subprocess (the module form of the console script, with this interpreter)."""
    return subprocess.Popen([sys.executable, "-m", "ms_ddpm.cli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def logged_steps(output_dir):
    path = Path(output_dir) / "train_log.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return max([int(line.split('"step": ')[1].split(",")[0]) for line in lines if line.endswith("}")], default=0)


def interrupt(proc, out, after, signum):
    """Send `signum` once `proc` has logged step `after`; returns (the step logged when it was sent, stderr).

    MindSpore's runtime (its SignalGuard around graph runs) turns a SIGINT into a SIGTERM before Python sees it,
    so a SIGINT may end the run as a SIGTERM does (status 143)."""
    deadline = time.time() + 300
    while logged_steps(out) < after and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    seen = logged_steps(out)
    sent = time.time()
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode in (128 + signum, 128 + signal.SIGTERM), err[-3000:]
    assert time.time() - sent < 60 and "Traceback" not in err
    return seen, err


@pytest.mark.parametrize("signals", [[signal.SIGTERM],
                                     pytest.param([signal.SIGTERM, signal.SIGINT], marks=pytest.mark.slow)],
                         ids=["sigterm", "sigterm-then-sigint"])
def test_each_signal_leaves_a_checkpoint_and_resume_continues_exactly(tmp_path, signals):
    """Signal a run, resume it with the command it printed (and signal that one too), then finish it: the losses of
    the pieces and the final state (weights, EMA, optimizer moments, loss scale) equal one uninterrupted run's.
    (Each piece compiles the training graph again; SIGINT takes the same path as SIGTERM: the chain is marked slow.)"""
    out = tmp_path / "run"
    cfg = tiny_config(out, steps=STEPS, save_every=STEPS, lr_schedule="constant")
    config = tmp_path / "tiny.yaml"
    config.write_text(cfg.to_yaml())

    command, step = ["ms-ddpm", "train", "--config", str(config)], 0
    for signum in signals:
        seen, err = interrupt(ms_ddpm(*command[1:]), out, step + 2, signum)
        ckpt = list_checkpoints(out)[-1]  # save_every = steps: only the signals write checkpoints
        previous, step = step, load_checkpoint(ckpt)["step"]
        assert seen <= step <= seen + 2 < STEPS and step > previous  # the step running when it came, or the next
        if signum == signal.SIGTERM:
            assert f"stopped by SIGTERM after step {step}; checkpoint {ckpt}; resume with: " in err
        assert f"after step {step}; checkpoint {ckpt}; resume with: ms-ddpm train" in err
        command = shlex.split(err.split("resume with: ")[1].splitlines()[0])
        assert command == ["ms-ddpm", "train", "--config", str(config), "--resume"]
    assert len(list_checkpoints(out)) == len(signals)

    resumed = Trainer(cfg)
    assert resumed.resume() == ckpt
    resumed.train()
    reference = Trainer(tiny_config(tmp_path / "uninterrupted", steps=STEPS, save_every=0, lr_schedule="constant"))
    reference.train()
    losses = {r["step"]: r["loss"] for r in read_log(out)}  # later pieces repeat no step
    assert sorted(losses) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([losses[s] for s in sorted(losses)], [r["loss"] for r in read_log(reference.output_dir)],
                               rtol=1e-6)
    for a, b in zip(reference.state_parameters(), resumed.state_parameters()):
        np.testing.assert_allclose(b.asnumpy(), a.asnumpy(), rtol=1e-6, atol=1e-7, err_msg=a.name)
