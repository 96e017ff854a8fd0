"""The MindSpore runtime of a run: device and execution mode, set once before any network is built."""
import mindspore as ms

from .config import ConfigError
from .utils import check_choice


def set_runtime(train_cfg):
    """Device and execution mode of a `TrainConfig`; bfloat16 is refused where MindSpore has no kernels for it."""
    check_choice("train.device", train_cfg.device, ("CPU", "GPU", "Ascend"))
    check_choice("train.mode", train_cfg.mode, ("graph", "pynative"))
    check_choice("train.amp_level", train_cfg.amp_level, ("O0", "O1", "O2", "O3"))
    check_choice("train.amp_dtype", train_cfg.amp_dtype, ("float16", "bfloat16"))
    if train_cfg.device == "CPU" and train_cfg.amp_level != "O0" and train_cfg.amp_dtype == "bfloat16":
        raise ConfigError(
            "bfloat16 mixed precision is for Ascend and GPU: MindSpore's CPU backend has no bfloat16 Conv2D or "
            "MatMul kernel. On CPU use train.amp_dtype=float16 or train.amp_level=O0."
        )
    if ms.get_context("device_target") != train_cfg.device:  # set_device may run once, before any kernel
        ms.set_device(train_cfg.device)
    ms.set_context(mode=ms.GRAPH_MODE if train_cfg.mode == "graph" else ms.PYNATIVE_MODE)
