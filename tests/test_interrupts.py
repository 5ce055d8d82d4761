"""Signals while capmerge's threads run (capmerge._interrupts): noted, acted on once the threads are joined.

The bug it fixes: Python runs a signal handler between any two bytecodes of the main thread, so a KeyboardInterrupt
raised there could land just after a queue's lock was taken (inside ``with lock:``'s ``__enter__``), leaving the lock
held; the engine's reader or writer then waited for it for ever and ``capmerge apply`` hung after SIGTERM instead of
exiting 130. The race test below puts the signal exactly there, again and again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from conftest import listing, save_single

from capmerge import _interrupts

ROOT = Path(__file__).resolve().parents[1]
POSIX = pytest.mark.skipif(os.name != "posix", reason="POSIX signals")


@POSIX
def test_a_signal_in_a_region_is_raised_when_it_is_left() -> None:
    """Python's default SIGINT handling: inside the region the signal only sets the flag (code after it runs), on
    leaving KeyboardInterrupt is raised and the default handler is back; outside, SIGINT raises at once."""
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    after = []
    with pytest.raises(KeyboardInterrupt), _interrupts.deferred():
        assert not _interrupts.pending()
        signal.raise_signal(signal.SIGINT)
        after.append(_interrupts.pending())
    assert after == [True]
    assert not _interrupts.pending()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with pytest.raises(KeyboardInterrupt):
        signal.raise_signal(signal.SIGINT)
    with _interrupts.deferred():  # no signal: nothing raised
        pass


def test_the_signal_takes_the_place_of_the_regions_error() -> None:
    """A region that fails after the signal (a stage stopped by it, say) ends in KeyboardInterrupt, the error as its
    cause; nested regions raise once, at the outermost."""
    with pytest.raises(KeyboardInterrupt) as info, _interrupts.deferred():
        with _interrupts.deferred():
            _interrupts.interrupt()
            assert _interrupts.pending()
        assert _interrupts.pending()  # the inner region did not raise
        raise ValueError("stage failed")
    assert isinstance(info.value.__cause__, ValueError)
    with pytest.raises(KeyboardInterrupt):  # outside any region
        _interrupts.interrupt()


@POSIX
def test_a_programs_own_handler_is_left_alone() -> None:
    seen = []
    previous = signal.signal(signal.SIGINT, lambda s, f: seen.append(s))
    try:
        with _interrupts.deferred():
            signal.raise_signal(signal.SIGINT)
            assert signal.getsignal(signal.SIGINT) is not _interrupts._deferring_handler
        assert seen == [signal.SIGINT]
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_region_outside_the_main_thread_defers_nothing() -> None:
    """Signals reach the main thread only: another thread's region changes nothing."""
    raised = []

    def body() -> None:
        with _interrupts.deferred():
            try:
                _interrupts.interrupt()
            except KeyboardInterrupt:
                raised.append(True)

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert raised == [True] and not _interrupts.pending()


RACE = """
import json, os, signal, sys, threading
import capmerge.merge.engine as engine
from capmerge.cli.app import main
base, vec, out, ks = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
state = {}

def profile(frame, event, arg):
    # right after a lock's __enter__ returned inside threading.Condition.__enter__ (queue get/put, Event, futures)
    if event == "c_return" and getattr(arg, "__name__", "") == "__enter__" and frame.f_code.co_name == "__enter__" \\
            and frame.f_code.co_filename.endswith("threading.py"):
        state["n"] += 1
        if state["n"] == state["k"]:
            state["where"] = frame.f_back.f_code.co_name
            signal.raise_signal(signal.SIGINT)

inner = engine._Pipeline._run
def run(self):
    sys.setprofile(profile)
    try:
        return inner(self)
    finally:
        sys.setprofile(None)
        state["locked"] = [q.mutex.locked() for q in (self.to_compute, self.to_write, self.free_slots, self.free_out)]
engine._Pipeline._run = run
for k in ks:
    state.update(n=0, k=k, where=None)
    code = main(["apply", base, vec, "-o", out, "-q"])
    alive = sorted(t.name for t in threading.enumerate() if t is not threading.main_thread())
    print(json.dumps([k, code, state["where"], state["locked"], alive, os.path.exists(out)]), flush=True)
"""


@POSIX
def test_a_signal_right_after_a_lock_is_taken_stops_the_run(tmp_path: Path) -> None:
    """SIGINT raised in the main thread right after it took a threading lock (the k-th time during ``capmerge apply``,
    k = 1 … 40: queue gets and puts, thread starts, the compute pool): every run exits 130 with nothing written, no
    queue's lock left held, no thread of the run still alive. Before the fix, locks were left held (the runs that
    then needed them hung)."""
    n = 1 << 21
    g = torch.Generator().manual_seed(0)
    b = save_single(tmp_path / "in" / "b.safetensors", {f"l.{i}.w": torch.randn(n, generator=g) for i in range(3)})
    v = save_single(tmp_path / "in" / "v.safetensors", {f"l.{i}.w": torch.randn(n, generator=g) for i in range(3)})
    out = tmp_path / "out" / "m.safetensors"
    out.parent.mkdir()
    ks = [1, 2, 3, 4, 5, 6, 8, 10, 13, 16, 20, 25, 30, 40]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CAPMERGE_THREADS": "2"}
    p = subprocess.run([sys.executable, "-c", RACE, str(b), str(v), str(out), json.dumps(ks)],
                       capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert p.returncode == 0, p.stderr
    rows = [json.loads(line) for line in p.stdout.splitlines()]
    assert [r[0] for r in rows] == ks
    for k, code, where, locked, alive, written in rows:
        assert (code, locked, alive, written) == (130, [False] * 4, [], False), (k, where)
    assert any(r[2] in ("get", "put") for r in rows), rows  # the signal did land inside a queue's operations
    assert p.stderr.count("error: interrupted; nothing was written") == len(ks)
    assert listing(out.parent) == set()


@POSIX
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_signal_after_the_command_finished_changes_nothing(tmp_path: Path, sig: str) -> None:
    """The command line's process once its command is done (here a usage error, exit 2): a signal that arrives while
    Python shuts down neither kills it (SIGTERM's default would, exit -15) nor changes its exit code."""
    script = (
        "import os, signal, sys\n"
        "from capmerge.cli.app import main\n"
        "sys.argv = ['capmerge', 'merge', 'missing-model', '--method', 'ties', '-o', 'out']\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as e:\n"
        f"    os.kill(os.getpid(), signal.{sig})\n"
        "    raise\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path,
                       timeout=120)  # fmt: skip
    assert p.returncode == 2, p.stderr
    assert p.stderr.startswith("error: ") and p.stderr.count("\n") == 1, p.stderr
    assert listing(tmp_path) == set()
