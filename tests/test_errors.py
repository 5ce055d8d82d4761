"""Every bad input: one `error:` line naming the file/tensor, exit code 2, nothing written, inputs untouched."""

from __future__ import annotations

import json
import os
import resource
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import listing, save_sharded, save_single, tree_digest
from typer.testing import CliRunner

import capmerge
from capmerge.cli import app
from capmerge.errors import CapmergeError, CheckpointError, MismatchError, OutputExistsError

runner = CliRunner()


def run_cli(args: list[str]) -> tuple[int, str, str]:
    r = runner.invoke(app, [str(a) for a in args])
    return r.exit_code, r.stdout, r.stderr


def check_error(tmp: Path, args: list, expect: str, where: str | None = None, code: int = 2) -> str:
    """Run the CLI, assert one error line (containing `expect` and `where`) and that nothing changed on disk."""
    before = tree_digest(tmp)
    rc, out, err = run_cli(args)
    assert rc == code, (rc, out, err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expect in lines[0], lines[0]
    if where is not None:
        assert f"({where}" in lines[0] or where in lines[0], lines[0]
    assert "Traceback" not in err + out
    assert tree_digest(tmp) == before, "files changed"
    return lines[0]


def raw_file(path: Path, header: dict | bytes, data: bytes = b"", length: int | None = None) -> Path:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h) if length is None else length) + h + data)
    return path


@pytest.fixture
def good(tmp_path: Path) -> Path:
    return save_single(tmp_path / "good.safetensors", {"w": torch.ones(4), "b": torch.zeros(2)})


def test_nonexistent_path(tmp_path: Path, good: Path) -> None:
    check_error(tmp_path, ["diff", tmp_path / "nope", good, "-o", tmp_path / "v.safetensors"],
                "no such file or directory", str(tmp_path / "nope"))  # fmt: skip


