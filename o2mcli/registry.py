"""One registry for every kind of plug-in (KD losses, importance criteria, merge methods, feature
extractors, samplers, built-in data): a name -> implementation map with one error for an unknown name."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Callable, Generic, TypeVar

from o2mcli.errors import O2MError

T = TypeVar("T")


class Registry(Mapping[str, T], Generic[T]):
    """Names -> implementations of one kind, in registration order.

    ``option`` is the flag that picks one (``--kd``) and ``kind`` what it picks ("KD method"): an
    unknown name is the one-line error ``--kd 'x': unknown KD method (choose from output, at, ...)``.
    ``extra`` names are accepted by the option but resolved elsewhere (``--features auto``); they are
    listed in the error.
    """

    def __init__(self, option: str, kind: str, extra: tuple[str, ...] = ()) -> None:
        self.option, self.kind, self.extra = option, kind, extra
        self._items: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None) -> Callable[[T], T] | T:
        """``reg.register("x", obj)``, or ``@reg.register("x")`` above a function or class."""
        if obj is not None:
            return self._add(name, obj)
        return lambda o: self._add(name, o)

    def _add(self, name: str, obj: T) -> T:
        if name in self._items or name in self.extra:
            raise ValueError(f"{self.option}: {name!r} is registered twice")
        self._items[name] = obj
        return obj

    def names(self) -> list[str]:
        """Every name the option accepts, ``extra`` first."""
        return [*self.extra, *self._items]

    def resolve(self, name: str) -> T:
        """The implementation registered as ``name``; an unknown name is an ``O2MError``."""
        try:
            return self._items[name]
        except (KeyError, TypeError):
            raise O2MError(f"{self.option} {name!r}: unknown {self.kind} (choose from {', '.join(self.names())})") \
                from None

    def __getitem__(self, name: str) -> T:
        return self._items[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)
