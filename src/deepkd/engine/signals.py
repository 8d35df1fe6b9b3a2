"""Stopping on a signal: Ctrl-C, SIGTERM and SIGUSR1 end a run after the current step, saved.

The loop of :mod:`deepkd.engine.loop` (every task) asks :meth:`StopSignals.agreed` at its sync points
and, when it says stop, saves ``last.pt`` and returns "stopped" (``deepkd`` then exits 0).
"""
from __future__ import annotations

import signal
from typing import Any, Dict, Optional

import torch

from deepkd.engine.distributed import all_reduce_sum


class StopSignals:
    """Ctrl-C, SIGTERM and SIGUSR1 (what SLURM and Kubernetes send before a kill) set a flag; the
    loop then saves ``last.pt`` at the current step and returns "stopped" (``deepkd`` exits 0). A
    second signal aborts at once (KeyboardInterrupt; a checkpoint being written is left intact).

    Several ranks agree to stop with one all-reduce of the flag at each step that already waits for
    the device (every ``train.log_every`` steps, checkpoint steps, an epoch's last batch), so all
    stop after the same step; a rank stopping alone would block the others in their next
    all-reduce. The grace period before the kill (SLURM's KillWait, Kubernetes'
    terminationGracePeriodSeconds: 30 s by default) must cover ``log_every`` steps and one save.
    """

    SIGNALS = ("SIGINT", "SIGTERM", "SIGUSR1")

    def __init__(self):
        self.reason: Optional[str] = None
        self._previous: Dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.reason is not None

    def __enter__(self):
        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.reason = signal.Signals(signum).name

        try:
            for name in self.SIGNALS:
                if hasattr(signal, name):  # no SIGUSR1 on Windows
                    number = getattr(signal, name)
                    self._previous[number] = signal.signal(number, handler)
        except ValueError:  # not the main thread: leave the signals alone
            pass
        return self

    def __exit__(self, *exc):
        for number, previous in self._previous.items():
            signal.signal(number, previous)
        return False

    def agreed(self, run, sync_point: bool) -> bool:
        """Whether every rank stops after this step (see the class docstring); ``run`` has ``ctx`` and
        ``device``."""
        if not run.ctx.enabled:
            return self.requested
        if not sync_point:
            return False
        stopping = bool(all_reduce_sum(torch.tensor(float(self.requested), device=run.device), run.ctx) > 0)
        if stopping and self.reason is None:
            self.reason = "a signal to another rank"
        return stopping
