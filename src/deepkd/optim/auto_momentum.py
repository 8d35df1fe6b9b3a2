"""Momentum coefficients from the streams' measured GSNR (``optimizer.stream_momentum: auto``).

METHODS.md 4.1 motivates DeepKD's coefficients by the gradient signal-to-noise ratio of each stream
(``GSNR_j = E[g_j]^2 / Var[g_j]`` over per-sample gradients, averaged over parameter elements j):
"the best momentum of a stream grows with its GSNR", and the target stream has the lowest GSNR, hence
the paper's rule ``task mu + delta, target mu - delta, non_target mu + delta``. No formula maps GSNR to
a coefficient; :class:`GSNRMomentum` is deepkd's rule (not the paper's, nor the reference code's):

1. Every ``every`` optimizer steps the trainer measures each stream's GSNR g_k (on ``samples``
   samples of the current batch, :func:`deepkd.optim.gsnr`) and calls :meth:`GSNRMomentum.update`.
2. Smoothing: an exponential moving average of log GSNR per stream,
   ``s_k = log g_k`` at the stream's first measurement, then
   ``s_k = smoothing * s_k + (1 - smoothing) * log g_k``.
3. Mapping, over the streams that have an average (``lo``/``hi``: their lowest/highest ``s``)::

       r   = max(hi - lo, min_log_range)
       m_k = mu + delta * ((s_k - lo) - (hi - s_k)) / r     (m_k = mu for every stream when r = 0)

   With ``min_log_range = 0`` (default) the stream of highest smoothed log-GSNR gets ``mu + delta``,
   the lowest ``mu - delta``, and a stream in between is interpolated linearly in log-GSNR; with the
   paper's ordering (target lowest) and task and non-target GSNR equal it is the paper's rule
   exactly, otherwise the middle stream lies between. ``min_log_range > 0`` makes near-ties continuous:
   log-GSNRs spanning less than it get momenta proportionally closer to ``mu``.

4. Coefficients from the units ``u_k`` of step 3 (``u_k = (m_k - mu) / delta``, in ``[-1, 1]``),
   by ``invariant``:

   - ``"mean_step"`` (default): a stream with momentum m moves ``lr / (1 - m)`` per step in steady
     state, so the step multipliers ``a_k = 1 / (1 - m_k)`` are what matter. They are spread
     geometrically by the units and rescaled so that their mean is SGD's at the same lr::

         a_k = (1 / (1 - mu)) * exp(u_k * L / 2) / mean_j exp(u_j * L / 2)
         L   = log((1 - mu + delta) / (1 - mu - delta))    (log 7 for the paper's 0.9 +- 0.075)
         m_k = 1 - 1 / a_k                                  (clamped at 0)

     The highest and lowest streams' steps differ by the same factor as those of ``mu + delta`` and
     ``mu - delta`` (7x), but the streams' mean step is that of SGD with momentum ``mu``: a learning
     rate tuned for SGD stays in range whatever the GSNRs say. (The paper's ordering, target lowest and
     the others tied, gives task = non_target 0.9286, target 0.5.)
   - ``"interval"`` (deepkd <= 0.1's rule): ``m_k = mu + delta u_k`` in ``[mu - delta, mu + delta]``.
     It always spreads the coefficients over the whole interval, so the mean step grows with the
     number of high-GSNR streams (x1.75 SGD's at the paper's ordering, x3 with two streams at
     ``mu + delta``): the study found it needs a smaller lr than SGD.

Why this form: monotone (a higher GSNR never gets a lower momentum, the paper's one claim); bounded
steps (``mean_step``: the streams' mean steady-state step ``lr / (1 - m)`` is SGD's, and their spread is
the paper's interval's 7x; ``interval``: every coefficient in ``[mu - delta, mu + delta]``); log-GSNR because GSNRs of
different streams differ by orders of magnitude and drift over training, and only their ratios are
compared (multiplying every GSNR by a constant changes nothing).

Missing values: a GSNR that is not a finite positive number (NaN: the stream is absent from the
method's loss, or every per-sample gradient of it is the same; 0 or inf: degenerate) or a stream
absent from the measurement leaves that stream's average as it was. A stream with no average yet is
left out of ``lo``/``hi`` and keeps its initial coefficient. Exact ties get equal coefficients (all
``mu`` when every measured stream ties).

Initial coefficients (before the first measurement): the units of the paper's rule
(:data:`PAPER_SIGN`; 0 for a stream it does not name) through step 4, so a run whose measured
ordering is the paper's stays close to it.

Buffers: :meth:`deepkd.optim.DecoupledMomentumSGD.set_momentum` cannot split a buffer shared by
streams of equal coefficient exactly, and this rule changes coefficients (and ties) during training;
the trainer therefore builds the optimizer with ``merge_equal=False``: one buffer per stream, so a
change of coefficients is exact (at the cost of one gradient pass per stream on every step).
"""
from __future__ import annotations

import math
from typing import Dict, Mapping, Optional, Sequence

PAPER_SIGN = {"task": 1.0, "target": -1.0, "non_target": 1.0}  # the paper's rule: mu + sign * delta
STREAMS = tuple(PAPER_SIGN)
INVARIANTS = ("mean_step", "interval")


