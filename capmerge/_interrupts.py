"""Ctrl-C and SIGTERM while capmerge's threads run: noted by the signal handler, acted on at a safe point.

Python runs a signal handler in the main thread between any two bytecodes. A handler that raises KeyboardInterrupt
there can land inside ``with lock:`` just after the lock was taken and before the block was entered (a queue's
``put``/``get``, a future's ``result``), so the lock is never released; the engine's other threads then wait for it
for ever and the run hangs instead of stopping. So while the main thread runs a threaded region (:func:`deferred`),
a signal only sets a flag (:func:`interrupt`, no lock taken); the threads' polling loops see it (:func:`pending`) and
stop, and KeyboardInterrupt is raised in the main thread once the region has been left, every thread joined.

The capmerge command's own handler (:mod:`capmerge.cli.app`) calls :func:`interrupt`; in a program that imports
capmerge and keeps Python's default SIGINT handler, :func:`deferred` puts a deferring one in place for the region
and gives the default back after it (a handler of the program's own is left alone).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

_STATE = {"depth": 0, "pending": False}


def pending() -> bool:
    """Whether a signal arrived during the current threaded region (read without a lock: any thread may poll it)."""
    return bool(_STATE["pending"])


def interrupt() -> None:
    """For a signal handler: inside a threaded region, note the signal (the region stops at its next safe point);
    outside one, raise KeyboardInterrupt here as Python's default handler does."""
    if _STATE["depth"]:
        _STATE["pending"] = True
        return
    raise KeyboardInterrupt


def _deferring_handler(signum: int, frame: object) -> None:
    interrupt()


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A threaded region run from the main thread: signals are noted, not raised, until it is left; then
    KeyboardInterrupt is raised (in place of the region's own exception, if it raised one). In any other thread a
    no-op: signals are delivered to the main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    outer = _STATE["depth"] == 0
    if outer:
        _STATE["pending"] = False
    _STATE["depth"] += 1  # before the handler is swapped: a signal from here on is noted
    installed = False
    try:
        if outer:  # once swapped, the handler raises nothing while the depth is above 0
            installed = _swap(signal.default_int_handler, _deferring_handler)
        yield
    except BaseException as e:
        if _leave(installed) and not isinstance(e, KeyboardInterrupt):
            raise KeyboardInterrupt from e
        raise
    if _leave(installed):
        raise KeyboardInterrupt


def _swap(old: object, new: object) -> bool:
    """Install ``new`` for SIGINT where ``old`` is the handler; whether it did."""
    with contextlib.suppress(ValueError, TypeError):
        if signal.getsignal(signal.SIGINT) is old:
            signal.signal(signal.SIGINT, new)  # type: ignore[arg-type]
            return True
    return False


def _leave(installed: bool) -> bool:
    """Leave a region; whether a signal arrived in the outermost one (the flag is cleared). The default handler is
    back before the depth drops, so that a signal in between is noted rather than lost."""
    if installed:
        _swap(_deferring_handler, signal.default_int_handler)
    _STATE["depth"] -= 1
    if _STATE["depth"] or not _STATE["pending"]:
        return False
    _STATE["pending"] = False
    return True
