"""o2m: make diffusion models cheaper per denoising step (O2MKD + DKDM)."""

__version__ = "0.1.0"
