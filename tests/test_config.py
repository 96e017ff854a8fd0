"""Config values are type-checked by field, overrides reach entries inside mappings, and both errors name the fix."""
from pathlib import Path

import pytest

from ms_ddpm.cli import main as cli_main
from ms_ddpm.config import Config, ConfigError

QUICK_START = Path(__file__).resolve().parents[1] / "configs" / "unet_mnist5k_cpu.yaml"


def test_overrides_reach_model_kwargs_and_keep_the_other_entries():
    base = Config.load(QUICK_START)
    cfg = Config.load(QUICK_START, ["model.kwargs.dim=32", "train.lr=1e-4", "train.steps=7", "train.warmup_steps=7"])
    assert cfg.model.kwargs == dict(base.model.kwargs, dim=32)
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float) and cfg.train.steps == 7
    # a whole mapping given at once replaces it
    assert Config.load(None, ["model.kwargs={dim: 4}"]).model.kwargs == {"dim": 4}


@pytest.mark.parametrize("overrides, message", [
    (["train.steps=many"], "train.steps must be an integer, got 'many' (str)"),
    (["train.steps=1.5"], "train.steps must be an integer, got 1.5 (float)"),
    (["train.ema_warmup=1"], "train.ema_warmup must be true or false, got 1 (int)"),
    (["train.lr=fast"], "train.lr must be a number, got 'fast' (str)"),
    (["model.kwargs=3"], "model.kwargs must be a mapping, got 3 (int)"),
    (["train.lr.peak=1"], "override 'train.lr.peak=1': train.lr is not a mapping"),
    (["trian.lr=1"], "override 'trian.lr=1': unknown config section 'trian'"),
    (["train.lr"], "override 'train.lr' must look like section.key=value"),
    (["train.steps=[1"], "override 'train.steps=[1': the value is not valid YAML"),
    # the quick start warms up for 60 steps: refused rather than clamped (README, "Warmup")
    (["train.steps=50"], "train.warmup_steps (60) > train.steps (50): the linear warmup must end within the run; "
                         "set train.warmup_steps <= 50 (e.g. --set train.warmup_steps=5) or raise train.steps"),
    (["train.warmup_steps=-1"], "train.warmup_steps must be >= 0, got -1"),
])
def test_bad_overrides_end_with_one_line_and_status_2(overrides, message, capsys):
    with pytest.raises(ConfigError):
        Config.load(QUICK_START, overrides)
    assert cli_main(["train", "--config", str(QUICK_START), "--set", *overrides]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_yaml_values_are_checked_by_field_type(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  batch_size: '32'\n")
    with pytest.raises(ConfigError, match=r"train.batch_size must be an integer, got '32' \(str\)"):
        Config.load(path)
    path.write_text("train:\n  lr: 1e-4\n")  # YAML 1.1 reads 1e-4 as a string; the field says float
    assert Config.load(path).train.lr == 1e-4


@pytest.mark.parametrize("override, message", [
    ("model.kwargs.dim=abc", "model.kwargs do not fit Unet: dim must be an integer >= 1, got 'abc'"),
    ("model.kwargs.dim_mults=[1,2.5]", "model.kwargs do not fit Unet: dim_mults[1] must be an integer >= 1, got 2.5"),
    ("model.kwargs.heads=0", "model.kwargs do not fit Unet: heads must be an integer >= 1, got 0"),
    ("model.kwargs.dims=16", "model.kwargs do not fit Unet: "),  # an unknown constructor argument
])
def test_bad_model_kwargs_name_the_key_in_one_line_and_status_2(override, message, tmp_path, capsys):
    # checked when the network is built, before data or compilation
    assert cli_main(["train", "--config", str(QUICK_START), "--set", override,
                     f"train.output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
