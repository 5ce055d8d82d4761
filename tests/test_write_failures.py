"""The writer's documented failure paths, tested for real: SIGTERM while the output's data is being written (a real
``capmerge apply`` process, signalled once its temporary file holds data), and the up-front free-space check (the
``os.statvfs`` the writer calls, made to report less room than the output's exact size).

Documented in docs/reliability.md ("Interrupted and killed runs") and docs/architecture.md ("The streaming writer"):
exit 130 and ``error: interrupted; nothing was written`` for a signal; exit 1 (a runtime failure) and
``error: not enough disk space: N bytes needed, F free (OUT)`` for the disk; no output and no temporary either way.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import listing, load_any, save_single, tree_digest

from capmerge.cli import main
from capmerge.io.writer import TMP_MARK

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
def test_sigterm_while_the_output_is_written(tmp_path: Path) -> None:
    """SIGTERM lands after the temporary output holds tensor data (seen on disk, polled every millisecond): exit 130,
    the one line, no output, no temporary; the inputs are unchanged. 3 × 96 MB float32 tensors, so writing takes
    long enough to be caught in the middle even on a fast disk."""
    n = 24 * 1024 * 1024
    g = torch.Generator().manual_seed(0)
    names = [f"layers.{i}.weight" for i in range(3)]
    base = {k: torch.randn(n, generator=g) for k in names}
    vec = {k: torch.randn(n, generator=g) for k in names}
    b = save_single(tmp_path / "in" / "base.safetensors", base)
    v = save_single(tmp_path / "in" / "vec.safetensors", vec)
    del base, vec
    before = tree_digest(tmp_path / "in")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "merged.safetensors"
    cmd = [sys.executable, "-m", "capmerge", "apply", str(b), str(v), "-o", str(out), "-q"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    seen = 0
    deadline = time.monotonic() + 120
    while p.poll() is None and time.monotonic() < deadline:
        tmps = [e for e in os.scandir(out_dir) if TMP_MARK in e.name]
        sizes = [e.stat().st_size for e in tmps if e.is_file()]
        if sizes and max(sizes) > 8 << 20:  # past the header room: data is being written
            seen = max(sizes)
            p.send_signal(signal.SIGTERM)
            break
        time.sleep(0.001)
    out_s, err = p.communicate(timeout=120)
    assert seen, f"the run ended (rc {p.returncode}) before its output held data: {err}"
    assert seen < 3 * 4 * n, seen  # signalled before the data was complete
    assert (p.returncode, err, out_s) == (130, "error: interrupted; nothing was written\n", "")
    assert listing(out_dir) == set()  # no output, no temporary
    assert tree_digest(tmp_path / "in") == before


class _Statvfs:
    """What the writer reads from os.statvfs: free blocks for unprivileged users, and the block size."""

    def __init__(self, free: int) -> None:
        self.f_bavail, self.f_frsize = free, 1


@pytest.mark.parametrize("single", [True, False])
def test_free_space_is_checked_up_front(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str], single: bool) -> None:  # fmt: skip
    """One byte less free space than the output file's size (measured on a real run's output) is refused before any
    data is written, naming OUT; exactly its size is enough. The written file is then what the reference loader
    reads, base + vector."""
    t = {"w": torch.arange(1000, dtype=torch.float32), "b": torch.ones(3, 5)}
    d = {"w": torch.full((1000,), 0.5), "b": torch.full((3, 5), -2.0)}
    b = save_single(tmp_path / "in" / "base.safetensors", t)
    v = save_single(tmp_path / "in" / "vec.safetensors", d)
    name = "m.safetensors" if single else "m"
    ref = tmp_path / "ref" / name
    assert main(["apply", str(b), str(v), "-o", str(ref), "-q"]) == 0, capsys.readouterr().err
    ref_file = ref if single else ref / "model.safetensors"
    size = ref_file.stat().st_size
    assert size > 4 * 1015  # the data alone

    before = tree_digest(tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / name
    monkeypatch.setattr(os, "statvfs", lambda path: _Statvfs(size - 1))
    assert main(["apply", str(b), str(v), "-o", str(out), "-q"]) == 1
    where = out if single else out / "model.safetensors"
    assert capsys.readouterr().err == f"error: not enough disk space: {size} bytes needed, {size - 1} free ({where})\n"
    assert listing(out_dir) == set()  # nothing written, no temporary
    assert tree_digest(tmp_path) == before  # inputs (and the reference output) untouched

    monkeypatch.setattr(os, "statvfs", lambda path: _Statvfs(size))
    assert main(["apply", str(b), str(v), "-o", str(out), "-q"]) == 0, capsys.readouterr().err
    got = load_any(out)
    assert np.array_equal(got["w"].numpy(), np.arange(1000, dtype=np.float32) + np.float32(0.5))
    assert np.array_equal(got["b"].numpy(), np.full((3, 5), -1.0, np.float32))
