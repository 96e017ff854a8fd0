"""The tutorial notebooks run top to bottom with the small settings and are committed without outputs.

The notebooks run in order (01 .. 09) in their own folder, as a reader runs them: 03 trains the model whose
checkpoint 04 and 05 load (each trains it itself when run alone); 07 trains a class-conditional model of its own,
08 an autoencoder and a latent model, 09 a DDPM, an EDM and a flow model.
They read the digits the package carries (MS_DDPM_DATA unset). Their files go to tutorials/outputs/small/, which git
ignores. The kernel is this interpreter (sys.executable), declared in a kernelspec in a temporary
folder, so nothing is installed into the user's Jupyter setup.
"""
import inspect
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import MNIST5K

nbformat = pytest.importorskip("nbformat", reason="the tutorial tests need nbformat: pip install -e '.[dev]'")

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("[0-9][0-9]_*.ipynb"))
KERNEL_NAME = "ms-ddpm-tutorial-test"
SMALL_OUT = TUTORIALS / "outputs" / "small"
STARTED = time.time()

# files (glob patterns) each notebook must (re)write in tutorials/outputs/small, and text its outputs must show
EXPECTED_FILES = {
    "03_training.ipynb": ["train/train_log.jsonl", "train/config.yaml", "train/ckpt_*.ckpt"],
    "04_sampling.ipynb": ["denoising.gif"],
    "05_score_sde_samplers.ipynb": ["frechet_pixels.json"],
    "07_conditional_guidance.ipynb": ["cond_train/ckpt_*.ckpt", "guidance/fd_accuracy.json"],
    "08_latent_diffusion.ipynb": ["vae_train/ckpt_*.ckpt", "ldm_train/ckpt_*.ckpt", "latent/summary.json"],
    "09_processes.ipynb": ["process_edm/ckpt_*.ckpt", "process_flow/ckpt_*.ckpt", "processes/curves.json"],
}
EXPECTED_TEXT = {
    "02_unet.ipynb": ["35,746,307"],
    "06_distributed.ipynb": ["usage: bash scripts/run_distributed.sh", "usage: bash scripts/run_distributed_ascend.sh",
                             "images in both shards: 0"],
}


