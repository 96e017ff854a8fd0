"""Checkpoints: every piece of training state in one MindSpore .ckpt, written atomically, newest K kept.

A checkpoint holds the model weights (their own names), the EMA weights ("ema.*"), the optimizer state (its
moment Parameters and step), the loss-scaler state, and, as appended strings, the step and the resolved config
(YAML), so `--resume` continues bit for bit and sampling needs nothing else. (The host random state needs no
entry: the trainer derives it from the seed, the rank and the step.)
"""
import os
import re
from pathlib import Path

import mindspore as ms

CKPT_PATTERN = re.compile(r"^ckpt_(\d+)\.ckpt$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and what to do."""


def checkpoint_path(output_dir, step):
    return Path(output_dir) / f"ckpt_{step:08d}.ckpt"


def list_checkpoints(output_dir):
    """Checkpoint files in `output_dir`, oldest first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), folder / name) for name in os.listdir(folder) if (m := CKPT_PATTERN.match(name))]
    return [path for _, path in sorted(found)]


def save_checkpoint(output_dir, step, parameters, config_yaml, keep=3):
    """Write ckpt_<step>.ckpt atomically: to a temporary file first, then renamed over, so a crash during the write
    leaves the previous checkpoints untouched. Keeps the newest `keep` checkpoints."""
    path = checkpoint_path(output_dir, step)
    tmp = path.with_suffix(".tmp.ckpt")  # MindSpore appends ".ckpt" to names without it
    extra = {"step": str(step), "config": config_yaml}
    ms.save_checkpoint([{"name": p.name, "data": p} for p in parameters], str(tmp), append_dict=extra, crc_check=True)
    os.replace(tmp, path)  # atomic on POSIX and Windows
    for old in list_checkpoints(output_dir)[:-keep]:
        old.unlink()
    return path


def load_checkpoint(path):
    """Read a checkpoint into a dict name -> Parameter (plus "step" and "config" as Python values)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        raw = ms.load_checkpoint(str(path), crc_check=True)
    except Exception as err:  # MindSpore raises ValueError/RuntimeError with C++ context for damaged files
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated ({type(err).__name__}); delete it to resume from the one "
            "before it"
        ) from None
    missing = [k for k in ("step", "config") if k not in raw]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing}: it was not written by ms_ddpm's trainer")
    raw["step"] = int(str(raw["step"]))
    raw["config"] = str(raw["config"])
    return raw
