"""SIGTERM handled as Ctrl-C, for the commands that write files or start processes.

``timeout``, ``kill``, systemd and container runtimes stop a process with SIGTERM, whose default action ends
it on the spot: an export's temporary engine directory (gigabytes) and a benchmark's scratch folder and worker
processes would stay behind. Inside :func:`sigterm_as_interrupt` SIGTERM raises :class:`Terminated`, a
KeyboardInterrupt, so the cleanup that already runs for Ctrl-C (``except BaseException``, ``finally``) runs
for it too. A command opts in with the :func:`terminate_as_interrupt` decorator; one that handles SIGTERM
itself (a server that drains its requests) leaves it off.
"""

from __future__ import annotations

import functools
import signal
import threading
from contextlib import contextmanager
from typing import Callable, Iterator, TypeVar

F = TypeVar("F", bound=Callable)


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived while :func:`sigterm_as_interrupt` was active."""

    signum = signal.SIGTERM


def _raise_terminated(signum, frame):
    # The cleanup now unwinding must finish: a second SIGTERM meanwhile is ignored (SIGKILL still ends it).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated()


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While the block runs, SIGTERM raises :class:`Terminated` in the main thread; the previous handler is
    put back afterwards. Outside the main thread (where Python cannot install handlers) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def terminate_as_interrupt(command: F) -> F:
    """Decorate a command so that SIGTERM cleans up after it as Ctrl-C does (see :func:`sigterm_as_interrupt`)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        with sigterm_as_interrupt():
            return command(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
