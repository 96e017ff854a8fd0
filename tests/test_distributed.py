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

    # The same 3 steps in one process: each step's global batch is rank 0's shard batch + rank 1's, and the step
    # draws for it the t and noise the ranks drew (a sample's draws depend on its place in the global batch).
    reference = Trainer(cfg)
    c, t = cfg.data, cfg.train
    shards = [create_dataset(c.name, c.root, "train", c.image_size, c.channels, t.batch_size, shuffle=True,
                             seed=t.seed, num_shards=2, shard_id=r).create_tuple_iterator(output_numpy=True)
              for r in (0, 1)]
    for _ in range(3):
        reference.step_fn(ms.Tensor(np.concatenate([next(shard)[0] for shard in shards])))
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


def stand_in_scripts(tmp_path, train_py):
    """The launchers in tmp_path/scripts beside a stand-in train.py that imports no MindSpore."""
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    for name in ("run_distributed.sh", "run_distributed_ascend.sh", "launch_common.sh"):
        (scripts / name).write_text((SCRIPT.parent / name).read_text())
    (scripts / "train.py").write_text(train_py)
    return scripts


def launcher_env(*path_first, **extra):
    """This environment with the venv's bin (and path_first) first on PATH, without the HCCL timeouts that
    `import mindspore` exports into this process (600 s when unset)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HCCL_")}
    env["PATH"] = os.pathsep.join([*map(str, path_first), str(Path(sys.executable).parent), os.environ["PATH"]])
    return dict(env, **extra)


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_launcher_passes_bind_core_and_hccl_timeouts(tmp_path):
    """msrun gets --bind_core=True; HCCL's timeouts have defaults a user's exported values replace."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "msrun").write_text('#!/usr/bin/env bash\necho "$@" "connect=$HCCL_CONNECT_TIMEOUT '
                                   'exec=$HCCL_EXEC_TIMEOUT" > "$MSRUN_RECORD"\n')
    (bin_dir / "msrun").chmod(0o755)
    _, config = write_config(tmp_path)
    record = tmp_path / "msrun_args"
    for env, expected in (({}, "connect=1200 exec=3600"), ({"HCCL_EXEC_TIMEOUT": "7208"}, "connect=1200 exec=7208")):
        result = subprocess.run(["bash", str(SCRIPT), "--worker_num", "2", "--master_port", str(free_port()),
                                 "--log_dir", str(tmp_path / "logs"), "--config", str(config)],
                                env=launcher_env(bin_dir, MSRUN_RECORD=str(record), **env),
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert "--bind_core=True" in record.read_text() and expected in record.read_text()
    result = subprocess.run(["bash", str(SCRIPT), "--config", str(config)], capture_output=True, text=True,
                            env=launcher_env(bin_dir, HCCL_CONNECT_TIMEOUT="2m"))
    assert result.returncode == 2 and "HCCL_CONNECT_TIMEOUT must be a number of seconds, got '2m'" in result.stderr


# msrun runs this as the scheduler and as each worker; FAKE_FAIL=config: both workers refuse the config as ms-ddpm
# does, FAKE_FAIL=crash: worker 1 dies while worker 0 trains on (until msrun stops it)
FAKE_MSRUN_TRAIN = """
import os, sys, time
if os.environ.get("MS_ROLE") == "MS_WORKER":
    rank = int(os.environ["RANK_ID"])
    print(f"rank {rank} of 2: pid {os.getpid()}", flush=True)
    if os.environ["FAKE_FAIL"] == "config":
        print("ms-ddpm train: error: train.warmup_steps (100) > train.steps (50): ...", file=sys.stderr)
        sys.exit(2)
    if rank == 1:
        time.sleep(1)
        sys.exit(3)
    time.sleep(60)
"""


# the crash's resume advice loads ms_ddpm (about 10 s here); the slow SIGKILL test below checks it on a real run too
@pytest.mark.parametrize("fail", ["config", pytest.param("crash", marks=pytest.mark.slow)])
def test_launcher_tells_a_config_error_from_a_crash(tmp_path, fail):
    """A config error: exit status 2 with ms-ddpm's line, no resume advice. A crash: the ranks that did not finish,
    and resume advice naming the checkpoint there is to resume from."""
    scripts = stand_in_scripts(tmp_path, FAKE_MSRUN_TRAIN)
    cfg, config = write_config(tmp_path)
    Path(cfg.train.output_dir).mkdir()
    (Path(cfg.train.output_dir) / "ckpt_00000004.ckpt").write_bytes(b"")  # the newest name is all the advice reads
    env = launcher_env(FAKE_FAIL=fail)
    result = subprocess.run(["bash", str(scripts / "run_distributed.sh"), "--worker_num", "2", "--master_port",
                             str(free_port()), "--log_dir", str(tmp_path / "logs"), "--config", str(config)],
                            env=env, capture_output=True, text=True, timeout=120)
    if fail == "config":
        assert result.returncode == 2, result.stderr
        assert "stopped on an error in the command or config" in result.stderr
        assert result.stderr.count("ms-ddpm train: error: train.warmup_steps (100) > train.steps (50)") == 1
        assert "resume" not in result.stderr and "did not finish" not in result.stderr
    else:
        assert result.returncode not in (0, 2), result.stderr
        assert "rank 1 did not finish" in result.stderr and "rank 0 did not finish" in result.stderr
        assert (f"to continue from {cfg.train.output_dir}/ckpt_00000004.ckpt, launch the same command with: "
                "-- --resume") in result.stderr
    assert "Traceback" not in result.stderr  # msrun's own went to msrun.log
    assert "Distributed job exited with exception" in (tmp_path / "logs" / "msrun.log").read_text()


# FAKE_FAIL=crash / config: device 1 fails (exit status 3, or 2 with ms-ddpm's error line) after 1 s while device 2
# would run for a minute; FAKE_FAIL=hang: every device runs for a minute
FAKE_ASCEND_TRAIN = """
import os, sys, time
device, fail = int(os.environ["DEVICE_ID"]), os.environ.get("FAKE_FAIL", "")
print("rank", os.environ["RANK_ID"], "device", device, "of", os.environ["RANK_SIZE"], os.environ["RANK_TABLE_FILE"],
      "pid", os.getpid(), "hccl", os.environ["HCCL_CONNECT_TIMEOUT"], os.environ["HCCL_EXEC_TIMEOUT"],
      " ".join(sys.argv[1:]), flush=True)
if device == 1 and fail in ("crash", "config"):
    time.sleep(1)
    if fail == "config":
        print("ms-ddpm train: error: unknown key(s) ['lr_max'] in section 'train'", file=sys.stderr)
    sys.exit(3 if fail == "crash" else 2)
time.sleep(60 if fail == "hang" or (fail and device == 2) else 0.5)
print("done", flush=True)
"""


def ascend_launch(tmp_path, fail, *extra, popen=False):
    scripts = stand_in_scripts(tmp_path, FAKE_ASCEND_TRAIN)
    (tmp_path / "rank_table.json").write_text("{}")
    _, config = write_config(tmp_path)
    cmd = ["bash", str(scripts / "run_distributed_ascend.sh"), "--rank_table", str(tmp_path / "rank_table.json"),
           "--config", str(config), "--device_num", "3", "--rank_start", "3", "--rank_size", "6", "--log_dir",
           str(tmp_path / "logs"), *extra]
    env = launcher_env(FAKE_FAIL=fail)
    if popen:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


def rank_log(tmp_path, rank):
    path = tmp_path / "logs" / f"rank_{rank}.log"
    return path.read_text() if path.exists() else ""


def rank_pid(tmp_path, rank):
    return int(re.search(r" pid (\d+)", rank_log(tmp_path, rank)).group(1))


def test_ascend_rank_table_launcher_plumbing(tmp_path):
    """The rank-table launcher on CPU, with a stand-in train.py: per-process DEVICE_ID / RANK_ID / RANK_SIZE /
    RANK_TABLE_FILE, the HCCL timeouts, arguments and logs."""
    result = ascend_launch(tmp_path, "", "--", "--resume")
    assert result.returncode == 0 and "all 3 ranks finished" in result.stdout, result.stderr
    log = rank_log(tmp_path, 4)
    assert "rank 4 device 1 of 6" in log and str(tmp_path / "rank_table.json") in log and "hccl 1200 3600" in log
    assert "--set train.device=Ascend --resume" in log and "done" in log


@pytest.mark.parametrize("fail", ["crash", "config"])
def test_ascend_launcher_stops_the_job_at_the_first_failure(tmp_path, fail):
    """Polling with kill -0 (no `wait -n -p`): the failing rank stops the others at once, none is left running; a
    crash says whether there is a checkpoint to resume from, a config error (status 2) gives ms-ddpm's line."""
    start = time.time()
    result = ascend_launch(tmp_path, fail)
    assert time.time() - start < 40  # rank 5 (a minute) was stopped, not waited for
    assert not alive(rank_pid(tmp_path, 5)) and "done" not in rank_log(tmp_path, 5)
    if fail == "crash":
        assert result.returncode == 1 and "rank 4 failed (exit status 3)" in result.stderr
        assert "stopped the other ranks" in result.stderr
        assert "no checkpoint in the run's train.output_dir to resume from" in result.stderr
    else:
        assert result.returncode == 2
        assert "ms-ddpm train: error: unknown key(s) ['lr_max'] in section 'train'" in result.stderr
        assert "resume" not in result.stderr


def test_interrupted_ascend_launcher_stops_its_ranks(tmp_path):
    """Background processes of a script ignore SIGINT, so Ctrl-C on the launcher must stop the ranks itself."""
    proc = ascend_launch(tmp_path, "hang", popen=True)
    deadline = time.time() + 30
    while not all(" pid " in rank_log(tmp_path, r) for r in (3, 4, 5)) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted; stopping the ranks" in stderr
    assert not any(alive(rank_pid(tmp_path, r)) for r in (3, 4, 5))


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
    assert f"to continue from {last}, launch the same command with: -- --resume" in stderr
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
