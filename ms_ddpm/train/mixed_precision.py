"""Mixed precision: the network's dtypes (`mixed_precision`) and the loss scaler of the training step
(`build_loss_scaler`), MindSpore 2.x's `amp` pattern (Micikevicius et al. 2018, Sec. 3.2)."""
import mindspore as ms
from mindspore import amp, nn
from mindspore.train.amp import AMP_WHITE_LIST

from ..utils import check_choice


def mixed_precision(model, amp_level, dtype):
    """`model` at mixed-precision `amp_level` in `dtype`, with every GroupNorm kept in float32 (as mindone keeps
    nn.GroupNorm among its float32 cells; Ascend's aclnnGroupNorm wants input and weights of one dtype). The
    softmaxes cast to float32 themselves (`ms_ddpm.models.softmax`), which holds in graph mode; a float32 Softmax
    cell would hand its float16 input a float32 gradient (its own bprop skips the boundary's cast).

    The returned network is the one to train: `amp.auto_mixed_precision` wraps the network at O2 and O3. O1 is
    MindSpore's white list applied per Cell (its convolutions and dense layers in `dtype`), as MindSpore did before
    2.x: MindSpore 2.8's O1 rewrites the network's source with mindspore.rewrite, which fails on this U-Net
    ("NameError: name 'Conv2dOpt' is not defined").
    """
    if amp_level == "O1":
        white_list = tuple(c for c in AMP_WHITE_LIST if isinstance(c, type) and issubclass(c, nn.Cell))
        for _, cell in model.cells_and_names():
            if isinstance(cell, white_list):
                cell.to_float(dtype)
    else:
        model = amp.auto_mixed_precision(model, amp_level, dtype)
    for _, cell in model.cells_and_names():
        if isinstance(cell, nn.GroupNorm):
            cell.to_float(ms.float32)
    return model


def build_loss_scaler(t):
    """The loss scaler of train section `t`: dynamic (halved on overflow, doubled after `loss_scale_window` good
    steps), static, or none (a static scale of 1)."""
    check_choice("train.loss_scaler", t.loss_scaler, ("dynamic", "static", "none"))
    if t.loss_scaler == "dynamic":
        return amp.DynamicLossScaler(t.loss_scale, 2, t.loss_scale_window)
    return amp.StaticLossScaler(t.loss_scale if t.loss_scaler == "static" else 1.0)
