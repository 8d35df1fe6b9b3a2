"""The recipe side of ``optimizer.stream_momentum: auto`` (:mod:`deepkd.optim.auto_momentum`).

The ``auto_momentum`` section and the checks that :class:`deepkd.train.optim_config.DecoupledConfig`
inherits from :class:`AutoMomentumChecks`. Defaults are :class:`deepkd.optim.GSNRMomentum`'s
signature, the one place they are stated.
"""
from __future__ import annotations

import inspect
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from deepkd.optim import GSNRMomentum
from deepkd.optim.auto_momentum import INVARIANTS

_DEFAULTS = {name: p.default for name, p in inspect.signature(GSNRMomentum).parameters.items()}


class AutoMomentumConfig(BaseModel):
    """``optimizer.auto_momentum``: :class:`deepkd.optim.GSNRMomentum`'s settings (read only with
    ``stream_momentum: auto``). Coefficients lie in ``[mu - delta, mu + delta]``, within ``[0, 1)``."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    mu: float = Field(_DEFAULTS["mu"], gt=0, lt=1)
    delta: float = Field(_DEFAULTS["delta"], ge=0)
    smoothing: float = Field(_DEFAULTS["smoothing"], ge=0, lt=1)
    min_log_range: float = Field(_DEFAULTS["min_log_range"], ge=0)
    every: int = Field(_DEFAULTS["every"], gt=0)
    samples: int = Field(_DEFAULTS["samples"], gt=1)
    invariant: Literal[INVARIANTS] = _DEFAULTS["invariant"]

    @model_validator(mode="after")
    def _check_interval(self) -> "AutoMomentumConfig":
        GSNRMomentum(**self.model_dump())  # mu - delta >= 0 and mu + delta < 1
        return self


class AutoMomentumChecks(BaseModel):
    """Validators of the ``decoupled`` optimizer section for ``stream_momentum: auto``: the rule's
    defaults are written out, one buffer per stream (``merge_equal: false``: a change of coefficients
    cannot split a shared buffer exactly), and ``auto_momentum`` without ``auto`` is an error."""

    @model_validator(mode="before")
    @classmethod
    def _auto_defaults(cls, data: Any) -> Any:
        momentum = data.get("stream_momentum") if isinstance(data, dict) else None
        if isinstance(momentum, str) and momentum != "auto":
            raise ValueError(f"stream_momentum is 'auto' or {{stream: coefficient}}, got {momentum!r}")
        if momentum == "auto":
            return {**data, "auto_momentum": data.get("auto_momentum") or {},
                    "merge_equal": data.get("merge_equal", False)}
        return data

    @model_validator(mode="after")
    def _check_auto(self) -> Any:
        auto = self.stream_momentum == "auto"
        if not auto and self.auto_momentum is not None:
            raise ValueError("auto_momentum is read only with stream_momentum: auto; remove it or set "
                             "stream_momentum: auto")
        if auto and self.merge_equal:
            raise ValueError("stream_momentum: auto changes the coefficients during training, which a buffer "
                             "shared by equal coefficients cannot follow exactly: set merge_equal: false")
        return self
