"""The generic pieces of the strict config schema: defaults read from a builder's signature, the
strict base model, and a section whose ``name`` picks its model.

Kept apart from :mod:`deepkd.train.config` so its sections can live in their own modules
(:mod:`deepkd.train.data_config`) without an import circle: this module imports nothing of deepkd.
"""
from __future__ import annotations

import inspect
from typing import Annotated, Any, Callable, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Tag

__all__ = ["_Strict", "_choice", "_default"]


def _default(builder: Callable, name: str) -> Any:
    """The default of ``builder``'s argument ``name``: the one place where it is stated."""
    return inspect.signature(builder).parameters[name].default


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _choice(default: str, *models: type) -> Any:
    """A section whose ``name`` picks one of ``models`` (``default`` when the recipe names none)."""

    def tag(value: Any) -> str:
        return value.get("name", default) if isinstance(value, dict) else getattr(value, "name", default)

    variants = tuple(Annotated[m, Tag(m.model_fields["name"].default)] for m in models)
    return Annotated[Union[variants], Discriminator(tag)]
