"""Ctrl-C (or SIGTERM) while the capmerge command line starts up: one ``error:`` line and exit 130, no traceback.

``import capmerge`` calls :func:`guard` first. In the process of the ``capmerge`` command (the console script, or
``python -m capmerge``) — and only there, so that a program importing capmerge keeps its own signal handling — it
replaces Python's SIGINT handler by one that prints the line and exits at once: until the command's code takes over
(:func:`capmerge.cli.app.main`, which installs a handler that raises KeyboardInterrupt so that partial outputs are
cleaned up), nothing has been written, so there is nothing to clean up. A SIGINT that arrives before Python has run
any of capmerge's code (interpreter start-up, ``site``) is Python's own to report.
"""

from __future__ import annotations

import _signal  # the C module: ``signal`` imports enum, which would widen the window before the guard
import os
import sys

INTERRUPTED = b"error: interrupted; nothing was written\n"
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for a command stopped by Ctrl-C


def on_interrupt(signum: int, frame: object) -> None:
    """SIGINT / SIGTERM during start-up: nothing is written yet; say so and leave (no cleanup to run)."""
    try:
        os.write(2, INTERRUPTED)
    finally:
        os._exit(EXIT_INTERRUPTED)


def is_cli_process() -> bool:
    """Whether this process runs the capmerge command: ``python [options] -m capmerge ...`` or the console
    script (whose ``__main__`` is a file named ``capmerge``)."""
    argv = list(getattr(sys, "orig_argv", []))[1:]
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "-m":
            return argv[i + 1 : i + 2] == ["capmerge"]
        if a.startswith("-m"):
            return a[2:] == "capmerge"
        if a in ("-X", "-W", "--check-hash-based-pycs"):
            i += 2
            continue
        if a == "-c" or not a.startswith("-"):
            break
        i += 1
    main = sys.modules.get("__main__")
    name = os.path.basename(getattr(main, "__file__", None) or "")
    return name in ("capmerge", "capmerge.exe", "capmerge-script.py")


def guard() -> None:
    """Install :func:`on_interrupt` for SIGINT and SIGTERM in the capmerge command's process, where Python's default
    handling is in place (an inherited "ignore", e.g. a background job's, stays)."""
    try:
        if not is_cli_process():
            return
        if _signal.getsignal(_signal.SIGINT) is _signal.default_int_handler:
            _signal.signal(_signal.SIGINT, on_interrupt)
        if _signal.getsignal(_signal.SIGTERM) == _signal.SIG_DFL:
            _signal.signal(_signal.SIGTERM, on_interrupt)
    except (ValueError, OSError, AttributeError):  # not the main thread, or no signals here
        pass
