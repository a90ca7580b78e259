"""Prompt files: one prompt per line (UTF-8), blank lines ignored; what ``--prompts FILE`` reads."""

from __future__ import annotations

from pathlib import Path

from o2mcli.errors import O2MError

MAX_BYTES = 64 << 20  # a prompt file of more than 64 MiB is not a prompt list


class Prompts(list):
    """The prompts of a file, in order, and the file (``path``), which messages about them name."""

    path: Path


def read_prompts(path: Path) -> Prompts:
    """The prompts of ``path``, in order; a missing, unreadable, oversized or empty file is refused in one line."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_BYTES:
            raise O2MError(f"{path}: {path.stat().st_size / 2**20:.0f} MiB; a prompt file holds at most "
                           f"{MAX_BYTES >> 20} MiB")
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError as e:
        raise O2MError(f"{path}: no such prompt file") from e
    except IsADirectoryError as e:
        raise O2MError(f"{path}: a directory, not a prompt file (one prompt per line)") from e
    except UnicodeDecodeError as e:
        raise O2MError(f"{path}: not UTF-8 text (byte {e.start}); a prompt file is one prompt per line") from e
    except OSError as e:
        raise O2MError(f"{path}: unreadable ({e.strerror or e})") from e
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise O2MError(f"{path}: no prompt in the file (one prompt per line; blank lines are ignored)")
    out = Prompts(prompts)
    out.path = path
    return out
