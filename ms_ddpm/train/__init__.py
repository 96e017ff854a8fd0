"""Training: the compiled train step, EMA, learning-rate schedule, checkpoints, data-parallel setup, the trainer."""
