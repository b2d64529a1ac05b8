"""Graceful stops: SIGTERM, SIGINT and SIGUSR1 end a run at a step boundary, after a save.

Clusters preempt jobs with SIGTERM (SLURM, Kubernetes, spot instances; SLURM's
``--signal=USR1@SECONDS`` warns with SIGUSR1), people with Ctrl-C. While a run trains,
:class:`StopSignals` replaces the handlers of these signals (main thread only; the previous
handlers come back afterwards). A handler only records the first signal; the loop finishes the
step in progress, saves the full training state (mid-epoch) and raises
:class:`~flatlab.errors.Interrupted`: exit status 143 (SIGTERM, SIGUSR1) or 130 (SIGINT). Any
further signal, during the save too, is recorded and ignored, so nothing is cut short halfway;
every write is atomic besides.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

STOP_SIGNALS: tuple[signal.Signals, ...] = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1") if hasattr(signal, name))


class StopSignals:
    """The first stop signal received while :meth:`installed` is active (``None`` until then)."""

    def __init__(self) -> None:
        self.received: int | None = None

    @property
    def requested(self) -> bool:
        return self.received is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else ""

    @property
    def exit_code(self) -> int:
        """130 for SIGINT (what a shell reports after Ctrl-C), else 143 (as after SIGTERM)."""
        return 130 if self.received == signal.SIGINT else 143

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopSignals]:
        """Record stop signals instead of dying of them; off a main thread, do nothing (Python
        delivers signals to the main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {}
        try:
            for signum in STOP_SIGNALS:
                previous[signum] = signal.signal(signum, self._record)
            yield self
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)

    def _record(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum
