"""How a command stops on Ctrl-C or SIGTERM (`kill`, `timeout`, `docker stop`, a cloud's
preemption notice): as on Ctrl-C, by a ``KeyboardInterrupt``, so that runs end KILLED with their
last checkpoint kept and half-written files are removed; then the process ends by the signal that
stopped it.

During training (from its first step to the end of the fit) the first signal stops it between
steps, not inside one; a second stops at once. An exception raised from a signal handler lands
wherever the main thread is, inside a library's hand-over to its own threads too: there it once
left TensorBoard's event writer thread unwoken, and the stop hung in the logger's close for up to
the writer's 120 s flush interval. Lightning acts on its own SIGTERM the same way, between steps.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys

_stopping_signal: int | None = None
_stops_wait_for_a_step_boundary = False


def install() -> None:
    """Stop the command on SIGTERM as on Ctrl-C, and end it by that signal."""
    # Left alone, Python would die at once on SIGTERM outside a fit, and inside one Lightning's
    # own handler would end the run KILLED and the process with status 0.
    signal.signal(signal.SIGTERM, _stop)
    # Ctrl-C too, so that the command ends by whichever signal stopped it; not where Ctrl-C is
    # ignored, as in a job a script started with &.
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _stop)
    # Registered before torch, Lightning and MLflow are imported, so it runs after their handlers.
    atexit.register(_end_by_the_stopping_signal)


def _stop(signum: int, frame: object) -> None:
    global _stopping_signal
    first = _stopping_signal is None
    _stopping_signal = signum
    # Nothing is printed here: a write from a signal handler can land inside another write.
    if first and _stops_wait_for_a_step_boundary:
        return
    raise KeyboardInterrupt


def wait_for_step_boundaries(waiting: bool) -> None:
    """From now on (``waiting``), a first stop signal waits for :func:`stop_if_asked`."""
    global _stops_wait_for_a_step_boundary
    _stops_wait_for_a_step_boundary = waiting


def stop_if_asked() -> None:
    """Stop here if a signal asked for a stop: a safe point, between two steps."""
    if _stopping_signal is not None:
        raise KeyboardInterrupt


def _end_by_the_stopping_signal() -> None:
    """End a stopped command by its signal, as Python ends on a Ctrl-C that nothing caught.

    A shell tells a command that stopped on a signal from one that exited: bash stops a loop of
    commands on Ctrl-C only when the command ended by the signal, and after an exit status of 1
    it starts the next one. Click exits with status 1, and under ``python -m`` (as ``mlflow run``
    runs the project) CPython ended some stopped commands by SIGINT anyway, depending on where
    the interrupt landed.
    """
    if _stopping_signal is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    signal.signal(_stopping_signal, signal.SIG_DFL)
    os.kill(os.getpid(), _stopping_signal)
