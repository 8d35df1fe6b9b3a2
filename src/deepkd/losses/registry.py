"""The method registry: ``@register_method("dkd")`` on a Method class or builder function.

The trainer validates a recipe's method keys against the builder's signature, so builders take
flat, typed keyword-only arguments whose defaults are the reference values.
"""
from __future__ import annotations

from typing import Any, List, Optional

from deepkd.losses.base import Method
from deepkd.registry import Registry

METHODS = Registry("method")


def register_method(name: Optional[str] = None, **info: Any):
    """Decorator registering a method builder (a ``Method`` subclass or a function returning one)."""
    return METHODS.register(name, **info)


def build_method(name: str, **kwargs: Any) -> Method:
    """Build the registered method ``name`` with keyword arguments (a miss names the closest)."""
    return METHODS.build(name, **kwargs)


def list_methods(pattern: Optional[str] = None) -> List[str]:
    """Sorted registered method names, optionally filtered by a shell pattern (``"deepkd*"``)."""
    return METHODS.names(pattern)