def test_the_notebooks_are_found():
    assert [p.name[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05", "06", "07", "08", "09"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_has_no_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name}, cell {i}: outputs are committed; clear them"
            assert cell.execution_count is None, f"{path.name}, cell {i}: execution_count is not null"


# the notebooks whose full settings are a config's: the quick start's (03 trains it; 04 and 05 repeat its cell) and
# the class-conditional quick start's (07)
FULL_SETTINGS = {"03_training.ipynb": "unet_mnist5k_cpu.yaml", "04_sampling.ipynb": "unet_mnist5k_cpu.yaml",
                 "05_score_sde_samplers.ipynb": "unet_mnist5k_cpu.yaml",
                 "07_conditional_guidance.ipynb": "unet_mnist5k_cond_cpu.yaml"}


@pytest.mark.parametrize("name, config", FULL_SETTINGS.items())
def test_full_settings_are_the_quick_start_config(name, config):
    """The notebooks say their full settings are a config of configs/: the model, the diffusion and the training
    recipe must not drift from it (the output folder, log interval and explicit defaults may differ)."""
    from ms_ddpm import Unet
    from ms_ddpm.config import Config

    nb = nbformat.read(TUTORIALS / name, as_version=4)
    cell = next(c.source for c in nb.cells if c.cell_type == "code" and "cfg = Config.from_dict(" in c.source)
    scope = {"Config": Config, "SMALL": False, "DATA_ROOT": None, "print": lambda *a: None}
    exec(cell, scope)
    full = scope["cfg"].to_dict()
    quick = Config.load(TUTORIALS.parent / "configs" / config).to_dict()
    # the same network: constructor arguments with the U-Net's defaults filled in
    defaults = {k: p.default for k, p in inspect.signature(Unet).parameters.items() if p.default is not p.empty}
    assert full["model"]["name"] == quick["model"]["name"] == "unet"
    assert {**defaults, **full["model"]["kwargs"]} == {**defaults, **quick["model"]["kwargs"]}
    assert full["diffusion"] == quick["diffusion"]
    assert full["data"] == quick["data"]
    where = ("output_dir", "log_every")  # where the run writes and how often it logs are the notebook's own
    assert ({k: v for k, v in full["train"].items() if k not in where}
            == {k: v for k, v in quick["train"].items() if k not in where})


def test_process_notebook_full_settings_are_the_configs():
    """09's full settings are the quick start's and the EDM and flow configs, as it says."""
    from ms_ddpm import Unet
    from ms_ddpm.config import Config

    defaults = {k: p.default for k, p in inspect.signature(Unet).parameters.items() if p.default is not p.empty}

    nb = nbformat.read(TUTORIALS / "09_processes.ipynb", as_version=4)
    cell = next(c.source for c in nb.cells if c.cell_type == "code" and "CONFIGS = {" in c.source)
    scope = {"Config": Config, "SMALL": False, "DATA_ROOT": None}
    exec(cell.split("pipelines, minutes")[0], scope)  # the configs, not the training
    for name, config in [("ddpm", "unet_mnist5k_cpu.yaml"), ("edm", "edm_mnist5k_cpu.yaml"),
                         ("flow", "flow_mnist5k_cpu.yaml")]:
        full = scope["CONFIGS"][name].to_dict()
        written = Config.load(TUTORIALS.parent / "configs" / config).to_dict()
        assert {**defaults, **full["model"]["kwargs"]} == {**defaults, **written["model"]["kwargs"]}, name
        for section in ("diffusion", "data"):
            assert full[section] == written[section], (name, section)
        where = ("output_dir", "log_every")
        assert ({k: v for k, v in full["train"].items() if k not in where}
                == {k: v for k, v in written["train"].items() if k not in where}), name


@pytest.fixture(scope="module", autouse=True)
def fresh_outputs():
    """No earlier run's files: the notebooks reuse a finished run they find, and each must show its own work."""
    shutil.rmtree(SMALL_OUT, ignore_errors=True)


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory):
    """A kernelspec that starts ipykernel with this interpreter, in a temporary JUPYTER_PATH."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / KERNEL_NAME
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "ms_ddpm tutorial test",
        "language": "python",
    }))
    return root


def outputs_text(nb):
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", ""))
            parts.append(out.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


def image_count(nb):
    return sum("image/png" in out.get("data", {}) or "image/gif" in out.get("data", {})
               for cell in nb.cells for out in cell.get("outputs", []))


def run_notebook(path, cwd, kernel_dir, monkeypatch, **env_vars):
    """Execute the notebook at `path` in a fresh kernel with the small settings; returns it with its outputs."""
    nbclient = pytest.importorskip("nbclient", reason="running the tutorials needs nbclient: pip install -e '.[dev]'")
    pytest.importorskip("ipykernel", reason="running the tutorials needs ipykernel: pip install -e '.[dev]'")
    monkeypatch.setenv("JUPYTER_PATH", str(kernel_dir))  # read when the client builds its kernel manager
    env = dict(os.environ, MS_DDPM_TUTORIAL_SMALL="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("MS_DDPM_DATA", None)  # default: the digits the package carries
    env.update(env_vars)
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name=KERNEL_NAME,
                                     resources={"metadata": {"path": str(cwd)}})
    client.execute(env=env)  # raises CellExecutionError, naming the cell and its traceback, on any error
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            assert out.output_type != "error", f"{path.name}: {out.get('ename')}: {out.get('evalue')}"
    return nb


# With -m slow, for the suite's time: 07 trains a conditional model and a classifier (83 s on 2 cores shared with
# another job; the conditional tests and README commands cover the same code), 08 an autoencoder and a latent model
# (63 s), 09 three models and samples each with two samplers (tests/test_processes.py covers the same code)
SLOW_RUNS = ("07_", "08_", "09_")
RUNS = [pytest.param(p, marks=pytest.mark.slow) if p.name.startswith(SLOW_RUNS) else p for p in NOTEBOOKS]


@pytest.mark.parametrize("path", RUNS, ids=lambda p: p.stem)
def test_notebook_runs_with_small_settings(path, kernel_dir, monkeypatch):
    nb = run_notebook(path, TUTORIALS, kernel_dir, monkeypatch)
    text = outputs_text(nb)
    for expected in EXPECTED_TEXT.get(path.name, []):
        assert expected in text, f"{path.name}: no output shows {expected!r}"
    if path.name != "06_distributed.ipynb":
        assert image_count(nb) >= 1, f"{path.name}: no figure was displayed inline"
    for pattern in EXPECTED_FILES.get(path.name, []):
        fresh = [f for f in SMALL_OUT.glob(pattern) if f.stat().st_mtime >= STARTED]
        assert fresh, f"{path.name} did not write {SMALL_OUT / pattern}"
    if path.name == "05_score_sde_samplers.ipynb":
        table = json.loads((SMALL_OUT / "frechet_pixels.json").read_text())
        assert table["train vs test (floor)"] < table["Gaussian noise"]
    if path.name == "07_conditional_guidance.ipynb":
        table = json.loads((SMALL_OUT / "guidance" / "fd_accuracy.json").read_text())
        assert set(table) == {"1", "2", "4"}
        assert all(np.isfinite(v["fd"]) and 0 <= v["class_accuracy"] <= 1 for v in table.values())
    if path.name == "08_latent_diffusion.ipynb":
        summary = json.loads((SMALL_OUT / "latent" / "summary.json").read_text())
        assert summary["1"]["finite"] and summary["2"]["finite"] and summary["scaling_factor"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", ["04_sampling.ipynb", "05_score_sde_samplers.ipynb"])
def test_notebook_trains_the_model_itself_without_the_checkpoint_of_03(name, tmp_path, kernel_dir, monkeypatch):
    """Run alone, in an empty folder (a copy of the notebook, the data given by MS_DDPM_DATA), 04 and 05 train the
    model of 03 first."""
    folder = tmp_path / "tutorials"
    folder.mkdir()
    shutil.copy(TUTORIALS / name, folder / name)
    nb = run_notebook(folder / name, folder, kernel_dir, monkeypatch, MS_DDPM_DATA=str(MNIST5K))
    assert "no checkpoint in outputs/small/train" in outputs_text(nb)
    assert list((folder / "outputs" / "small" / "train").glob("ckpt_*.ckpt"))
    assert (folder / "outputs" / "small" / EXPECTED_FILES[name][0]).is_file()