def test_directory_without_weights(tmp_path: Path, good: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    check_error(tmp_path, ["diff", tmp_path / "empty", good, "-o", tmp_path / "v.safetensors"],
                "no weights in directory", str(tmp_path / "empty"))  # fmt: skip


def test_garbage_file(tmp_path: Path, good: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(os.urandom(4096))
    check_error(tmp_path, ["diff", good, bad, "-o", tmp_path / "v.safetensors"], "not a safetensors file", str(bad))


def test_header_length_larger_than_file(tmp_path: Path, good: Path) -> None:
    bad = raw_file(tmp_path / "bad.safetensors", {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
                   b"\0\0\0\0", length=10_000)  # fmt: skip
    check_error(tmp_path, ["apply", bad, good, "-o", tmp_path / "o.safetensors"], "header length field", str(bad))


def test_truncated_data(tmp_path: Path, good: Path) -> None:
    bad = tmp_path / "trunc.safetensors"
    data = good.read_bytes()
    bad.write_bytes(data[:-3])
    check_error(tmp_path, ["diff", good, bad, "-o", tmp_path / "v.safetensors"], "truncated data", str(bad))


def test_overlapping_offsets(tmp_path: Path, good: Path) -> None:
    hdr = {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
           "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}  # fmt: skip
    bad = raw_file(tmp_path / "ov.safetensors", hdr, bytes(16))
    check_error(tmp_path, ["diff", good, bad, "-o", tmp_path / "v.safetensors"], "overlapping data_offsets", str(bad))


def test_out_of_range_offsets(tmp_path: Path, good: Path) -> None:
    hdr = {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
           "b": {"dtype": "F32", "shape": [2], "data_offsets": [100, 108]}}  # fmt: skip
    bad = raw_file(tmp_path / "oor.safetensors", hdr, bytes(24))
    check_error(tmp_path, ["diff", good, bad, "-o", tmp_path / "v.safetensors"], "past the end of the file", str(bad))


def test_offsets_not_matching_shape(tmp_path: Path, good: Path) -> None:
    hdr = {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}
    bad = raw_file(tmp_path / "sh.safetensors", hdr, bytes(12))
    check_error(tmp_path, ["diff", good, bad, "-o", tmp_path / "v.safetensors"], "do not match its shape", str(bad))


def test_index_names_missing_shard(tmp_path: Path, good: Path) -> None:
    d = save_sharded(tmp_path / "sh", {"w": torch.ones(4), "b": torch.zeros(2)}, 2)
    (d / "model-00002-of-00002.safetensors").unlink()
    check_error(tmp_path, ["diff", good, d, "-o", tmp_path / "v.safetensors"],
                "index names a shard that does not exist: model-00002-of-00002.safetensors")  # fmt: skip


def test_tensor_missing_from_its_shard(tmp_path: Path, good: Path) -> None:
    d = save_sharded(tmp_path / "sh", {"w": torch.ones(4), "b": torch.zeros(2)}, 2)
    idx = d / "model.safetensors.index.json"
    data = json.loads(idx.read_text())
    data["weight_map"]["ghost"] = "model-00001-of-00002.safetensors"
    idx.write_text(json.dumps(data))
    check_error(tmp_path, ["diff", good, idx, "-o", tmp_path / "v.safetensors"],
                "tensor ghost is missing from its shard", "model-00001-of-00002.safetensors")  # fmt: skip


def test_ambiguous_directories(tmp_path: Path, good: Path) -> None:
    d = tmp_path / "two"
    save_sharded(d, {"w": torch.ones(4)}, 1, prefix="model")
    save_sharded(d, {"w": torch.ones(4)}, 1, prefix="other")
    msg = check_error(tmp_path, ["diff", good, d, "-o", tmp_path / "v.safetensors"], "several weight sets")
    assert "model.safetensors.index.json" in msg and "other.safetensors.index.json" in msg
    odd = tmp_path / "odd"
    save_single(odd / "weights_a.safetensors", {"w": torch.ones(4)})
    msg = check_error(tmp_path, ["diff", good, odd, "-o", tmp_path / "v.safetensors"], "pass the file to use")
    assert "weights_a.safetensors" in msg


def test_name_mismatch_lists_names(tmp_path: Path, good: Path) -> None:
    other = save_single(tmp_path / "o.safetensors", {"w": torch.ones(4), **{f"x{i}": torch.ones(1) for i in range(12)}})
    msg = check_error(tmp_path, ["diff", good, other, "-o", tmp_path / "v.safetensors"], "tensor names differ")
    assert "1 only in BASE (b)" in msg and "12 only in AUX (x0, x1" in msg and ", ...)" in msg
    assert "--allow-missing" in msg


def test_shape_mismatch(tmp_path: Path, good: Path) -> None:
    other = save_single(tmp_path / "o.safetensors", {"w": torch.ones(5), "b": torch.zeros(2)})
    msg = check_error(tmp_path, ["diff", good, other, "-o", tmp_path / "v.safetensors"], "shape mismatch", "w")
    assert "[4]" in msg and "[5]" in msg
    check_error(tmp_path, ["apply", good, other, "-o", tmp_path / "m.safetensors"], "shape mismatch", "w")
    # --allow-missing does not excuse a shape mismatch in diff
    check_error(tmp_path, ["diff", good, other, "-o", tmp_path / "v.safetensors", "--allow-missing"], "shape mismatch")


def test_vector_tensor_not_in_base(tmp_path: Path, good: Path) -> None:
    vec = save_single(tmp_path / "v.safetensors", {"w": torch.full((4,), 0.1), "extra": torch.ones(1)})
    check_error(tmp_path, ["apply", good, vec, "-o", tmp_path / "m.safetensors"], "1 only in the vector (extra)",
                str(vec))  # fmt: skip


def test_output_exists_and_force(tmp_path: Path, good: Path) -> None:
    aux = save_single(tmp_path / "aux.safetensors", {"w": torch.full((4,), 3.0), "b": torch.zeros(2)})
    out = tmp_path / "v.safetensors"
    out.write_bytes(b"old")
    check_error(tmp_path, ["diff", good, aux, "-o", out], "output exists; pass --force", str(out))
    rc, _, err = run_cli(["diff", good, aux, "-o", out, "--force", "-q"])
    assert rc == 0, err
    assert capmerge.load_vector(out)["w"].tolist() == [2.0] * 4
    # a directory output is replaced as a whole
    d = tmp_path / "vd"
    d.mkdir()
    (d / "stale.txt").write_text("stale")
    check_error(tmp_path, ["diff", good, aux, "-o", d], "output exists", str(d))
    rc, _, err = run_cli(["diff", good, aux, "-o", d, "--force", "-q"])
    assert rc == 0, err
    assert listing(d) == {"capvector.safetensors"}
    assert not [p for p in listing(tmp_path) if "capmerge-" in p]


def test_output_is_an_input(tmp_path: Path, good: Path) -> None:
    aux = save_single(tmp_path / "aux.safetensors", {"w": torch.full((4,), 3.0), "b": torch.zeros(2)})
    check_error(tmp_path, ["diff", good, aux, "-o", aux, "--force"], "output is one of the inputs")
    d = save_sharded(tmp_path / "model", {"w": torch.ones(4), "b": torch.zeros(2)}, 2)
    check_error(tmp_path, ["apply", d, aux, "-o", d / "merged", "--force"], "output is inside the input directory")
    check_error(tmp_path, ["apply", d, aux, "-o", d, "--force"], "output directory contains the input")
    check_error(tmp_path, ["apply", good, aux, "-o", tmp_path, "--force"], "output directory contains the input")


def test_fp16_overflow_is_an_error(tmp_path: Path) -> None:
    b = save_single(tmp_path / "b.safetensors", {"w": torch.tensor([60000.0, 1.0], dtype=torch.float16)})
    a = save_single(tmp_path / "a.safetensors", {"w": torch.tensor([-60000.0, 2.0], dtype=torch.float16)})
    check_error(tmp_path, ["diff", b, a, "-o", tmp_path / "v.safetensors"], "NaN/Inf where the inputs were finite", "w")
    v = save_single(tmp_path / "v.safetensors", {"w": torch.tensor([1e38, 0.0])})
    p = save_single(tmp_path / "p.safetensors", {"w": torch.tensor([3e38, 0.0])})
    check_error(tmp_path, ["apply", p, v, "-o", tmp_path / "o.safetensors", "--alpha", "2"], "--allow-nonfinite")


def test_usage_errors_are_one_line(tmp_path: Path, good: Path) -> None:
    check_error(tmp_path, ["diff", good, good, "--dtype", "int8", "-o", tmp_path / "v.safetensors"], "invalid dtype")
    check_error(tmp_path, ["diff", good, good, "--shard-size", "lots", "-o", tmp_path / "v"], "invalid size")
    check_error(tmp_path, ["diff", good, good, "--include", "(", "-o", tmp_path / "v.safetensors"], "invalid --include")
    check_error(tmp_path, ["apply", good, good], "missing option -o/--output")


def test_usage_error_through_entry_point(tmp_path: Path, good: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "capmerge", "diff", str(good), "--bogus"], capture_output=True,
                       text=True)  # fmt: skip
    assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "--bogus" in r.stderr


def test_debug_shows_traceback(tmp_path: Path, good: Path) -> None:
    env = {**os.environ, "CAPMERGE_DEBUG": "1"}
    r = subprocess.run([sys.executable, "-m", "capmerge", "diff", str(tmp_path / "nope"), str(good)],
                       capture_output=True, text=True, env=env, cwd=tmp_path)  # fmt: skip
    assert r.returncode != 0 and "Traceback" in r.stderr and "CheckpointNotFoundError" in r.stderr


def test_error_classes_subclass_builtins(tmp_path: Path, good: Path) -> None:
    with pytest.raises(FileNotFoundError):
        capmerge.diff(tmp_path / "nope", good, tmp_path / "v.safetensors")
    with pytest.raises(CheckpointError):
        capmerge.diff(tmp_path / "nope", good, tmp_path / "v.safetensors")
    other = save_single(tmp_path / "o.safetensors", {"w": torch.ones(5), "b": torch.zeros(2)})
    with pytest.raises(ValueError):
        capmerge.diff(good, other, tmp_path / "v.safetensors")
    with pytest.raises(MismatchError):
        capmerge.apply(good, other, tmp_path / "v.safetensors")
    with pytest.raises(FileExistsError):
        capmerge.diff(good, good, good)
    assert issubclass(OutputExistsError, CapmergeError)


def _write_limited(args: list[str], limit: int, cwd: Path) -> subprocess.CompletedProcess:
    def preexec() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run([sys.executable, "-m", "capmerge", *args], capture_output=True, text=True, cwd=cwd,
                          preexec_fn=preexec)  # fmt: skip


def test_write_failure_leaves_nothing(tmp_path: Path) -> None:
    """A write that fails half-way (file size limit, like a full disk) leaves no partial output or temp file."""
    g = torch.Generator().manual_seed(0)
    b = save_single(tmp_path / "in" / "b.safetensors", {f"w{i}": torch.randn(100_000, generator=g) for i in range(4)})
    a = save_single(tmp_path / "in" / "a.safetensors", {f"w{i}": torch.randn(100_000, generator=g) for i in range(4)})
    before = tree_digest(tmp_path)
    r = _write_limited(["diff", str(b), str(a), "-o", "out/v.safetensors"], 1_000_000, tmp_path)
    assert r.returncode == 1, r.stderr
    assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert listing(tmp_path) == {"in"}, listing(tmp_path)  # not even the created parent directory remains
    assert tree_digest(tmp_path) == before


def test_interrupt_leaves_nothing(tmp_path: Path, good: Path) -> None:
    """Ctrl-C in the middle of a run: the library cleans up (progress callback raises KeyboardInterrupt)."""
    g = torch.Generator().manual_seed(0)
    b = save_single(tmp_path / "b.safetensors", {f"w{i}": torch.randn(1000, generator=g) for i in range(20)})
    a = save_single(tmp_path / "a.safetensors", {f"w{i}": torch.randn(1000, generator=g) for i in range(20)})
    before = listing(tmp_path)
    calls = []

    def progress(done: int, tensors: int) -> None:
        calls.append(done)
        if len(calls) == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        capmerge.diff(b, a, tmp_path / "out" / "v", progress=progress)
    assert listing(tmp_path) == before


def test_sigint_subprocess_leaves_nothing(tmp_path: Path) -> None:
    """A real SIGINT to the CLI while it writes: exit 130, no output, no temp files."""
    g = torch.Generator().manual_seed(0)
    t = {f"w{i}": torch.randn(2_000_000, generator=g) for i in range(12)}
    b = save_single(tmp_path / "b.safetensors", t)
    a = save_single(tmp_path / "a.safetensors", {k: v + 1 for k, v in t.items()})
    env = {**os.environ, "CAPMERGE_NO_NATIVE": "1"}  # the torch path is slower: more time to interrupt
    # On a loaded machine this test process can be descheduled long enough for the run to finish before the signal
    # is sent (or arrives): then the output is removed and the run tried again.
    interrupted = False
    for _attempt in range(8):
        p = subprocess.Popen([sys.executable, "-m", "capmerge", "diff", str(b), str(a), "-o", "v.safetensors"],
                             cwd=tmp_path, stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
        deadline = time.time() + 60
        while time.time() < deadline and not any("capmerge-tmp" in n for n in listing(tmp_path)):
            if p.poll() is not None:
                break
            time.sleep(0.005)
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
        if p.returncode == 0:  # too late: the output was committed before the signal arrived
            (tmp_path / "v.safetensors").unlink()
            continue
        interrupted = True
        break
    assert interrupted, "every run finished before it could be interrupted; enlarge the test checkpoint"
    assert p.returncode == 130, err
    assert err.strip().splitlines()[-1].startswith("error: interrupted"), err
    assert listing(tmp_path) == {"a.safetensors", "b.safetensors"}