class GSNRMomentum:
    """Per-stream momentum coefficients from smoothed log-GSNR (the module docstring has the rule).

    Args:
        mu: the centre of the interval (the paper's 0.9).
        delta: half its width (the paper's 0.075): coefficients lie in ``[mu - delta, mu + delta]``,
            which must lie within ``[0, 1)``.
        smoothing: EMA factor of log GSNR in ``[0, 1)`` (0: the last measurement alone).
        min_log_range: the log-GSNR range that spans the whole interval at least (``>= 0``).
        every: optimizer steps between measurements (the paper measures every 200 iterations).
        samples: samples of the batch the GSNR is measured on (per-sample gradients; ``>= 2``).
        streams: the stream names (the optimizer's).
        invariant: ``"mean_step"`` (the streams' mean steady-state step is SGD's with momentum ``mu``)
            or ``"interval"`` (coefficients spread over ``[mu - delta, mu + delta]``); step 4 above.
    """

    def __init__(self, mu: float = 0.9, delta: float = 0.075, smoothing: float = 0.9,
                 min_log_range: float = 0.0, every: int = 200, samples: int = 32,
                 invariant: str = "mean_step", *, streams: Sequence[str] = STREAMS):
        if not (delta >= 0 and 0 <= mu - delta and mu + delta < 1):
            raise ValueError(f"mu - delta and mu + delta (momentum coefficients) must lie in [0, 1) with delta >= 0, "
                             f"got mu={mu}, delta={delta}")
        if not 0 <= smoothing < 1:
            raise ValueError(f"smoothing must lie in [0, 1), got {smoothing}")
        if not min_log_range >= 0:
            raise ValueError(f"min_log_range must be >= 0, got {min_log_range}")
        if every < 1 or samples < 2:
            raise ValueError(f"every must be >= 1 and samples >= 2, got every={every}, samples={samples}")
        if invariant not in INVARIANTS:
            raise ValueError(f"invariant must be one of {list(INVARIANTS)}, got {invariant!r}")
        if not streams or len(set(streams)) != len(streams):
            raise ValueError(f"the stream names must be distinct and at least one, got {list(streams)}")
        self.mu, self.delta, self.smoothing, self.min_log_range = float(mu), float(delta), float(smoothing), \
            float(min_log_range)
        self.every, self.samples, self.streams = int(every), int(samples), tuple(streams)
        self.invariant = invariant
        self.smoothed: Dict[str, float] = {}  # EMA of log GSNR of the streams measured so far
        self.measurements = 0

    def due(self, step: int) -> bool:
        """Whether the trainer measures after optimizer step ``step`` (1-based, counted over the run)."""
        return step % self.every == 0

    def initial(self) -> Dict[str, float]:
        """The coefficients before any measurement: the paper's rule (``mu`` for other stream names)."""
        return self._coefficients({k: PAPER_SIGN.get(k, 0.0) for k in self.streams})

    def momenta(self) -> Dict[str, float]:
        """The coefficients of the current averages (the paper's units for streams without an average)."""
        units = {k: PAPER_SIGN.get(k, 0.0) for k in self.streams}
        if self.smoothed:
            lo, hi = min(self.smoothed.values()), max(self.smoothed.values())
            span = max(hi - lo, self.min_log_range)
            for stream, value in self.smoothed.items():
                # (s - lo) - (hi - s) over the span: exactly -1 at lo and +1 at hi when span = hi - lo
                units[stream] = ((value - lo) - (hi - value)) / span if span > 0 else 0.0
        return self._coefficients(units)

    def _coefficients(self, units: Mapping[str, float]) -> Dict[str, float]:
        """Step 4 of the module docstring: units in [-1, 1] -> coefficients."""
        if self.invariant == "interval":
            low, high = self.mu - self.delta, self.mu + self.delta
            return {k: min(max(self.mu + self.delta * u, low), high) for k, u in units.items()}
        half = 0.5 * math.log((1 - self.mu + self.delta) / (1 - self.mu - self.delta))
        spread = {k: math.exp(u * half) for k, u in units.items()}
        scale = (1 / (1 - self.mu)) / (sum(spread.values()) / len(spread))
        return {k: max(1 - 1 / (scale * v), 0.0) for k, v in spread.items()}

    def update(self, gsnr: Mapping[str, Optional[float]]) -> Dict[str, float]:
        """Fold one measurement ``{stream: GSNR}`` into the averages; returns the new coefficients."""
        unknown = set(gsnr) - set(self.streams)
        if unknown:
            raise ValueError(f"GSNR of streams {sorted(unknown)} that have no momentum (streams: {list(self.streams)})")
        for stream in self.streams:
            value = gsnr.get(stream)
            if value is None or not math.isfinite(value) or value <= 0:
                continue  # no measurement: the average stays as it was
            log = math.log(value)
            old = self.smoothed.get(stream)
            self.smoothed[stream] = log if old is None else self.smoothing * old + (1 - self.smoothing) * log
        self.measurements += 1
        return self.momenta()

    def state_dict(self) -> Dict[str, object]:
        """Plain data (checkpoint-safe): the averages and the number of measurements."""
        return {"smoothed": dict(self.smoothed), "measurements": self.measurements}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        smoothed = dict(state["smoothed"])
        unknown = set(smoothed) - set(self.streams)
        if unknown:
            raise ValueError(f"auto-momentum state holds streams {sorted(unknown)} not among {list(self.streams)}")
        self.smoothed = {k: float(v) for k, v in smoothed.items()}
        self.measurements = int(state["measurements"])
