"""Diffusion math (pure functions) and scheduler construction."""
