"""The lazy checkpoint view: what it accepts, and that opening reads headers only."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import save_sharded, save_single

from capmerge.io.open import open_checkpoint


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
