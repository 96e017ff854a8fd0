"""Learning-rate schedules, computed once as a per-step array (MindSpore optimizers index it by their step)."""
import numpy as np

from ..utils import check_choice

LR_SCHEDULES = ("cosine", "constant")


def warmup_cosine_lr(lr, total_steps, warmup_steps=0, min_lr=0.0, schedule="cosine"):
    """Learning rate for optimizer steps 0..total_steps-1, float32 array.

    Linear warmup lr * (s + 1) / warmup_steps for s < warmup_steps, then either constant lr or the cosine decay of
    Loshchilov & Hutter 2017 (SGDR, Eq. 5 without restarts):
        min_lr + (lr - min_lr) / 2 * (1 + cos(pi * (s - warmup_steps) / (total_steps - warmup_steps)))
    """
    check_choice("lr_schedule", schedule, LR_SCHEDULES)
    if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"need 0 <= warmup_steps <= steps and steps >= 1, got {warmup_steps} and {total_steps}")
    s = np.arange(total_steps, dtype=np.float64)
    decay_steps = max(total_steps - warmup_steps, 1)
    after = s - warmup_steps
    if schedule == "cosine":
        out = min_lr + 0.5 * (lr - min_lr) * (1 + np.cos(np.pi * after / decay_steps))
    else:
        out = np.full_like(s, lr)
    if warmup_steps:
        out = np.where(s < warmup_steps, lr * (s + 1) / warmup_steps, out)
    return out.astype(np.float32)
