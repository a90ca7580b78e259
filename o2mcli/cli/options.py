"""Typer parameters generated from pydantic configs: every option's default, help, flags and metavar are its field's.

A field's ``default`` and ``description`` are the option's default and ``--help``; its ``json_schema_extra``
(``o2mcli.parsing.cli``) says how it appears on the command line (flags, metavar, a positional argument, a flag that
turns it off, a text the field parses, no option at all). :func:`options` gives a command function (``**given``) the
signature Typer reads; :func:`config_values` turns what Typer parsed back into the config's values.

The option's type follows the field's: ``bool`` is an on/off flag; ``int``, ``float``, ``str`` and ``Path`` are
themselves; a ``Literal`` is a ``str`` that the config checks; a tuple or list of strings or paths is repeated (an
option) or many (an argument); any other tuple, list or union is the text the field's validator parses
(``0,200,1000``).
"""

from __future__ import annotations

import inspect
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Iterable, Mapping, Optional, Sequence, TypeVar, Union, \
    get_args, get_origin

import typer
from pydantic import BaseModel
from pydantic.fields import FieldInfo

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Spec:
    """One config field as the command line sees it."""

    name: str
    field: FieldInfo
    flags: tuple[str, ...]
    metavar: Optional[str] = None
    text: bool = False
    unset: bool = False
    negate: bool = False
    argument: bool = False
    internal: bool = False

    @property
    def required(self) -> bool:
        return self.field.is_required() and not self.unset

    @property
    def default(self) -> Any:
        """The command line's default: the field's, None where the field is left unset, off for a negating flag."""
        if self.unset:
            return None
        if self.negate:
            return not self.field.default
        return inspect.Parameter.empty if self.required else self.field.default

    @property
    def many(self) -> bool:
        """A tuple or list of strings or paths: a repeated option, or an argument of many values."""
        base = _strip_optional(self.field.annotation)[0]
        return get_origin(base) in (tuple, list) and get_args(base)[0] in (str, Path)

    def annotation(self) -> Any:
        """The Python type Typer parses the option as."""
        base, optional = _strip_optional(self.field.annotation)
        if base is bool or self.negate:
            out: Any = bool
        elif self.many:
            out = list[get_args(base)[0]]  # type: ignore[misc]
        elif self.text or base not in (int, float, str, Path):
            out = str  # a Literal, a list of numbers, a union: the field's validator parses the text
        else:
            out = base
        return Optional[out] if optional or self.default is None else out


def _strip_optional(annotation: Any) -> tuple[Any, bool]:
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        return (args[0] if len(args) == 1 else Union[tuple(args)]), len(args) < len(get_args(annotation))
    return annotation, False


def specs(*models: type[BaseModel]) -> dict[str, Spec]:
    """Every field of ``models`` (the first model's where names repeat), in field order, with its command-line form;
    internal ones too (``Spec.internal``)."""
    out: dict[str, Spec] = {}
    for model in models:
        for name, field in model.model_fields.items():
            if name in out:
                continue
            extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
            meta = dict(extra.get("cli", {}))  # type: ignore[call-overload]
            flags = tuple(meta.pop("flags", ())) or ("--" + name.replace("_", "-"),)
            out[name] = Spec(name, field, flags, **meta)
    return out


def parameters(*models: type[BaseModel], order: Sequence[str] = (),
               typer_kwargs: Mapping[str, Mapping[str, Any]] = {}) -> list[inspect.Parameter]:
    """The Typer parameters of ``models``' fields (internal ones left out): those ``order`` names first, in its order,
    then the rest in field order. ``typer_kwargs``: more keywords of a field's ``typer.Option`` (a callback)."""
    found = {n: s for n, s in specs(*models).items() if not s.internal}
    unknown = [n for n in order if n not in found]
    if unknown:
        raise ValueError(f"order names no option: {unknown}")
    names = [*order, *(n for n in found if n not in order)]
    out = []
    for name in names:
        s = found[name]
        if s.argument:
            info = typer.Argument(help=s.field.description)
        else:
            more = dict(typer_kwargs.get(name, {}))
            if s.metavar is not None:
                more["metavar"] = s.metavar
            info = typer.Option(*s.flags, help=s.field.description, **more)
        out.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=s.default,
                                     annotation=Annotated[s.annotation(), info]))
    return out


def options(*models: type[BaseModel], order: Sequence[str] = (),
            typer_kwargs: Mapping[str, Mapping[str, Any]] = {}) -> Callable[[F], F]:
    """Give a command function (``def cmd(**given)``) the options of ``models``' fields, as Typer reads them
    (``__signature__``); see :func:`parameters`."""

    def give(fn: F) -> F:
        fn.__signature__ = inspect.Signature(parameters(*models, order=order,  # type: ignore[attr-defined]
                                                        typer_kwargs=typer_kwargs))
        fn.option_models = models  # type: ignore[attr-defined]  # (tests/test_cli_options.py reads them)
        return fn

    return give


def config_values(model: type[BaseModel], given: Mapping[str, Any], skip: Iterable[str] = ()) -> dict[str, Any]:
    """What Typer parsed (``given``), as ``model``'s values: a negating flag turned back, repeated values a tuple, an
    unset option that was not given left out (the field keeps its default, or the command fills it in)."""
    out = {}
    for name, s in specs(model).items():
        if s.internal or name in skip or name not in given:
            continue
        v = given[name]
        if s.negate:
            v = not v
        elif isinstance(v, (list, tuple)):
            v = tuple(v) or None
        if v is None and s.unset:
            continue
        out[name] = v
    return out
