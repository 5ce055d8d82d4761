"""Reads through memory maps (Checkpoint.map_tensor): the engine's merge and statistics passes view the inputs'
files instead of copying them. The views hold the file's bytes, any window size gives the same output, and a file
shorter than its header says is read (and refused) the copying way."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch
from conftest import load_any, save_sharded, save_single

import capmerge
from capmerge.io import checkpoint as C
from capmerge.io.open import open_checkpoint
from capmerge.merge import engine
from capmerge.merge.modelmerge import MergeSpec, SourceSpec, run_merge


def _odd_tensors(seed: int) -> dict[str, torch.Tensor]:
    """Tensors of odd lengths and dtypes, so that most start at offsets that are not page-aligned."""
    g = torch.Generator().manual_seed(seed)
    return {
        "a": torch.randn(3, generator=g).bfloat16(),
        "b": torch.randn(70_001, generator=g),
        "c": torch.randn(9_999, generator=g).half(),
        "d": torch.randn(123_457, generator=g).bfloat16(),
    }


@pytest.mark.parametrize("window", [1, 4096, 65_537, 1 << 24])
def test_map_views_hold_the_files_bytes(tmp_path: Path, window: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Views of random byte ranges (within a window, across windows, backwards) equal what read_into copies."""
    monkeypatch.setattr(C, "MAP_WINDOW", window)
    ck = open_checkpoint(save_single(tmp_path / "m.safetensors", _odd_tensors(1)))
    rng = random.Random(window)
    for info in ck.tensors.values():
        m = ck.map_tensor(info)
        assert m is not None
        for _ in range(40):
            s = rng.randrange(info.nbytes)
            e = rng.randrange(s, info.nbytes + 1)
            want = bytearray(e - s)
            ck.read_into(info, s, memoryview(want))
            assert m.view(s, e) == want, (info.name, s, e)
        m.close()


def test_a_file_shorter_than_its_header_is_not_mapped(tmp_path: Path) -> None:
    """A tensor past the end of its file (cut short after it was opened) gets no map — a map would fault on it — so
    the copying read reports it; opened afresh, the file is refused up front."""
    path = save_single(tmp_path / "m.safetensors", {"w": torch.arange(64, dtype=torch.float32)})
    ck = open_checkpoint(path)
    os.truncate(path, path.stat().st_size - 16)
    assert ck.map_tensor(ck.tensors["w"]) is None
    with pytest.raises(capmerge.CapmergeError, match="unexpected end of file while reading tensor w"):
        ck.read_tensor("w")
    with pytest.raises(capmerge.CapmergeError, match="truncated data"):
        capmerge.apply(path, path, tmp_path / "o.safetensors", alpha=0.5)
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize("maps", [(False, False), (True, False), (False, True)])
def test_outputs_do_not_depend_on_how_inputs_are_read(tmp_path: Path, maps: tuple[bool, bool],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """ties over models (statistics pass + merge) and apply's ties over τ_i = M_i − P give the same bytes whether
    the passes map the files (small windows: many per tensor) or copy them."""
    monkeypatch.setattr(C, "MAP_WINDOW", 8192)
    g = torch.Generator().manual_seed(3)
    base = {k: v for k, v in _odd_tensors(2).items() if k != "a"}
    models = []
    for i in range(3):
        m = {k: (v.float() + torch.randn(v.shape, generator=g) * 0.01).to(v.dtype) for k, v in base.items()}
        models.append(save_sharded(tmp_path / f"M{i}", m))
    p = save_sharded(tmp_path / "P", base)
    outs = {}
    for label, (reads, prepare) in (("mapped", (True, True)), ("other", maps)):
        monkeypatch.setattr(engine, "MAP_READS", reads)
        monkeypatch.setattr(engine, "MAP_PREPARE", prepare)
        sources = [SourceSpec(str(m), {"weight": 0.4, "density": 0.3}) for m in models]
        run_merge(MergeSpec("ties", models=sources, base=str(p)), str(tmp_path / f"ties-{label}"), force=True)
        capmerge.apply(p, output=tmp_path / f"apply-{label}.safetensors", add=models, sub=[p] * 3, method="ties",
                       density=0.3, force=True)  # fmt: skip
        outs[label] = (load_any(tmp_path / f"ties-{label}"), load_any(tmp_path / f"apply-{label}.safetensors"))
    for a, b in zip(outs["mapped"], outs["other"], strict=True):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k


def test_prepare_passes_overlap_and_give_one_threads_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The prepare passes run on PREPARERS threads: the first tensor's pass is still running when the second's
    begins (it waits for it, up to 30 s), never more than PREPARE_AHEAD at once, and the output is the bytes of one
    preparer thread's run."""
    import threading

    g = torch.Generator().manual_seed(5)
    base = {f"t{i}": torch.randn(4099 + i, generator=g).bfloat16() for i in range(6)}
    models = []
    for i in range(3):
        m = {k: (v.float() + torch.randn(v.shape, generator=g) * 0.01).to(v.dtype) for k, v in base.items()}
        models.append(save_sharded(tmp_path / f"M{i}", m))
    p = save_sharded(tmp_path / "P", base)
    sources = [SourceSpec(str(m), {"weight": 0.4, "density": 0.3}) for m in models]
    original = engine._Pipeline._prepare
    running, most, lock, second = [0], [0], threading.Lock(), threading.Event()
    waited: list[bool] = []

    def prepare(self: engine._Pipeline, job: engine.Job) -> None:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
            first = not waited
            if first:
                waited.append(False)
            else:
                second.set()
        if first:
            waited[0] = second.wait(30)
        try:
            original(self, job)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(engine._Pipeline, "_prepare", prepare)
    run_merge(MergeSpec("ties", models=sources, base=str(p)), str(tmp_path / "two"), force=True)
    assert waited == [True] and most[0] == engine.PREPARE_AHEAD == 2
    monkeypatch.setattr(engine._Pipeline, "_prepare", original)
    monkeypatch.setattr(engine, "PREPARERS", 1)
    run_merge(MergeSpec("ties", models=sources, base=str(p)), str(tmp_path / "one"), force=True)
    two, one = load_any(tmp_path / "two"), load_any(tmp_path / "one")
    assert two.keys() == one.keys() == set(base)
    for k in one:
        assert torch.equal(two[k], one[k]), k
