"""The generic pieces of the strict config schema: defaults read from a builder's signature, the
strict base model, and a section whose ``name`` picks its model.

Kept apart so that each section can live in its own module (:mod:`deepkd.train.data_config`,
:mod:`deepkd.train.optim_config`, :mod:`deepkd.train.run_config`) without an import circle: this
module imports nothing of deepkd.
"""
from __future__ import annotations

import inspect
from typing import Annotated, Any, Callable, Dict, Tuple, Union

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


def check_used_keys(section: BaseModel, table: Dict[str, Tuple[str, ...]]) -> None:
    """Refuse the keys set in a data section that its dataset does not read (``section.used_keys()``),
    naming the datasets of ``table`` (dataset -> its keys) that do read them."""
    unused = [k for k in type(section).model_fields if k in section.model_fields_set and k not in section.used_keys()]
    if unused:
        users = {k: ", ".join(d for d, keys in table.items() if k in keys) for k in unused}
        raise ValueError(f"dataset {section.dataset!r} does not use "
                         + ", ".join(f"data.{k} (only {users[k]})" for k in unused))
