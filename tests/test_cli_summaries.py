"""Summaries that tell the truth: inspect's kind, the bytes read, diff's outputs, --base with dense inputs.

The files inspected are written by the real `capmerge diff`, `apply` and `compress`; byte counts are checked
against the safetensors files themselves (file size − 8-byte length − header) and against what the process read
(``rchar``).
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any

import pytest
from conftest import rchar, tree_digest
from safetensors import safe_open
from typer.testing import CliRunner

import capmerge
from capmerge.cli import app, main

runner = CliRunner()


def data_bytes(path: Path) -> int:
    """Bytes of tensor data in a safetensors file, or in every safetensors file of a directory."""
    path = Path(path)
    if path.is_dir():
        return sum(data_bytes(p) for p in sorted(path.glob("*.safetensors")))
    raw = path.read_bytes()
    return len(raw) - 8 - struct.unpack("<Q", raw[:8])[0]


def int_bytes(path: Path) -> int:
    """Bytes of the non-floating tensors (never read by diff) of a safetensors file, from its raw header."""
    raw = Path(path).read_bytes()
    header = json.loads(raw[8 : 8 + struct.unpack("<Q", raw[:8])[0]])
    return sum(e["data_offsets"][1] - e["data_offsets"][0] for k, e in header.items()
               if k != "__metadata__" and (e["dtype"][0] in "IU" or e["dtype"] == "BOOL"))  # fmt: skip


class Recorder:
    """A progress callback as the CLI's progress bar gets it: the total first, then the bytes done so far."""

    def __init__(self) -> None:
        self.total: int | None = None
        self.done: list[int] = []

    def set_total(self, total_bytes: int, total_tensors: int) -> None:
        self.total = total_bytes

    def __call__(self, done_bytes: int, tensors: int) -> None:
        self.done.append(done_bytes)


def _run(args: list[str]) -> Any:
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.stderr
    return r


# -- 1. inspect shows the header's kind ------------------------------------------------------------------------------
def test_inspect_shows_the_kind_written_by_diff_apply_compress(ckpts: dict[str, Path]) -> None:
    tmp = ckpts["tmp"]
    v, m = tmp / "v.safetensors", tmp / "M"
    _run(["diff", str(ckpts["S"]), str(ckpts["A"]), "-o", str(v), "-q"])
    _run(["apply", str(ckpts["P"]), str(v), "-o", str(m), "-q"])
    _run(["compress", str(v), "-o", str(tmp / "lr.safetensors"), "--rank", "2", "-q"])
    _run(["compress", str(v), "-o", str(tmp / "sp.safetensors"), "--density", "0.5", "--bits", "8", "-q"])
    want = {  # (kind, storage, what the table's first line says)
        v: ("capability-vector", "dense", "kind: capability-vector"),
        m: ("merged", "dense", "kind: merged"),
        tmp / "lr.safetensors": ("capability-vector", "lowrank", "kind: capability-vector (low-rank)"),
        tmp / "sp.safetensors": ("capability-vector", "sparse", "kind: capability-vector (sparse)"),
        ckpts["S"]: ("checkpoint", "dense", "kind: checkpoint"),  # a file capmerge did not write
    }
    for path, (kind, storage, line) in want.items():
        first = next(path.glob("*.safetensors")) if path.is_dir() else path
        with safe_open(str(first), "pt") as f:  # what the header itself says
            assert (f.metadata() or {}).get("capmerge.kind", "checkpoint") == kind
        r = _run(["inspect", str(path), "--headers-only", "--json"])
        (inp,) = json.loads(r.stdout)["inputs"]
        assert (inp["kind"], inp["storage"]) == (kind, storage), path
        r = _run(["inspect", str(path), "--headers-only"])
        assert re.search(rf"{re.escape(str(path))}\s+{re.escape(line)}\n", r.stdout), r.stdout


def test_inspect_prints_a_path_with_brackets_verbatim(ckpts: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ckpts["tmp"])  # short paths: the table titles that hold them are not wrapped
    odd = Path("run[") / "x][bold]" / "v.safetensors"  # the path holds "[/x]" and "[bold]"
    odd.parent.mkdir(parents=True)
    odd.write_bytes(Path(ckpts["A"]).read_bytes())
    r = _run(["inspect", str(odd), "--headers-only"])
    assert f"{odd}  kind: checkpoint" in r.stdout
    r = _run(["inspect", str(odd), "--against", str(odd)])  # table titles hold the paths too
    assert f"a = {odd}" in r.stdout and f"b = {odd}" in r.stdout


