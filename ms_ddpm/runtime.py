"""The MindSpore runtime of a run: device and execution mode, set once before any network is built.

Ascend specifics, each checked on CPU with the device facts passed in (docs/ascend.md says what only hardware can
confirm): the device a rank-table launcher assigned (DEVICE_ID), bfloat16 refused on the Atlas training series
(910A), and the operator precision mode that keeps float32 work in float32.
"""
import os

import mindspore as ms

from .config import ConfigError
from .utils import check_choice

# MindSpore's SoC name of the Atlas training series (910A), whose kernels have no bfloat16 (Atlas A2 / 910B do)
ASCEND_910A = "ascend910"


def device_id_from_rank_table(environ=os.environ):
    """The device a rank-table launcher gave this process (DEVICE_ID, when RANK_TABLE_FILE is set), else None:
    msrun binds each worker's device itself, and without a launcher device 0 is MindSpore's default."""
    if not environ.get("RANK_TABLE_FILE"):
        return None
    value = environ.get("DEVICE_ID", "")
    if not value.isdigit():
        raise ConfigError(f"RANK_TABLE_FILE is set but DEVICE_ID is {value!r}: a rank-table launcher must export "
                          "DEVICE_ID (0-7, the device of this process), as scripts/run_distributed_ascend.sh does")
    return int(value)


def check_amp_dtype(train_cfg, soc_version=None):
    """Refuse bfloat16 mixed precision where MindSpore has no kernels for it: on CPU, and on an Ascend SoC of the
    Atlas training series (`soc_version` as MindSpore names it, "ascend910" for the 910A)."""
    if train_cfg.amp_level == "O0" or train_cfg.amp_dtype != "bfloat16":
        return
    if train_cfg.device == "CPU":
        raise ConfigError(
            "bfloat16 mixed precision is for Ascend and GPU: MindSpore's CPU backend has no bfloat16 Conv2D or "
            "MatMul kernel. On CPU use train.amp_dtype=float16 or train.amp_level=O0."
        )
    if train_cfg.device == "Ascend" and soc_version == ASCEND_910A:
        raise ConfigError(
            "bfloat16 mixed precision needs an Atlas A2 (910B) or newer NPU: this device (SoC ascend910, the Atlas "
            "training series) has no bfloat16 kernels. Use train.amp_dtype=float16 or train.amp_level=O0."
        )


def ascend_precision_mode(amp_level):
    """The Ascend operator precision mode of a run at `amp_level`: float32 runs (O0: full-precision training,
    sampling, evaluation) keep every operator in its dtype; the Atlas training series' default ("force_fp16" in
    MindSpore 2.8's documentation) would run float32 matmuls and convolutions in float16. None: leave the default
    (mixed precision chooses its dtypes itself)."""
    return "must_keep_origin_dtype" if amp_level == "O0" else None


def set_runtime(train_cfg):
    """Device and execution mode of a `TrainConfig` (on CPU, synchronous ops); bfloat16 is refused where MindSpore
    has no kernels for it."""
    check_choice("train.device", train_cfg.device, ("CPU", "GPU", "Ascend"))
    check_choice("train.mode", train_cfg.mode, ("graph", "pynative"))
    check_choice("train.amp_level", train_cfg.amp_level, ("O0", "O1", "O2", "O3"))
    check_choice("train.amp_dtype", train_cfg.amp_dtype, ("float16", "bfloat16"))
    check_amp_dtype(train_cfg)
    if ms.get_context("device_target") != train_cfg.device:  # set_device may run once, before any kernel
        device_id = device_id_from_rank_table()
        ms.set_device(train_cfg.device, **({} if device_id is None else {"device_id": device_id}))
    if train_cfg.device == "Ascend":
        from mindspore._c_expression import MSContext  # where mindspore.amp reads the SoC name too
        from mindspore.device_context.ascend import op_precision

        check_amp_dtype(train_cfg, MSContext.get_instance().get_ascend_soc_version())
        mode = ascend_precision_mode(train_cfg.amp_level)
        if mode is not None:
            op_precision.precision_mode(mode)
    if train_cfg.device == "CPU":
        # Ops run synchronously. On CPU the host computes the kernels too, so MindSpore's asynchronous op pipeline
        # only hands each PyNative op between threads: without it, DDIM sampling op by op ran 1.8-2.8x as fast on
        # 2 cores, compiled graphs at the same speed (docs/performance.md, "Synchronous ops on CPU").
        ms.runtime.launch_blocking()
    ms.set_context(mode=ms.GRAPH_MODE if train_cfg.mode == "graph" else ms.PYNATIVE_MODE)
