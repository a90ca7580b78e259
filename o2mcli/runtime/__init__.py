"""Training machinery shared by every trainer: EMA, checkpoints, logs, progress."""
