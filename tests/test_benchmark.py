"""Smoke test of scripts/benchmark.py: one run on a tiny U-Net writes a JSON with a positive img/s for every
measured row, and MindSpore / PyTorch ratios when torch is installed. Five subprocesses, each importing a framework
and compiling its graphs: a long run, marked slow. And, fast, the parent's checks of the config with --set."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"

TINY_CONFIG = """\
model:
  name: unet
  kwargs: {dim: 6, dim_mults: [1, 2], channels: 1, heads: 1, dim_head: 8, resnet_block_groups: 2}  # 27k parameters
diffusion: {num_timesteps: 1000, loss_type: huber}
data: {image_size: 8, channels: 1}
train: {batch_size: 4, steps: 20, warmup_steps: 2}
"""


def torch_installed():
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.slow
def test_benchmark_runs_on_a_tiny_config(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_CONFIG, encoding="utf-8")
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--config", str(config), "--repeats", "1", "--warmup", "1",
         "--steps-per-repeat", "1", "--ddpm-steps", "20", "--json", str(out)],
        capture_output=True, text=True, timeout=900, check=False,  # 164-300 s on 2 shared cores
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text(encoding="utf-8"))
    rows = {row["key"]: row for row in report["rows"]}
    has_torch = torch_installed()

    expected = {"ms_train_graph", "ms_train_pynative", "ms_sample_ddpm", "ms_sample_ddim"}
    if has_torch:
        expected |= {"torch_train", "torch_sample_ddim"}
    assert expected <= {k for k, row in rows.items() if "skipped" not in row}
    for key, row in rows.items():
        if "skipped" in row:
            assert key == "ms_sample_dpm_solver", f"{key} skipped: {row['skipped']}"
            continue
        assert row["img_per_s"] > 0 and row["peak_rss_mib"] > 0, key
        assert row.get("loss_finite", True), f"{key}: non-finite training loss"
    assert rows["ms_sample_ddpm"]["steps"] == 20 and rows["ms_sample_ddpm"]["extrapolated"]
    # DDPM and DDIM run network + update as one graph per step; the overhead beyond the network call is reported
    assert rows["ms_sample_ddim"]["fused_step"] and rows["ms_sample_ddim"]["network_ms"] > 0
    assert "per-step overhead beyond the network call" in proc.stdout
    assert report["flops_per_image_forward"] > 0
    assert all(v > 0 for v in report["matmul_gflops_per_s"].values())
    if has_torch:
        for key in ("ms_train_graph", "ms_train_pynative", "ms_sample_ddim"):
            assert rows[key]["ratio_vs_pytorch"] > 0, key
        # the hook-based MindSpore count and torch's FlopCounterMode agree on the same network
        assert report["extra"]["flops_per_image_forward_torch"] == report["flops_per_image_forward"]
    assert "img/s" in proc.stdout and "command: python scripts/benchmark.py" in proc.stdout


@pytest.mark.parametrize("override, message", [
    # the config's own process is ddpm: the parent must read it with the override, as every phase does
    ("diffusion.process=ncsn", "benchmark: error: the sampling rows and the PyTorch yardstick are DDPM's"),
    ("train.steps=many", "benchmark: error: train.steps must be an integer, got 'many' (str)"),
])
def test_overrides_reach_the_parents_checks_before_any_phase(override, message, tmp_path):
    config = tmp_path / "tiny.yaml"
    # num_timesteps and loss_type are DDPM's only: an override of the process would be refused for them
    config.write_text(TINY_CONFIG.replace("{num_timesteps: 1000, loss_type: huber}", "{}"), encoding="utf-8")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--config", str(config), "--set", override],
                          capture_output=True, text=True, timeout=120, check=False)
    # refused before the first progress line: nothing measured, no phase started
    assert proc.returncode == 1 and message in proc.stderr and "[benchmark]" not in proc.stderr, proc.stderr
