"""Checkpoints: MindSpore .ckpt files written atomically and read with their damage reported in one line.

`save_atomic` / `load_verified` are the two primitives every checkpoint of ms_ddpm goes through (training runs here,
the feature extractors of `ms_ddpm.metrics.features`). A training-run checkpoint holds the model weights (their own
names), the EMA weights ("ema.*"), the optimizer state (its moment Parameters and step), the loss-scaler state, a
latent run's autoencoder ("autoencoder.*", `ms_ddpm.latent.FirstStage`), and, as appended strings, the step and the
resolved config (YAML; with the class names of a class-conditional run, a latent run's scaling factor), so
`--resume` continues bit for bit and sampling (`ms_ddpm.pipeline.DiffusionPipeline.from_checkpoint`) needs nothing
else. (The host random state needs no entry: the trainer derives it from the seed, the rank and the step.)
"""
import os
import re
from pathlib import Path

import mindspore as ms

CKPT_PATTERN = re.compile(r"^ckpt_(\d+)\.ckpt$")
# the checkpoint of the lowest FD so far (`train.eval_every`); outside CKPT_PATTERN, so neither `keep` nor
# `list_checkpoints` (and so --resume) counts it
BEST_CHECKPOINT = "ckpt_best.ckpt"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and what to do."""


def save_atomic(path, parameters, extra=None):
    """Write `parameters` (Parameters or named tensors) and `extra` strings to `path`: to a temporary file first,
    then renamed over, so a crash during the write leaves any previous file at `path` untouched."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.ckpt")  # MindSpore appends ".ckpt" to names without it
    ms.save_checkpoint([{"name": p.name, "data": p} for p in parameters], str(tmp),
                       append_dict={k: str(v) for k, v in (extra or {}).items()}, crc_check=True)
    os.replace(tmp, path)  # atomic on POSIX and Windows
    return path


def load_verified(path, what, if_missing, if_damaged):
    """name -> Parameter (and the extra entries) of the checkpoint at `path`, checked against its CRC.

    Raises:
        CheckpointError: the file is missing, or corrupt or truncated; the message names `what` it should be and
            what to do (`if_missing`, `if_damaged`).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist; {if_missing}")
    try:
        return ms.load_checkpoint(str(path), crc_check=True)
    except Exception as err:  # MindSpore raises ValueError/RuntimeError with C++ context for damaged files
        raise CheckpointError(f"{what} {path} is corrupt or truncated ({type(err).__name__}); {if_damaged}") from None


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
    """Write ckpt_<step>.ckpt atomically with the step and the config; keeps the newest `keep` checkpoints."""
    path = save_atomic(checkpoint_path(output_dir, step), parameters, {"step": step, "config": config_yaml})
    for old in list_checkpoints(output_dir)[:-keep]:
        old.unlink()
    return path


def save_best_checkpoint(output_dir, step, parameters, config_yaml):
    """Write BEST_CHECKPOINT atomically, with what `save_checkpoint` writes for this step."""
    return save_atomic(Path(output_dir) / BEST_CHECKPOINT, parameters, {"step": step, "config": config_yaml})


def load_checkpoint(path):
    """Read a run checkpoint into a dict name -> Parameter (plus "step" and "config" as Python values)."""
    raw = load_verified(path, "checkpoint", "give a ckpt_<step>.ckpt written by `ms-ddpm train`",
                        "delete it to resume from the one before it")
    missing = [k for k in ("step", "config") if k not in raw]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing}: it was not written by ms_ddpm's trainer")
    raw["step"] = int(str(raw["step"]))
    raw["config"] = str(raw["config"])
    return raw


def load_weights(net, state, path, use_ema=True):
    """Load `net`'s trainable parameters from the entries `state` of the checkpoint at `path`: the EMA weights
    ("ema.<name>", `ms_ddpm.train.ema.EMA`) when `use_ema` and the checkpoint has them all, else the weights under
    their own names (a run without EMA, or a converter's checkpoint). Returns which: "ema" or "raw".

    Raises:
        CheckpointError: the checkpoint lacks some of them (it belongs to another network or configuration).
    """
    names = [p.name for p in net.trainable_params()]
    kind = "ema" if use_ema and all("ema." + n in state for n in names) else "raw"
    prefix = "ema." if kind == "ema" else ""
    missing = [n for n in names if prefix + n not in state]
    if missing:
        raise CheckpointError(f"{path} lacks weights for {missing[:3]}...: it does not hold this "
                              f"{type(net).__name__}'s configuration")
    ms.load_param_into_net(net, {n: ms.Parameter(state[prefix + n].value(), name=n) for n in names},
                           strict_load=True)
    return kind
