"""Data-parallel training through scripts/run_distributed.sh (msrun, two CPU workers on 127.0.0.1)."""
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest

from ms_ddpm.data import create_dataset
from ms_ddpm.checkpoint import load_checkpoint
from ms_ddpm.train.trainer import Trainer
from tests.test_trainer import tiny_config

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "run_distributed.sh"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp_path, config, *extra, port=None, workers=2, popen=False):
    """Run the launcher with the venv's bin first on PATH (msrun starts `python` from PATH)."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    cmd = ["bash", str(SCRIPT), "--worker_num", str(workers), "--local_worker_num", str(workers),
           "--master_addr", "127.0.0.1", "--master_port", str(port or free_port()), "--log_dir",
           str(tmp_path / "logs"), "--device", "CPU", "--cluster_time_out", "120", "--config", str(config), *extra]
    if popen:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def write_config(tmp_path, **train):
    cfg = tiny_config(tmp_path / "run", **train)
    path = tmp_path / "tiny.yaml"
    path.write_text(cfg.to_yaml())
    return cfg, path


def worker_log(tmp_path, rank):
    return (tmp_path / "logs" / f"worker_{rank}.log").read_text(errors="replace")


def test_two_workers_match_a_single_process_on_the_global_batch(tmp_path):
    cfg, config = write_config(tmp_path, steps=3, save_every=3, ema_decay=0.0)
    result = launch(tmp_path, config)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 0 log:" in result.stdout and "rank 1 log:" in result.stdout
    digests = [re.search(r"finished step 3, weights digest (\w+)", worker_log(tmp_path, r)).group(1) for r in (0, 1)]
    assert digests[0] == digests[1]  # both ranks hold bit-identical weights
    assert "global batch 8 = 4 per device x 2 devices" in worker_log(tmp_path, 0)

    # The same 3 steps in one process: each step's global batch is rank 0's shard batch + rank 1's, with the
    # timesteps and noise each rank draws (seeded by (seed, rank, step, micro-batch)).
    reference = Trainer(cfg)
    c, t = cfg.data, cfg.train
    shards = [create_dataset(c.name, c.root, "train", c.image_size, c.channels, t.batch_size, shuffle=True,
                             seed=t.seed, num_shards=2, shard_id=r).create_tuple_iterator(output_numpy=True)
              for r in (0, 1)]
    for step in range(3):
        images, ts, noise = [], [], []
        for r, shard in enumerate(shards):
            batch = next(shard)[0]
            rng = np.random.default_rng([t.seed, r, step, 0])
            images.append(batch)
            ts.append(rng.integers(0, cfg.diffusion.num_timesteps, batch.shape[0]).astype(np.int32))
            noise.append(rng.standard_normal(batch.shape, dtype=np.float32))
        reference.step_fn(*(ms.Tensor(np.concatenate(a)) for a in (images, ts, noise)))
    saved = load_checkpoint(tmp_path / "run" / "ckpt_00000003.ckpt")
    # atol 5e-6: the two ranks sum gradients in another order than one process, and Adam divides by sqrt(v), which
    # magnifies that rounding in weights whose gradients are near zero (seen: 1.1e-6 in 1 of 2304 after 3 steps)
    for p in reference.model.trainable_params():
        np.testing.assert_allclose(saved[p.name].asnumpy(), p.asnumpy(), rtol=1e-5, atol=5e-6, err_msg=p.name)


def test_launcher_refuses_bad_arguments(tmp_path):
    _, config = write_config(tmp_path)
    result = launch(tmp_path, config, workers=0)
    assert result.returncode == 2 and "--worker_num must be a positive integer, got '0'" in result.stderr
    result = subprocess.run(["bash", str(SCRIPT), "--worker_num", "2", "--local_worker_num", "4", "--config",
                             str(config)], capture_output=True, text=True)
    assert result.returncode == 2 and "--local_worker_num must be an integer from 1 to --worker_num (2)" in result.stderr
    result = subprocess.run(["bash", str(SCRIPT), "--config", str(tmp_path / "none.yaml")], capture_output=True,
                            text=True)
    assert result.returncode == 2 and "config file" in result.stderr and "does not exist" in result.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        result = launch(tmp_path, config, port=busy.getsockname()[1])
    assert result.returncode == 2 and "is busy" in result.stderr
    assert not (tmp_path / "logs").exists()  # nothing was launched


FAKE_TRAIN = """
import os, sys, time
device = int(os.environ["DEVICE_ID"])
print("rank", os.environ["RANK_ID"], "device", device, "of", os.environ["RANK_SIZE"], os.environ["RANK_TABLE_FILE"],
      " ".join(sys.argv[1:]), flush=True)
