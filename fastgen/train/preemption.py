"""Preemption notices: a signal (SIGTERM, SIGUSR1) asks the run to save and stop cleanly.

A cluster that reclaims a node sends a notice first (SLURM's ``--signal``, Kubernetes'
SIGTERM before SIGKILL). The first notice is only recorded; the loop reads it between
iterations, finishes the update under way, writes a checkpoint and stops with
:class:`Preempted`, which the ``fastgen`` command turns into exit status
:data:`EXIT_PREEMPTED` for a requeue script. A second notice ends the process at once (by that
signal's default action): the last published checkpoint is whole either way.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from types import FrameType

__all__ = ["EXIT_PREEMPTED", "Preempted", "PreemptionNotice"]

EXIT_PREEMPTED = 75
"""Exit status of a run stopped by a preemption notice after saving (``EX_TEMPFAIL``: try
again); a requeue script reruns the same command on it."""


class Preempted(Exception):
    """The run saved a checkpoint after a preemption notice and stopped.

    Attributes:
        signal: The signal's name, e.g. ``"SIGTERM"``.
        step: The iterations done (the checkpoint's step).
        checkpoint: The checkpoint written.
    """

    def __init__(self, signal: str, step: int, checkpoint: Path) -> None:
        super().__init__(
            f"stopped by {signal} after iteration {step}; saved {checkpoint}; rerun the same "
            "command to resume"
        )
        self.signal, self.step, self.checkpoint = signal, step, checkpoint


class PreemptionNotice:
    """Installs handlers for ``signals`` while entered; :attr:`received` names the first one.

    Handlers can only be installed from the main thread: elsewhere this does nothing (the
    signals keep their handlers).

    Args:
        signals: Signal names, e.g. ``("SIGTERM", "SIGUSR1")``.

    Example:
        >>> with PreemptionNotice(("SIGUSR1",)) as notice:
        ...     os.kill(os.getpid(), signal.SIGUSR1)
        ...     notice.received
        'SIGUSR1'
    """

    def __init__(self, signals: tuple[str, ...] | list[str]) -> None:
        self.signals = tuple(signals)
        self.received: str | None = None
        self._before: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:  # a second notice: go now, by the signal's own default
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = signal.Signals(signum).name

    def __enter__(self) -> PreemptionNotice:
        if threading.current_thread() is threading.main_thread():
            for name in self.signals:
                signum = getattr(signal, name)
                self._before[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._before.items():
            signal.signal(signum, handler)
        self._before.clear()
