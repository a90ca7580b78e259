"""Distillation: one engine = a data source x a timestep plan x a KD loss (O2MKD, O2OKD, DKDM)."""