time.sleep(0.5 + 2 * device)
sys.exit(3 if device == 1 and "--fail" in sys.argv else 0)
"""


@pytest.mark.parametrize("fail", [False, True])
def test_ascend_rank_table_launcher_plumbing(tmp_path, fail):
    """The rank-table launcher on CPU, with a stand-in train.py: per-process DEVICE_ID / RANK_ID / RANK_SIZE /
    RANK_TABLE_FILE and logs, and a failing rank stopping the job at once."""
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "run_distributed_ascend.sh").write_text(SCRIPT.with_name("run_distributed_ascend.sh").read_text())
    (scripts / "train.py").write_text(FAKE_TRAIN)
    (tmp_path / "rank_table.json").write_text("{}")
    _, config = write_config(tmp_path)
    cmd = ["bash", str(scripts / "run_distributed_ascend.sh"), "--rank_table", str(tmp_path / "rank_table.json"),
           "--config", str(config), "--device_num", "3", "--rank_start", "3", "--rank_size", "6", "--log_dir",
           str(tmp_path / "logs"), "--", "--resume"] + (["--fail"] if fail else [])
    start = time.time()
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    log = (tmp_path / "logs" / "rank_4.log").read_text()
    assert "rank 4 device 1 of 6" in log and str(tmp_path / "rank_table.json") in log
    assert "--set train.device=Ascend --resume" in log
    if fail:
        assert result.returncode == 1 and "rank 4 failed (exit status 3)" in result.stderr
        assert time.time() - start < 4  # rank 5 (sleeping 4.5 s) was stopped, not waited for
    else:
        assert result.returncode == 0 and "all 3 ranks finished" in result.stdout


def test_ascend_launcher_refuses_bad_arguments(tmp_path):
    _, config = write_config(tmp_path)
    script = str(SCRIPT.with_name("run_distributed_ascend.sh"))
    result = subprocess.run(["bash", script, "--rank_table", str(tmp_path / "missing.json"), "--config", str(config)],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "rank table" in result.stderr and "does not exist" in result.stderr
    (tmp_path / "rt.json").write_text("{}")
    result = subprocess.run(["bash", script, "--rank_table", str(tmp_path / "rt.json"), "--config", str(config),
                             "--device_num", "4", "--rank_start", "2"], capture_output=True, text=True)
    assert result.returncode == 2 and "rank_start + device_num <= rank_size (4)" in result.stderr


@pytest.mark.slow
def test_killed_worker_fails_the_job_and_resume_continues(tmp_path):
    _, config = write_config(tmp_path, steps=400, save_every=5, log_every=5)
    proc = launch(tmp_path, config, popen=True)
    deadline = time.time() + 300
    while not list((tmp_path / "run").glob("ckpt_*.ckpt")) and time.time() < deadline:
        time.sleep(1)
    pid = int(re.search(r"rank 1 of 2: pid (\d+)", worker_log(tmp_path, 1)).group(1))
    os.kill(pid, signal.SIGKILL)
    killed_at = time.time()
    _, stderr = proc.communicate(timeout=180)
    assert proc.returncode != 0
    assert time.time() - killed_at < 120  # the job ends within a bounded time
    assert "rank 1 did not finish" in stderr
    last = sorted((tmp_path / "run").glob("ckpt_*.ckpt"))[-1]
    step = int(last.stem.split("_")[1])
    result = launch(tmp_path, config, "--", "--resume", "--set", f"train.steps={step + 5}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 1 of 2: pid" in worker_log(tmp_path, 1) and f"starting at step {step}" in worker_log(tmp_path, 1)


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    """A signal reaches one rank only: both stop after the same step (one all-reduce of the stop flags per step),
    rank 0 writes that step's checkpoint while rank 1 waits, and the job resumes from it."""
    _, config = write_config(tmp_path, steps=400, save_every=400, log_every=1, lr_schedule="constant")
    proc = launch(tmp_path, config, popen=True)
    log = tmp_path / "run" / "train_log.jsonl"
    deadline = time.time() + 600
    while (not log.is_file() or log.read_text().count('"loss"') < 3) and time.time() < deadline:
        time.sleep(0.1)
    pid = int(re.search(r"rank 1 of 2: pid (\d+)", worker_log(tmp_path, 1)).group(1))
    os.kill(pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=180)
    assert proc.returncode != 0
    (ckpt,) = sorted((tmp_path / "run").glob("ckpt_*.ckpt"))
    step = load_checkpoint(ckpt)["step"]
    assert f"stopped by SIGTERM after step {step}; checkpoint {ckpt}" in worker_log(tmp_path, 0)
    assert f"rank 1: stopped after step {step} with the other ranks" in worker_log(tmp_path, 1)
    assert "Traceback" not in worker_log(tmp_path, 0) + worker_log(tmp_path, 1)
    result = launch(tmp_path, config, "--", "--resume", "--set", f"train.steps={step + 2}")
    assert result.returncode == 0, result.stderr[-3000:]
    digests = [re.search(rf"finished step {step + 2}, weights digest (\w+)", worker_log(tmp_path, r)).group(1)
               for r in (0, 1)]
    assert digests[0] == digests[1] and f"starting at step {step}" in worker_log(tmp_path, 1)
