"""The ``method`` section of a recipe: the method's ``name`` and its own keyword arguments, checked
against the method builder's signature (whose defaults are the method's), and what the registry
says of a method (:func:`method_needs_teacher`, :func:`method_views`, :func:`is_deepkd_method`).
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Dict

from pydantic import BaseModel, ConfigDict, model_validator

from deepkd.registry import closest

__all__ = ["MethodConfig", "is_deepkd_method", "method_features", "method_needs_teacher", "method_reads_detectors",
           "method_views"]


def _method_builder(name: str) -> Callable:
    from deepkd.losses import registry

    try:
        return registry.method_builder(name)
    except KeyError as err:
        raise ValueError(str(err).strip('"')) from None


def method_needs_teacher(name: str) -> bool:
    """Registry metadata ``needs_teacher``, else the Method class attribute (a builder function: True)."""
    from deepkd.losses import registry

    builder = _method_builder(name)
    return registry.method_info(name).get("needs_teacher", getattr(builder, "needs_teacher", True))


def method_views(name: str) -> int:
    """Views per training image the method takes: 2 for MLKD/CRLD (weak, strong), else 1."""
    from deepkd.losses import registry

    return registry.method_info(name).get("views", getattr(_method_builder(name), "views", 1))


def method_features(name: str) -> bool:
    """A feature method: it reads the models' intermediate features (``Method.features``)."""
    return bool(getattr(_method_builder(name), "features", False))


def method_reads_detectors(name: str) -> bool:
    """Every feature part of the method can read a detector's backbone levels (registered with
    ``detection=True``: reviewkd's ``fpn: true``); a logit method reads the RoI logits."""
    from deepkd.losses import registry

    return all(registry.METHODS.info(part).get("detection", False) for part in name.split("+") if method_features(part))


def is_deepkd_method(name: str) -> bool:
    """A DeepKD method: registered with its ``base`` method, or taking the base as an argument; a
    combined method with a DeepKD part."""
    from deepkd.losses import registry

    if "+" in name:
        _method_builder(name)
        return any(is_deepkd_method(part) for part in name.split("+"))
    return "base" in registry.METHODS.info(name) or "base" in inspect.signature(_method_builder(name)).parameters


class MethodConfig(BaseModel):
    """``name`` plus the method's own keyword arguments, checked against its builder signature.

    The dynamic top-k mask's ``topk_*`` arguments need ``topk: true``, and ``topk: true`` needs an
    explicit ``topk_ramp_end`` (the epoch from which NCKD keeps every class; no default fits every
    schedule).
    """

    model_config = ConfigDict(extra="allow")
    name: str = "ce"

    @model_validator(mode="after")
    def _check_arguments(self) -> "MethodConfig":
        from deepkd.losses.base import PROVIDED

        params = inspect.signature(_method_builder(self.name)).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        valid = [n for n, p in params.items() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        if "+" in self.name:
            self._check_parts()
        for key in self.arguments():
            if key in PROVIDED:
                raise ValueError(f"method.{key} is set by the trainer from the models and the data: "
                                 "remove it from the recipe")
            if not takes_any and key not in valid:
                hint = closest(key, valid + ["name"])
                near = f"; did you mean {hint[0]!r}?" if hint else ""
                raise ValueError(f"method {self.name!r} has no argument {key!r}{near}")
        self._check_topk()
        return self

    def _check_parts(self) -> None:
        """A combined method's ``method.<part>`` sections: mappings, each checked as that part's own section."""
        for part in self.name.split("+"):
            section = self.arguments().get(part) or {}
            if not isinstance(section, dict):
                raise ValueError(f"method.{part} must be a mapping of {part}'s arguments, not {section!r}")
            try:
                MethodConfig(name=part, **section)
            except ValueError as err:
                raise ValueError(f"method.{part}: {_message(err)}") from None

    def _check_topk(self) -> None:
        arguments, defaults = self.arguments(), _signature_defaults(self.name)
        if arguments.get("topk"):
            if arguments.get("topk_ramp_end") is None:
                raise ValueError("topk is on but topk_ramp_end is not set: give the epoch from which "
                                 "NCKD keeps every class (deepkd's choice: the first LR decay, e.g. 150 on CIFAR-100)")
            return
        ramp = [k for k in arguments if k.startswith("topk_") and arguments[k] != defaults.get(k)]
        if ramp:
            raise ValueError(f"{ramp[0]} is set but topk is off: set method.topk: true or remove it")

    def arguments(self) -> Dict[str, Any]:
        """The keyword arguments passed to the method builder."""
        return dict(self.model_extra or {})

    def resolved_arguments(self) -> Dict[str, Any]:
        """The builder's named arguments with their signature defaults, overridden by the recipe's."""
        return {**_signature_defaults(self.name), **self.arguments()}


def _message(err: ValueError) -> str:
    """The sentence of a nested section's validation error (pydantic wraps it)."""
    errors = getattr(err, "errors", None)
    return str(errors()[0]["msg"]).removeprefix("Value error, ") if callable(errors) else str(err)


def _signature_defaults(name: str) -> Dict[str, Any]:
    from deepkd.losses.base import PROVIDED

    params = inspect.signature(_method_builder(name)).parameters.values()
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty and p.name not in PROVIDED}
