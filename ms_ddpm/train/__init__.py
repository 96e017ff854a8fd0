"""Training: the compiled train step, EMA, learning-rate schedule, data-parallel setup, the trainer."""
