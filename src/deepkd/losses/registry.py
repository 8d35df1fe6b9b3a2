"""The method registry: ``@register_method("dkd")`` on a Method class or builder function.

The trainer validates a recipe's method keys against the builder's signature, so builders take
flat, typed keyword-only arguments whose defaults are the reference values. A name joined by ``+``
(``dkd+reviewkd``) is the sum of those methods (:class:`~deepkd.losses.combined.Combined`): its
builder takes one dict of arguments per part, named by the part.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Dict, List, Optional, Tuple

from deepkd.losses.base import PROVIDED, Method
from deepkd.losses.combined import Combined
from deepkd.registry import Registry

METHODS = Registry("method")
DEEPKD_PAPER = "Huang et al., DeepKD (decoupled momentum, dynamic top-k mask), arXiv 2505.15133, 2025,"


def register_method(name: Optional[str] = None, **info: Any):
    """Decorator registering a method builder (a ``Method`` subclass or a function returning one)."""
    return METHODS.register(name, **info)


def build_method(name: str, **kwargs: Any) -> Method:
    """Build the registered method ``name`` (or ``a+b``) with keyword arguments (a miss names the closest)."""
    return method_builder(name)(**kwargs)


def method_builder(name: str) -> Callable[..., Method]:
    """The builder of ``name``: the registered one, or for ``a+b`` a builder of their :class:`Combined`."""
    return _combined_builder(tuple(name.split("+"))) if "+" in name else METHODS.get(name)


def method_info(name: str) -> Dict[str, Any]:
    """Registration metadata; for ``a+b``, ``parts`` and the papers of each."""
    if "+" not in name:
        return METHODS.info(name)
    parts = name.split("+")
    return {"parts": parts, "paper": " + ".join(METHODS.info(p).get("paper", p) for p in parts)}


@functools.lru_cache(maxsize=None)
def _combined_builder(parts: Tuple[str, ...]) -> Callable[..., Method]:
    builders = {part: METHODS.get(part) for part in parts}
    if len(builders) != len(parts) or len(parts) < 2:
        raise ValueError(f"method {'+'.join(parts)!r}: combine two or more different methods")
    provided = [k for k in PROVIDED if any(k in inspect.signature(b).parameters for b in builders.values())]

    def build(**kwargs: Any) -> Method:
        given = {k: kwargs.pop(k) for k in provided if k in kwargs}
        built = {}
        for part, builder in builders.items():
            wanted = inspect.signature(builder).parameters
            built[part] = builder(**(kwargs.get(part) or {}), **{k: v for k, v in given.items() if k in wanted})
        return Combined(built)

    keyword = inspect.Parameter.KEYWORD_ONLY
    build.__signature__ = inspect.Signature([inspect.Parameter(p, keyword, default=None, annotation=Optional[dict])
                                             for p in (*parts, *provided)])
    for flag in ("features", "needs_index"):
        setattr(build, flag, any(getattr(b, flag, False) for b in builders.values()))
    build.needs_teacher = any(METHODS.info(p).get("needs_teacher", getattr(b, "needs_teacher", True))
                              for p, b in builders.items())
    build.views = max(METHODS.info(p).get("views", getattr(b, "views", 1)) for p, b in builders.items())
    return build


# What is not a method of its own but a setting of one, listed under the methods by ``deepkd list methods``.
SETTINGS = (
    "dot          Zhao et al., DOT: A Distillation-Oriented Trainer, ICCV 2023: deepkd_kd (per_sample_weight: true) "
    "under optimizer decoupled, task momentum m - delta, target = non-target m + delta (recipes */dot)",
    "logit_stand  Sun et al., Logit Standardization in Knowledge Distillation, CVPR 2024: logit_stand: true "
    "on every logit method",
    "a+b          methods summed, each term on its own stream: method.name dkd+reviewkd, method.dkd: {...}",
)


def list_methods(pattern: Optional[str] = None) -> List[str]:
    """Sorted registered method names, optionally filtered by a shell pattern (``"deepkd*"``)."""
    return METHODS.names(pattern)
