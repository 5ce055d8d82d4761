"""The ``capmerge`` command line: a Typer app, one small module per command group.

Known errors become one line on stderr — ``error: <what> (<file or tensor>)`` — and exit code 2 (bad input)
or 1 (runtime failure); ``CAPMERGE_DEBUG=1`` shows the traceback instead. Heavy imports happen inside commands.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import sys
from collections.abc import Iterator
from typing import Any

import typer

from capmerge import _interrupts
from capmerge.cli.helptext import Group

HELP = """Model merging by weight arithmetic: capability vectors, streamed tensor by tensor.

Examples:

  capmerge diff sft/ aux/ -o capvector.safetensors          # τ = aux − sft

  capmerge apply pretrained/ capvector.safetensors -o meta/ --alpha 0.5   # θ = θ_pre + 0.5·τ

  capmerge merge A/ B/ --method linear --weights 0.7,0.3 -o merged/       # models merged (mergekit's methods)
"""

app = typer.Typer(
    name="capmerge",
    cls=Group,  # conventional placeholders (BASE, VECTOR..., FLOAT) and markup-safe help on every command
    rich_markup_mode="rich",
    help=HELP,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _debug() -> bool:
    return os.environ.get("CAPMERGE_DEBUG", "") not in ("", "0")


def fail(message: str, code: int = 2) -> typer.Exit:
    print(f"error: {message}", file=sys.stderr)
    return typer.Exit(code)


@contextlib.contextmanager
def handle_errors() -> Iterator[None]:
    """Turn known errors into one ``error:`` line and an exit code; tracebacks only with CAPMERGE_DEBUG=1."""
    from capmerge.errors import CapmergeError

    try:
        yield
    except CapmergeError as e:
        if _debug():
            raise
        raise fail(str(e), e.exit_code) from None
    except KeyboardInterrupt:
        if _debug():
            raise
        _INTERRUPT["reported"] = True
        raise fail("interrupted; nothing was written", 130) from None
    except MemoryError:
        if _debug():
            raise
        raise fail("out of memory", 1) from None
    except OSError as e:
        if _debug():
            raise
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        raise fail(f"{e.strerror or e}{where}", 1) from None


def _print_version(value: bool) -> None:
    if value:
        from capmerge._version import __version__

        print(f"capmerge {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", help="Print the version and exit.", is_eager=True, callback=_print_version
    ),
) -> None:
    """Model merging by weight arithmetic."""


_ARGV: list[str] = []


def command_line() -> str:
    """The command line being run (``capmerge diff ...``), shell-quoted: recorded in outputs' metadata."""
    import shlex

    return shlex.join(["capmerge", *_ARGV])


# Ctrl-C / SIGTERM while a command runs: KeyboardInterrupt (outputs clean up on the way out), then one line, exit
# 130, wherever it landed — in a command (handle_errors reports it), or in the parser, which swallows it into a silent
# exit 130 (reported here).
_INTERRUPT = {"seen": False, "reported": False}


def _interrupt(signum: int, frame: object) -> None:
    _INTERRUPT["seen"] = True
    _interrupts.interrupt()  # raises here, or at the end of a threaded region (the engine's run)


def _unraisable(unraisable: Any) -> None:
    """sys.unraisablehook while a command runs: a Ctrl-C that lands inside a finalizer or a weakref callback (thread
    pools collect their threads through one) would be printed as "Exception ignored … Traceback" and then lost, the
    command running on; it is signalled again instead, so that the command's own code stops at its next step."""
    if isinstance(unraisable.exc_value, KeyboardInterrupt) or unraisable.exc_type is KeyboardInterrupt:
        import _thread
        import threading
        import time

        def again() -> None:  # from another thread, once this hook has returned: the handler then runs in the
            time.sleep(0.001)  # interrupted code, at its next step
            _thread.interrupt_main()

        threading.Thread(target=again, daemon=True).start()
        return
    sys.__unraisablehook__(unraisable)


def _interrupted() -> int:
    if not _INTERRUPT["reported"]:
        _INTERRUPT["reported"] = True
        print("error: interrupted; nothing was written", file=sys.stderr)
    return 130


