"""The lazy checkpoint view: what it accepts, and that opening reads headers only."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import save_sharded, save_single

from capmerge.checkpoint import open_checkpoint


def _rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar")


def test_accepted_references(tmp_path: Path) -> None:
    t = {"a": torch.ones(3), "b": torch.zeros(2, 2, dtype=torch.bfloat16)}
    f = save_single(tmp_path / "m" / "model.safetensors", t)
    d = save_sharded(tmp_path / "s", t, 2)
    for ref in (f, f.parent, d, d / "model.safetensors.index.json"):
        ck = open_checkpoint(ref)
        assert set(ck.tensors) == {"a", "b"}
        assert ck.tensors["b"].shape == (2, 2) and ck.tensors["b"].dtype == "BF16"
        assert torch.equal(ck.read_tensor("b"), t["b"])
    assert open_checkpoint(d).sharded and open_checkpoint(f.parent).root == str(f.parent)
    assert open_checkpoint(f).root is None


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux /proc/self/io to count bytes read")
def test_opening_reads_headers_only(tmp_path: Path) -> None:
    big = save_single(tmp_path / "big.safetensors", {f"w{i}": torch.zeros(2_000_000) for i in range(8)})  # 64 MB
    before = _rchar()
    ck = open_checkpoint(big)
    fp = ck.fingerprint()
    read = _rchar() - before
    assert len(ck.tensors) == 8 and fp.startswith("sha256:")
    assert read < 64 * 1024, f"opening read {read} bytes"


def test_fingerprint_changes_with_header_only(tmp_path: Path) -> None:
    a = save_single(tmp_path / "a.safetensors", {"w": torch.ones(3)})
    b = save_single(tmp_path / "b.safetensors", {"w": torch.zeros(3)})  # same header, other data
    c = save_single(tmp_path / "c.safetensors", {"w": torch.ones(4)})
    fa, fb, fc = (open_checkpoint(p).fingerprint() for p in (a, b, c))
    assert fa != fc and fb != fc  # the name of the file is part of it, the header too


def test_pickle_files_open_lazily(tmp_path: Path) -> None:
    p = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.ones(1)}, p)
    ck = open_checkpoint(p)
    assert list(ck.tensors) == ["w"] and torch.equal(ck.read_tensor("w"), torch.ones(1))


def test_map_range_views_the_same_bytes_without_reading(tmp_path: Path) -> None:
    """The threshold pass maps ranges instead of copying them: same bytes as read_into at unaligned offsets, and
    None (so the copying path reports the error) when the file shrank after opening."""
    g = torch.Generator().manual_seed(0)
    t = {"a": torch.randn(3), "w": torch.randn(70_001, generator=g).to(torch.bfloat16)}
    f = save_single(tmp_path / "m.safetensors", t)
    ck = open_checkpoint(f)
    info = ck.tensors["w"]
    raw = t["w"].view(torch.int16).numpy().tobytes()
    for off, n in ((0, info.nbytes), (2, 10), (8190, 4098), (info.nbytes - 6, 6)):
        view = ck.map_range(info, off, n)
        assert view is not None and bytes(view) == raw[off : off + n]
        buf = bytearray(n)
        ck.read_into(info, off, memoryview(buf))
        assert bytes(buf) == raw[off : off + n]
    with open(f, "r+b") as fh:
        fh.truncate(info.start + 100)
    assert ck.map_range(info, 0, info.nbytes) is None
    ck.close()
