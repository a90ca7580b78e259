"""The string forms options take on the command line, parsed where the configs validate them.

Each parser raises ``ValueError`` with what was expected; a config's validator turns it into the
field's error, which the CLI prints under the option's flag.
"""

from __future__ import annotations

import math
import re
from typing import Any

_SUFFIX = {"": 1.0, "K": 1e3, "M": 1e6, "G": 1e9}


def int_list(v: Any) -> Any:
    """``"32,64,64"`` -> (32, 64, 64); anything else is left to the field's type."""
    if not isinstance(v, str):
        return v
    try:
        return tuple(int(x) for x in v.split(",") if x.strip())
    except ValueError:
        raise ValueError("expected comma-separated integers") from None


def number(v: Any) -> Any:
    """``"0.25"`` or ``"1/4"`` -> 0.25 (finite); anything else is left to the field's type."""
    if not isinstance(v, str):
        return v
    text = v.strip()
    try:
        if "/" in text:
            num, den = text.split("/", 1)
            out = float(num) / float(den)
        else:
            out = float(text)
    except (ValueError, ZeroDivisionError):
        raise ValueError("not a number") from None
    if not math.isfinite(out):
        raise ValueError("must be finite")
    return out


def number_list(v: Any) -> Any:
    """``"1,1,2,1"`` -> (1.0, 1.0, 2.0, 1.0); anything else is left to the field's type."""
    if not isinstance(v, str):
        return v
    return tuple(number(x) for x in v.split(","))


def macs(v: Any) -> Any:
    """``"3.4G"``, ``"850M"`` or ``"3.4e9"`` -> MACs; anything else is left to the field's type."""
    if not isinstance(v, str):
        return v
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMgG]?)\s*", v)
    if not m:
        raise ValueError("expected a number with an optional K, M or G suffix (e.g. 3.4G)")
    return float(m.group(1)) * _SUFFIX[m.group(2).upper()]


def cli(*flags: str, metavar: str | None = None, text: bool = False, unset: bool = False, negate: bool = False,
        argument: bool = False, internal: bool = False) -> dict:
    """How a config field appears on the command line, for pydantic's ``json_schema_extra`` (the field's default and
    ``description`` are the option's default and help; ``o2mcli.cli.options`` builds the option from them).

    ``flags``: the option's names (default ``--`` + the field name with dashes); ``metavar``: its value's name in
    ``--help``; ``text``: it takes the text as typed, which the field's validator parses (``1/4``, ``3.4G``);
    ``unset``: it defaults to None on the command line, and the field is left to its default, or to the command,
    unless given; ``negate``: the flag turns the field off (``--no-png``); ``argument``: a positional argument;
    ``internal``: no option (a library setting).
    """
    spec = {"flags": list(flags), "metavar": metavar, "text": text, "unset": unset, "negate": negate,
            "argument": argument, "internal": internal}
    return {"cli": {k: v for k, v in spec.items() if v}}