# -- 2. the progress bar and the summary count the same bytes, the bytes actually read --------------------------------
def test_diff_reads_each_input_tensor_once(ckpts: dict[str, Path]) -> None:
    rec = Recorder()
    s = capmerge.diff(ckpts["S"], ckpts["A"], ckpts["tmp"] / "v.safetensors", progress=rec)
    # every floating tensor of both files (the integer position_ids is skipped, never read)
    want = sum(data_bytes(p) - int_bytes(p) for p in (ckpts["S"], ckpts["A"]))
    assert s.bytes_read == want and s.bytes_reread == 0
    assert rec.total == want and rec.done[-1] == want and rec.done == sorted(rec.done)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_apply_read_bytes_match_the_inputs_and_the_process(ckpts: dict[str, Path], method: str) -> None:
    tmp = ckpts["tmp"]
    v1, v2 = tmp / "v1.safetensors", tmp / "v2.safetensors"
    capmerge.diff(ckpts["S"], ckpts["A"], v1)
    capmerge.diff(ckpts["A"], ckpts["S"], v2, dtype="float32")
    opts: dict[str, Any] = {"method": method, "density": [0.5]} if method == "ties" else {}
    capmerge.apply(ckpts["P"], [v1, v2], tmp / "warm.safetensors", **opts)  # lazy imports happen here
    rec = Recorder()
    before = rchar()
    s = capmerge.apply(ckpts["P"], [v1, v2], tmp / "m.safetensors", progress=rec, **opts)
    read = rchar() - before
    want = data_bytes(ckpts["P"]) + data_bytes(v1) + data_bytes(v2)  # every tensor of every input, once
    assert s.bytes_read == want and rec.total == want and rec.done[-1] == want
    assert (s.bytes_reread > 0) == (method == "ties")  # the pruning thresholds read the vectors again
    headers = sum(Path(p).stat().st_size for p in (*Path(ckpts["P"]).glob("*"), v1, v2)) - want
    assert s.bytes_read + s.bytes_reread <= read <= s.bytes_read + s.bytes_reread + headers + 65536, read


def test_a_compressed_vector_is_read_as_stored(ckpts: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    tmp = ckpts["tmp"]
    capmerge.diff(ckpts["S"], ckpts["A"], tmp / "v.safetensors")
    capmerge.compress(tmp / "v.safetensors", tmp / "lr.safetensors", rank=2)
    rec = Recorder()
    s = capmerge.apply(ckpts["P"], [tmp / "lr.safetensors"], tmp / "m.safetensors", progress=rec)
    want = data_bytes(ckpts["P"]) + data_bytes(tmp / "lr.safetensors")  # the factors, not the dense view
    assert s.bytes_read == rec.total == rec.done[-1] == want
    # the CLI's summary line prints the same figure
    assert main(["apply", str(ckpts["P"]), str(tmp / "lr.safetensors"), "-o", str(tmp / "m2.safetensors")]) == 0
    assert f"read {want / 1e9:.2f} GB, wrote" in capsys.readouterr().err


# -- 3. diff --json lists its outputs, as apply --json does ----------------------------------------------------------
@pytest.mark.parametrize("sharded", [False, True])
def test_diff_json_lists_its_outputs(ckpts: dict[str, Path], sharded: bool) -> None:
    tmp = ckpts["tmp"]
    out = tmp / ("vdir" if sharded else "v.safetensors")
    extra = ["--shard-size", "4KB"] if sharded else []
    d = json.loads(_run(["diff", str(ckpts["S"]), str(ckpts["A"]), "-o", str(out), "--json", "-q", *extra]).stdout)
    assert d["outputs"] == [str(out)]
    if sharded:
        assert sorted(d["files"]) == sorted(p.name for p in out.iterdir()) and len(d["files"]) >= 3
        assert d["bytes_written"] == sum(p.stat().st_size for p in out.iterdir())
    else:
        assert d["files"] == [out.name] and d["bytes_written"] == out.stat().st_size
    a = json.loads(_run(["apply", str(ckpts["P"]), str(out), "-o", str(tmp / "m.safetensors"), "--json", "-q"]).stdout)
    assert a["outputs"] == [str(tmp / "m.safetensors")]  # the same shape of answer


# -- 4. diff --base with dense inputs is an error --------------------------------------------------------------------
def test_diff_base_with_dense_inputs_is_an_error(ckpts: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    tmp = ckpts["tmp"]
    before = tree_digest(tmp)
    out = tmp / "v.safetensors"
    code = main(["diff", str(ckpts["S"]), str(ckpts["A"]), "-o", str(out), "--base", str(ckpts["P"])])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: --base is the base model of two LoRA adapters")
    assert err.endswith(f"drop --base) ({ckpts['P']})\n")
    assert not out.exists() and tree_digest(tmp) == before
