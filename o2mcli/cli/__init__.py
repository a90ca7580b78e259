"""Typer commands: each builds a pydantic config and calls its stage's library function."""

from o2mcli.cli import distill, export, info, merge, prune, sample, score, train  # noqa: F401  (registers commands)
from o2mcli.cli.app import app, run_cli as main

__all__ = ["app", "main"]
