"""Validation with errors for people: :func:`validate_config` builds a :class:`RunConfig` and turns
pydantic's errors into one :class:`~deepkd.errors.ConfigError` sentence per error. A misspelled key
at any depth names the closest valid key; a key of another choice of a ``name``-picked section
names the choice that uses it; an unknown ``name`` names the closest choice.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

from pydantic import BaseModel, Tag, ValidationError

from deepkd.errors import ConfigError
from deepkd.registry import closest
from deepkd.train.run_config import RunConfig

__all__ = ["validate_config"]


def _models(annotation: Any) -> Dict[str, type]:
    """``{tag or class name: model}`` of the models a field may hold (a model, an optional one, a tagged union)."""
    found: Dict[str, type] = {}
    for candidate in (annotation, *getattr(annotation, "__args__", ())):
        tags = [m.tag for m in getattr(candidate, "__metadata__", ()) if isinstance(m, Tag)]
        inner = candidate.__origin__ if tags else candidate
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            found[tags[0] if tags else inner.__name__] = inner
    return found


def _walk(loc: Sequence[Any]) -> Tuple[List[str], Dict[str, type], Optional[str]]:
    """An error location as (key path without union tags, the choices of its last section, their tag)."""
    path: List[str] = []
    choices, tag = _models(RunConfig), None
    parts = [str(p) for p in loc]
    while parts:
        part = parts.pop(0)
        path.append(part)
        model = choices[tag] if tag in choices else next(iter(choices.values()))
        field = model.model_fields.get(part)
        if field is None or not _models(field.annotation):
            return path + parts, choices, tag
        choices = _models(field.annotation)
        tag = parts.pop(0) if len(choices) > 1 and parts else None
    return path, choices, tag


def _describe(error: Dict[str, Any]) -> str:
    path, choices, tag = _walk(error["loc"])
    where = ".".join(path)
    if error["type"] == "extra_forbidden":
        section, key = ".".join(path[:-1]), path[-1]
        users = [name for name, model in choices.items() if key in model.model_fields]
        if tag is not None and users:
            return f"{section} {tag!r} does not use {where} (only {', '.join(map(repr, users))})"
        fields = (choices[tag] if tag in choices else next(iter(choices.values()))).model_fields
        hint = closest(key, list(fields))
        return f"unknown key {where!r}" + (f"; did you mean {'.'.join(path[:-1] + [hint[0]])!r}?" if hint else "")
    if error["type"] == "union_tag_invalid":
        hint = closest(str(error["ctx"]["tag"]), list(choices))
        near = f"; did you mean {hint[0]!r}?" if hint else ""
        return f"{where}.name {error['ctx']['tag']!r} is not one of {error['ctx']['expected_tags']}{near}"
    message = error["msg"].removeprefix("Value error, ")
    return f"{where}: {message}" if where else message


def validate_config(raw: Dict[str, Any], source: str = "config") -> RunConfig:
    """Build a :class:`RunConfig` from plain data, turning schema errors into :class:`ConfigError`."""
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        lines = [_describe(e) for e in err.errors()]
        raise ConfigError(f"{source}: " + "; ".join(lines)) from None
