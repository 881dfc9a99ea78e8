"""A small name -> factory registry shared by models, attacks and defenses (timm style).

A new entry is one decorated function in one file; the package ``__init__`` imports that file so
that registration happens on import. Duplicates raise, unknown names list the valid choices.
"""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from ._errors import EpicError

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to factories for one kind of object (``kind`` is used in messages)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Callable[..., T]] = {}

    def register(self, name: str | None = None) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator that records ``fn`` under ``name`` (default: ``fn.__name__`` with ``-``)."""

        def wrap(fn: Callable[..., T]) -> Callable[..., T]:
            key = name or fn.__name__.replace("_", "-")
            if key in self._entries:
                raise RuntimeError(f"duplicate {self.kind} '{key}' registered twice")
            self._entries[key] = fn
            return fn

        return wrap

    def get(self, name: str) -> Callable[..., T]:
        """The factory for ``name``; unknown names raise with the list of valid ones."""
        try:
            return self._entries[name]
        except KeyError:
            choices = ", ".join(sorted(self._entries))
            raise EpicError(f"unknown {self.kind} '{name}'; choose from: {choices}") from None

    def create(self, name: str, **kwargs: Any) -> T:
        """Build ``name``; keyword arguments that are ``None`` are dropped so defaults apply.

        An option the factory does not take is an :class:`EpicError` listing those it does.
        """
        factory = self.get(name)
        options = {k: v for k, v in kwargs.items() if v is not None}
        try:
            params = inspect.signature(factory).parameters
        except (TypeError, ValueError):  # no signature to check against
            params = None
        takes_any = params is None or any(p.kind is p.VAR_KEYWORD for p in params.values())
        unknown = [] if takes_any else sorted(set(options) - set(params))
        if unknown:
            valid = sorted(p for p, v in params.items()
                           if v.kind in (v.KEYWORD_ONLY, v.POSITIONAL_OR_KEYWORD))
            raise EpicError(f"{self.kind} '{name}' has no option(s) {unknown}; "
                            + (f"valid options are {valid}" if valid else "it takes none"))
        return factory(**options)

    def names(self, pattern: str = "*") -> list[str]:
        """Sorted registered names matching a shell-style ``pattern``."""
        return sorted(n for n in self._entries if fnmatch.fnmatch(n, pattern))

    def __contains__(self, name: object) -> bool:
        return name in self._entries
