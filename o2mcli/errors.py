"""The one user-facing error type: a one-line message, exit code 2."""

from __future__ import annotations


class O2MError(Exception):
    """Bad input or a refused operation; the CLI prints ``error: <msg>`` and exits 2."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        # One line, always: a multi-line message would read like a traceback.
        super().__init__(" ".join(str(message).split()))

