"""A small name -> builder registry (timm style).

Builders are registered with a decorator; a duplicate name raises, and a lookup miss raises with
the closest registered names so that a typo in a recipe is fixed in one step.
"""
from __future__ import annotations

import difflib
import fnmatch
from typing import Any, Callable, Dict, Iterator, List, Optional

from deepkd.errors import UnknownNameError


def closest(name: str, choices, n: int = 3) -> List[str]:
    """The registered names most similar to ``name`` (case-insensitive), best first."""
    choices = list(choices)
    lowered = {c.lower(): c for c in choices}
    hits = difflib.get_close_matches(name.lower(), list(lowered), n=n, cutoff=0.4)
    return [lowered[h] for h in hits]


class Registry:
    """Maps names to builder callables for one kind of object ("model", "method", ...)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._builders: Dict[str, Callable[..., Any]] = {}
        self._info: Dict[str, Dict[str, Any]] = {}

    def register(self, name: Optional[str] = None, **info: Any) -> Callable:
        """Decorator: ``@REG.register("resnet8x4", input_size=32)``; the builder's name by default."""

        def wrap(builder: Callable) -> Callable:
            key = name or builder.__name__
            if key in self._builders:
                raise ValueError(f"{self.kind} {key!r} is already registered")
            self._builders[key] = builder
            self._info[key] = dict(info)
            return builder

        return wrap

    def get(self, name: str) -> Callable[..., Any]:
        """The builder registered under ``name``; a miss names the closest registered names."""
        if name in self._builders:
            return self._builders[name]
        near = closest(name, self._builders)
        hint = f"; did you mean {', '.join(repr(n) for n in near)}?" if near else ""
        raise UnknownNameError(f"unknown {self.kind} {name!r}{hint} ({len(self)} {self.kind}s registered)")

    def info(self, name: str) -> Dict[str, Any]:
        """The keyword metadata given at registration."""
        self.get(name)
        return dict(self._info[name])

    def build(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self.get(name)(*args, **kwargs)

    def names(self, pattern: Optional[str] = None) -> List[str]:
        """Sorted names, optionally filtered by a shell-style pattern (case-insensitive)."""
        names = sorted(self._builders)
        if pattern:
            names = [n for n in names if fnmatch.fnmatch(n.lower(), pattern.lower())]
        return names

    def __contains__(self, name: str) -> bool:
        return name in self._builders

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._builders)