def main(argv: list[str] | None = None) -> int:
    """Console entry point (exits the process when ``argv`` is None, returns the exit code otherwise)."""
    from capmerge import _startup

    code: int | None = None
    previous = {}
    try:
        _INTERRUPT.update(seen=False, reported=False)
        with contextlib.suppress(ValueError):  # not in the main thread
            for sig in (signal.SIGINT, signal.SIGTERM):
                handler = signal.getsignal(sig)
                if handler in (signal.default_int_handler, signal.SIG_DFL, _startup.on_interrupt):
                    previous[sig] = handler
                    signal.signal(sig, _interrupt)
        hook, sys.unraisablehook = sys.unraisablehook, _unraisable
        try:
            code = _run(argv)
        finally:
            sys.unraisablehook = hook
        if argv is None:  # done: a late Ctrl-C or SIGTERM changes nothing (Python would restore SIGTERM's default
            with contextlib.suppress(ValueError):  # while it shuts down, and die by it instead of exiting with code)
                for sig in (signal.SIGINT, signal.SIGTERM):
                    signal.signal(sig, signal.SIG_IGN)
    except KeyboardInterrupt:
        if _debug():
            raise
        if code is None:
            code = _interrupted()
    finally:
        if argv is not None:  # called in-process: leave the caller's handlers as they were
            for sig, handler in previous.items():
                with contextlib.suppress(ValueError, TypeError):
                    signal.signal(sig, handler)
    if code == 130 and _INTERRUPT["seen"]:
        _interrupted()
        if argv is None:
            # Leave at once: what was written is removed already, and Python would otherwise turn an interrupt that
            # some C extension's embedded code saw during an import into a death by SIGINT after this line.
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os._exit(130)
    if argv is None:
        # the objects still alive (torch's modules above all) are left to the process's end: Python's collections
        # while it shuts down would otherwise walk all of them (a third of a second after every command using torch)
        gc.freeze()
        sys.exit(code)
    return code


def _run(argv: list[str] | None) -> int:
    """Usage errors of the parser are reported as one ``error:`` line too (exit 2)."""
    _ARGV[:] = sys.argv[1:] if argv is None else list(argv)
    try:
        rv = app(args=argv, prog_name="capmerge", standalone_mode=False)
    except Exception as e:
        if _debug():
            raise
        if type(e).__name__ == "NoArgsIsHelpError":  # a bare `capmerge`/`capmerge recipes`: the help, no error line
            text = e.format_message().strip()  # type: ignore[attr-defined]  # empty when rich printed the help
            if text:
                print(text, file=sys.stderr)
            return 2
        if hasattr(e, "format_message") and hasattr(e, "exit_code"):  # the CLI parser's usage errors
            print(f"error: {e.format_message()}{_param_hint(e)}", file=sys.stderr)
            return int(getattr(e, "exit_code", 2) or 2)
        print(f"error: {unexpected(e)}", file=sys.stderr)
        return 1
    return rv if isinstance(rv, int) else 0


def _param_hint(e: BaseException) -> str:
    """For ``capmerge merge --max-iter 3``: the method parameter that the unknown option names, and how to set it."""
    option = getattr(e, "option_name", None)
    if type(e).__name__ != "NoSuchOption" or not option or _ARGV[:1] != ["merge"]:
        return ""
    from capmerge.merge.methods.registry import MODEL_METHODS

    name = option.lstrip("-").replace("-", "_")
    if not any(name in m.params or name in m.model_params for m in MODEL_METHODS.values()):
        return ""
    return f" ({name} is a method parameter without an option of its own: --param {name}=VALUE)"


def unexpected(e: BaseException) -> str:
    """The one line for an exception no part of capmerge turned into a message: what went wrong in words, and
    what was being run on which inputs (a bug to report, with the traceback CAPMERGE_DEBUG=1 shows)."""
    import re

    first = " ".join((str(e).strip().splitlines() or [""])[0].split())
    if isinstance(e, RecursionError):
        words = "an input is nested too deeply to process"
    elif isinstance(e, ValueError) and "digits" in first and "integer" in first:
        words = "an input holds an integer with more than 4300 digits"
    elif isinstance(e, ZeroDivisionError):
        words = "a division by zero"
    elif isinstance(e, OverflowError):
        words = f"a number too large to handle ({first})" if first else "a number too large to handle"
    elif isinstance(e, re.error):
        words = f"an invalid regular expression ({first})"
    elif isinstance(e, IndexError | KeyError):
        words = f"a lookup of an item that is not there ({first})" if first else "a lookup of an item that is not there"
    else:
        words = first or "a failure without a message"
    if len(words) > 300:
        words = words[:299] + "…"
    command = next((a for a in _ARGV if not a.startswith("-")), "")
    inputs = [a if len(a) <= 80 else a[:79] + "…" for a in _ARGV[1:] if not a.startswith("-") and os.path.exists(a)]
    on = f" on {', '.join(inputs[:4])}{', ...' if len(inputs) > 4 else ''}" if inputs else ""
    kind = type(e).__qualname__ if type(e).__module__ == "builtins" else f"{type(e).__module__}.{type(e).__qualname__}"
    return (f"unexpected failure in `capmerge {command}`{on}: {words} [{kind}; CAPMERGE_DEBUG=1 shows the traceback; "
            "please report it]")  # fmt: skip
