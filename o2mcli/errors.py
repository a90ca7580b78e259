"""The one user-facing error type: a one-line message, exit code 2."""

from __future__ import annotations

from typing import Any


class O2MError(Exception):
    """Bad input or a refused operation; the CLI prints ``error: <msg>`` and exits 2."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        # One line, always: a multi-line message would read like a traceback.
        super().__init__(" ".join(str(message).split()))



class OptionError(O2MError):
    """A bad value of one config field. The library names the field (``p_own=1.5: ...``); the CLI prints
    the option's flag instead (``--p-own 1.5: ...``)."""

    def __init__(self, field: str, value: Any, message: str) -> None:
        self.field, self.value, self.reason = field, value, " ".join(str(message).split())
        super().__init__(f"{field}={value!r}: {self.reason}")


# Config fields whose flag is not ``--`` + the field name with dashes.
FLAGS = {"lam": "--lambda", "num_train_timesteps": "--timesteps", "norm_num_groups": "--norm-groups",
         "block_out_channels": "--channels", "denoiser_config": "--model-config"}


def flag_name(field: str) -> str:
    """The command-line flag of a config field."""
    return FLAGS.get(field, "--" + field.replace("_", "-"))
