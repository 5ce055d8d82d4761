"""What capmerge refuses before it reads a byte of tensor data (issue 16, classes 1, 3 and 4).

Every malformed file here is written byte by byte. Each refusal is one ``error:`` line naming the file (and the
tensor), exit code 2, no output and no temporary file left, the input's bytes unchanged. Where the reference loader
(the ``safetensors`` library) refuses the same file, the test asserts that too, so the rule is the format's, not
capmerge's own invention; the rules the reference does not enforce come from the format's specification (the
safetensors README: header begins with ``{``, duplicate keys disallowed).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import struct
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import load_any, save_sharded, save_single, tree_digest
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

import capmerge
from capmerge.cli import app

runner = CliRunner()


def T(dtype: str, shape: Any, offsets: Any) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


def J(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def raw_file(path: Path, header: bytes, data: bytes = b"", length: int | None = None) -> Path:
    """8-byte little-endian header length (``length`` overrides it), the header bytes, the data bytes."""
    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + data)
    return path


def refused(tmp: Path, args: list[Any], expect: str, where: Path | str, output: Path | None = None) -> str:
    """Run the CLI: one ``error:`` line holding ``expect`` and ``(where``, exit 2, no traceback, nothing written
    (``output`` absent, no new or changed file anywhere under ``tmp``: no temp file either)."""
    before, names = tree_digest(tmp), {str(p) for p in tmp.rglob("*")}
    r = runner.invoke(app, [str(a) for a in args])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 2, (r.exit_code, r.stdout, r.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert expect in lines[0], lines[0]
    assert f"({where}" in lines[0], lines[0]
    assert "Traceback" not in r.stdout + r.stderr
    assert r.stdout == ""
    if output is not None:
        assert not os.path.lexists(output)
    assert {str(p) for p in tmp.rglob("*")} == names, "a file was left behind"
    assert tree_digest(tmp) == before, "a file changed"
    return lines[0]


def reference_refuses(path: Path) -> None:
    with pytest.raises(SafetensorError), safe_open(str(path), framework="pt") as f:
        list(f.keys())
    with pytest.raises(SafetensorError):
        load_file(str(path))


F4 = T("F32", [1], [0, 4])
DUP_SAME = b'{"a":' + J(F4) + b',"a":' + J(F4) + b"}"
DUP_MOVED = b'{"a":' + J(F4) + b',"a":' + J(T("F32", [1], [4, 8])) + b"}"

# (id, header bytes, data, length field or None, what the error says, tensor it names, the reference refuses it too)
HEADER_CASES = [
    ("duplicate-name", DUP_MOVED, bytes(8), None, 'duplicate name "a"', None, True),
    ("duplicate-name-same-entry", DUP_SAME, bytes(4), None, 'duplicate name "a"', None, False),
    ("duplicate-field", b'{"a":{"dtype":"F32","dtype":"F32","shape":[1],"data_offsets":[0,4]}}', bytes(4), None,
     'duplicate name "dtype"', None, True),
    ("gap-before-first", J({"a": T("F32", [1], [4, 8])}), bytes(8), None, "4 bytes of data before tensor a", "a", True),
    ("gap-between", J({"a": F4, "b": T("F32", [1], [8, 12])}), bytes(12), None,
     "4 bytes of data between tensor a and tensor b", "b", True),
    ("bytes-after-last", J({"a": F4}), bytes(8), None, "4 bytes after the last tensor's data", None, True),
    ("bytes-without-tensor", b"{}", bytes(4), None, "4 bytes after the last tensor's data", None, True),
    ("metadata-list", J({"__metadata__": [], "a": F4}), bytes(4), None, "invalid __metadata__", None, True),
    ("metadata-int-value", J({"__metadata__": {"k": 1}, "a": F4}), bytes(4), None, "invalid __metadata__", None, True),
    ("metadata-string", J({"__metadata__": "x", "a": F4}), bytes(4), None, "invalid __metadata__", None, True),
    ("metadata-nested", J({"__metadata__": {"k": {"x": "y"}}, "a": F4}), bytes(4), None, "invalid __metadata__",
     None, True),
    ("shape-bool", J({"a": T("F32", [True, 1], [0, 4])}), bytes(4), None, "invalid shape [true, 1] of tensor a",
     "a", True),
    ("shape-2**64", J({"a": T("U8", [2**64, 0], [0, 0])}), b"", None, "invalid shape [18446744073709551616, 0]",
     "a", True),
    ("shape-negative", J({"a": T("F32", [-1], [0, 4])}), bytes(4), None, "invalid shape [-1] of tensor a", "a", True),
    ("shape-float", J({"a": T("F32", [1.0], [0, 4])}), bytes(4), None, "invalid shape [1.0] of tensor a", "a", True),
    ("shape-not-list", J({"a": T("F32", 4, [0, 16])}), bytes(16), None, "invalid shape 4 of tensor a", "a", True),
    # 2**62 * 4 overflows 64 bits before the 0 is reached: the reference multiplies in order and stops there
    ("shape-overflow", J({"a": T("U8", [2**62, 4, 0], [0, 0])}), b"", None, "overflows 64 bits", "a", True),
    # 2**61 elements fit in 64 bits, their 2**61 * 64 bits do not (the reference's ValidationOverflow)
    ("bits-overflow", J({"a": T("F64", [2**61], [0, 0])}), b"", None, "overflows 64 bits", "a", True),
    ("offsets-bool", J({"a": T("U8", [1], [False, True])}), bytes(1), None, "invalid data_offsets [false, true]",
     "a", True),
    ("offsets-three", J({"a": T("U8", [1], [0, 1, 2])}), bytes(1), None, "invalid data_offsets [0, 1, 2]", "a", True),
    ("offsets-negative", J({"a": T("U8", [1], [-1, 0])}), bytes(1), None, "invalid data_offsets [-1, 0]", "a", True),
    ("offsets-reversed", J({"a": T("U8", [0], [1, 0])}), bytes(1), None, "(end before begin)", "a", True),
    ("offsets-overlap", J({"a": T("F32", [2], [0, 8]), "b": T("F32", [1], [4, 8])}), bytes(8), None,
     "overlapping data_offsets: tensor b overlaps tensor a", None, True),
    ("offsets-past-end", J({"a": F4, "b": T("F32", [1], [100, 104])}), bytes(8), None,
     "data_offsets of tensor b point past the end of the file", None, True),
    ("truncated-data", J({"a": T("F32", [2], [0, 8])}), bytes(4), None, "truncated data", None, True),
    ("size-not-shape", J({"a": T("F32", [2], [0, 4])}), bytes(4), None, "do not match its shape [2] and dtype F32",
     "a", True),
    ("dtype-unknown", J({"a": T("F33", [1], [0, 4])}), bytes(4), None, "unknown dtype F33 of tensor a", "a", True),
    ("dtype-not-string", J({"a": T(["F32"], [1], [0, 4])}), bytes(4), None, 'unknown dtype ["F32"]', "a", True),
    ("dtype-missing", J({"a": {"shape": [1], "data_offsets": [0, 4]}}), bytes(4), None,
     "needs dtype, shape and data_offsets", "a", True),
    # C64 is in the format (the reference loads it); capmerge cannot compute with it and says so
    ("dtype-unsupported", J({"a": T("C64", [1], [0, 8])}), bytes(8), None, "unsupported dtype C64", "a", False),
    ("header-longer-than-file", J({"a": F4}), bytes(4), 10_000, "larger than the file", None, True),
    ("header-over-limit", J({"a": F4}), bytes(4), 100_000_001, "over the format's limit of 100000000", None, True),
    ("header-empty", b"", b"", 0, "empty header", None, True),
    ("header-not-utf8", b'{"a\xff":' + J(F4) + b"}", bytes(4), None, "not valid UTF-8", None, True),
    ("header-not-json", b'{"a": nope}', b"", None, "not valid JSON", None, True),
    ("header-not-object", b"[1, 2]", b"", None, "does not begin with '{'", None, True),
    # the format's rule ("MUST begin with {"); the reference loader takes leading whitespace
    ("header-leading-space", b" " + J({"a": F4}), bytes(4), None, "does not begin with '{'", None, False),
    ("header-nan", b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":NaN}}', bytes(4), None,
     "NaN is no JSON number", None, True),
    ("header-lone-surrogate", b'{"a\\ud800":' + J(F4) + b"}", bytes(4), None, "escape that is no character", None,
     True),
    ("header-deep-nesting", b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}", b"", None, "nested too deeply", None,
     True),
    ("header-5000-digits", b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":' + b"9" * 5000 + b"}}",
     bytes(4), None, "a number out of range", None, True),
]  # fmt: skip


@pytest.mark.parametrize(("case", "header", "data", "length", "expect", "tensor", "ref"), HEADER_CASES,
                         ids=[c[0] for c in HEADER_CASES])  # fmt: skip
def test_header_rules(
    tmp_path: Path,
    case: str,
    header: bytes,
    data: bytes,
    length: int | None,
    expect: str,
    tensor: str | None,
    ref: bool,
) -> None:
    good = save_single(tmp_path / "good.safetensors", {"a": torch.ones(1)})
    bad = raw_file(tmp_path / f"{case}.safetensors", header, data, length)
    out = tmp_path / "out.safetensors"
    line = refused(tmp_path, ["diff", good, bad, "-o", out], expect, bad, out)
    if tensor is not None:
        assert f"tensor {tensor}" in line, line
    if ref:
        reference_refuses(bad)


def test_shorter_than_8_bytes(tmp_path: Path) -> None:
    good = save_single(tmp_path / "good.safetensors", {"a": torch.ones(1)})
    bad = tmp_path / "short.safetensors"
    bad.write_bytes(b"\x02\0\0")
    refused(tmp_path, ["apply", bad, good, "-o", tmp_path / "o.safetensors"], "shorter than 8 bytes", bad)
    reference_refuses(bad)


def test_a_bad_shard_is_named(tmp_path: Path) -> None:
    """The rules hold for every shard of an index: the message names the shard, not only the directory."""
    good = save_single(tmp_path / "good.safetensors", {"w": torch.ones(4), "b": torch.zeros(2)})
    d = save_sharded(tmp_path / "sh", {"w": torch.ones(4), "b": torch.zeros(2)}, 2)
    shard = d / "model-00002-of-00002.safetensors"
    raw_file(shard, b'{"b":' + J(T("F32", [2], [0, 8])) + b',"b":' + J(T("F32", [2], [8, 16])) + b"}", bytes(16))
    refused(tmp_path, ["diff", good, d, "-o", tmp_path / "v"], 'duplicate name "b"', shard, tmp_path / "v")
    reference_refuses(shard)


def test_what_the_format_allows_is_accepted(tmp_path: Path) -> None:
    """Not stricter than the format where it allows something: null ``__metadata__``, extra keys in an entry,
    trailing whitespace after the JSON, empty tensors anywhere, ``{}``. Both readers take each file and agree."""
    cases = {
        "meta-null": (J({"__metadata__": None, "a": F4}), struct.pack("<f", 1.5)),
        "extra-key": (
            b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":[1,{"y":null}]}}',
            struct.pack("<f", 1.5),
        ),  # fmt: skip
        "trailing-ws": (J({"a": F4}) + b"\n\t  ", struct.pack("<f", 1.5)),
        "empty-tensors": (
            J({"e0": T("F32", [0], [0, 0]), "a": F4, "e1": T("F32", [3, 0], [4, 4])}),
            struct.pack("<f", 1.5),
        ),  # fmt: skip
        "nothing": (b"{}", b""),
    }
    for name, (header, data) in cases.items():
        p = raw_file(tmp_path / f"{name}.safetensors", header, data)
        ref = load_file(str(p))
        ck = capmerge.open_checkpoint(p)
        assert set(ck.tensors) == set(ref), name
        for k, t in ref.items():
            assert ck.tensors[k].shape == tuple(t.shape), (name, k)
            assert torch.equal(ck.read_tensor(k), t), (name, k)
        ck.close()
        if "a" in ref:
            assert ref["a"].item() == 1.5


@pytest.mark.parametrize("name_len", range(1, 9))
def test_written_header_is_8_aligned_and_loads(tmp_path: Path, name_len: int) -> None:
    """The writer pads the header to a multiple of 8 bytes (as the reference writer does), so tensor data starts
    at an 8-aligned offset. Eight name lengths give every length of the JSON modulo 8."""
    name = "t" * name_len
    s = {name: torch.arange(5, dtype=torch.float32), "b": torch.ones(3, dtype=torch.float32)}
    a = {k: v * 3 + 1 for k, v in s.items()}
    ps, pa = save_single(tmp_path / "s.safetensors", s), save_single(tmp_path / "a.safetensors", a)
    out = tmp_path / "tau.safetensors"
    capmerge.diff(ps, pa, out)
    blob = out.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    assert n % 8 == 0, n
    text = blob[8 : 8 + n].decode("utf-8")
    assert text.rstrip(" ").endswith("}") and set(text[len(text.rstrip(" ")) :]) <= {" "}
    got = load_file(str(out))  # the reference loader
    for k in s:
        assert torch.equal(got[k], a[k] - s[k]), k
    with safe_open(str(out), framework="pt") as f:
        assert set(f.keys()) == set(s)


# --- class 3: reading outside the checkpoint --------------------------------------------------------------------


@pytest.mark.parametrize("shard", ["../outside.safetensors", "{abs}", "sub/model.safetensors", "..", "",
                                   "sub\\model.safetensors"])  # fmt: skip
def test_index_shard_must_be_a_plain_name(tmp_path: Path, shard: str) -> None:
    good = save_single(tmp_path / "good.safetensors", {"w": torch.ones(4)})
    outside = save_single(tmp_path / "outside.safetensors", {"w": torch.full((4,), 7.0)})  # a valid file to lure
    d = tmp_path / "ck"
    (d / "sub").mkdir(parents=True)
    save_single(d / "sub" / "model.safetensors", {"w": torch.full((4,), 7.0)})
    shard = shard.replace("{abs}", str(outside))
    index = d / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": {"w": shard}}))
    out = tmp_path / "v.safetensors"
    line = refused(tmp_path, ["diff", good, d, "-o", out], "a shard must be a plain file name", index, out)
    assert "tensor w" in line


def test_symlinked_shards_stay_allowed(tmp_path: Path) -> None:
    """Shard files that are symlinks (as in the Hugging Face cache) are read wherever they lead."""
    s = {"w": torch.arange(4, dtype=torch.float32), "b": torch.ones(2)}
    a = {"w": torch.arange(4, dtype=torch.float32) * 2, "b": torch.ones(2) * 5}
    blobs = tmp_path / "elsewhere"
    save_sharded(blobs, a, 2)
    d = tmp_path / "ck"
    d.mkdir()
    for f in blobs.iterdir():
        (d / f.name).symlink_to(f)
    ps = save_single(tmp_path / "s.safetensors", s)
    out = tmp_path / "tau.safetensors"
    r = runner.invoke(app, ["diff", str(ps), str(d), "-o", str(out), "-q"])
    assert r.exit_code == 0, r.stderr
    got = load_file(str(out))
    assert torch.equal(got["w"], a["w"] - s["w"]) and torch.equal(got["b"], a["b"] - s["b"])


def _base_dir(root: Path) -> Path:
    return save_single(root / "model.safetensors", {"w": torch.arange(4, dtype=torch.float32)}).parent


def test_side_file_symlink_leading_outside_is_not_copied(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("not the model's")
    base = _base_dir(tmp_path / "base")
    (base / "config.json").write_text('{"model_type": "toy"}')
    (base / "sub").mkdir()
    (base / "sub" / "real.json").write_text('{"x": 1}')
    (base / "tokenizer.json").symlink_to(secret)  # leads outside: skipped
    (base / "special_tokens_map.json").symlink_to(base / "sub" / "real.json")  # inside: copied
    vec = save_single(tmp_path / "v.safetensors", {"w": torch.ones(4)})
    out = tmp_path / "merged"
    r = runner.invoke(app, ["apply", str(base), str(vec), "-o", str(out), "--json"])
    assert r.exit_code == 0, r.stderr
    summary = json.loads(r.stdout)
    assert list(summary["files_skipped"]) == ["tokenizer.json"]
    assert str(secret) in summary["files_skipped"]["tokenizer.json"]
    assert "warning: tokenizer.json not copied into the output" in r.stderr
    assert not (out / "tokenizer.json").exists()
    assert "not the model's" not in "".join(p.read_text(errors="replace") for p in out.rglob("*") if p.is_file())
    assert (out / "config.json").read_text() == '{"model_type": "toy"}'
    assert (out / "special_tokens_map.json").read_text() == '{"x": 1}'
    assert torch.equal(load_any(out)["w"], torch.arange(4, dtype=torch.float32) + 1)


def test_side_files_of_a_hub_cache_snapshot_are_copied(tmp_path: Path) -> None:
    """In the Hugging Face cache a snapshot's files are symlinks into the entry's blobs/: they belong to it."""
    entry = tmp_path / "hub" / "models--org--name"
    (entry / "blobs").mkdir(parents=True)
    snap = entry / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (entry / "blobs" / "c1").write_text('{"model_type": "toy"}')
    save_single(entry / "blobs" / "w1", {"w": torch.arange(4, dtype=torch.float32)})
    (snap / "config.json").symlink_to("../../blobs/c1")
    (snap / "model.safetensors").symlink_to("../../blobs/w1")
    outside = tmp_path / "outside.txt"
    outside.write_text("x")
    (snap / "tokenizer.json").symlink_to(outside)
    vec = save_single(tmp_path / "v.safetensors", {"w": torch.ones(4)})
    out = tmp_path / "merged"
    r = runner.invoke(app, ["apply", str(snap), str(vec), "-o", str(out), "--json"])
    assert r.exit_code == 0, r.stderr
    assert (out / "config.json").read_text() == '{"model_type": "toy"}'
    assert not (out / "config.json").is_symlink()
    assert list(json.loads(r.stdout)["files_skipped"]) == ["tokenizer.json"]
    assert torch.equal(load_any(out)["w"], torch.arange(4, dtype=torch.float32) + 1)


# --- class 4: non-regular files ---------------------------------------------------------------------------------


def _unblock_after(fifo: Path, seconds: float) -> threading.Timer:
    """Should a regression open the FIFO for reading, open its other end after ``seconds`` so the test fails
    instead of hanging."""

    def unblock() -> None:
        with contextlib.suppress(OSError):  # no reader (the test passed): nothing to unblock
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))

    t = threading.Timer(seconds, unblock)
    t.daemon = True
    t.start()
    return t


def _layout(tmp: Path, where: str) -> tuple[list[Any], Path]:
    """A CLI call whose input has a FIFO at ``where``; returns (args, the FIFO's path)."""
    good = save_single(tmp / "good.safetensors", {"w": torch.ones(4), "b": torch.zeros(2)})
    out = tmp / "out.safetensors"
    if where == "file":
        fifo = tmp / "x.safetensors"
        os.mkfifo(fifo)
        return ["diff", good, fifo, "-o", out], fifo
    if where == "symlink":
        fifo = tmp / "pipe"
        os.mkfifo(fifo)
        (tmp / "y.safetensors").symlink_to(fifo)
        return ["apply", tmp / "y.safetensors", good, "-o", out], tmp / "y.safetensors"
    if where == "in-directory":
        (tmp / "d").mkdir()
        fifo = tmp / "d" / "model.safetensors"
        os.mkfifo(fifo)
        return ["diff", good, tmp / "d", "-o", out], fifo
    if where in ("shard", "index"):
        d = save_sharded(tmp / "sh", {"w": torch.ones(4), "b": torch.zeros(2)}, 2)
        fifo = d / ("model-00002-of-00002.safetensors" if where == "shard" else "model.safetensors.index.json")
        fifo.unlink()
        os.mkfifo(fifo)
        return ["diff", good, fifo if where == "index" else d, "-o", out], fifo
    if where == "pickle":
        fifo = tmp / "pytorch_model.bin"
        os.mkfifo(fifo)
        return ["diff", good, fifo, "-o", out], fifo
    if where in ("adapter-config", "adapter-weights"):
        (tmp / "lora").mkdir()
        if where == "adapter-config":
            fifo = tmp / "lora" / "adapter_config.json"
        else:
            (tmp / "lora" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 1}))
            fifo = tmp / "lora" / "adapter_model.safetensors"
        os.mkfifo(fifo)
        return ["apply", good, tmp / "lora", "-o", out], fifo
    if where == "inspect":
        fifo = tmp / "x.safetensors"
        os.mkfifo(fifo)
        return ["inspect", fifo], fifo
    raise AssertionError(where)


@pytest.mark.parametrize("where", ["file", "symlink", "in-directory", "shard", "index", "pickle", "adapter-config",
                                   "adapter-weights", "inspect"])  # fmt: skip
def test_fifo_is_refused_at_once(tmp_path: Path, where: str) -> None:
    args, fifo = _layout(tmp_path, where)
    timer = _unblock_after(fifo, 30)
    t0 = time.monotonic()
    try:
        refused(tmp_path, args, "not a regular file (a FIFO)", fifo, tmp_path / "out.safetensors")
    finally:
        timer.cancel()
    assert time.monotonic() - t0 < 25
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) or stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_devices_and_sockets_are_refused(tmp_path: Path) -> None:
    good = save_single(tmp_path / "good.safetensors", {"w": torch.ones(4)})
    out = tmp_path / "out.safetensors"
    zero = tmp_path / "zero.safetensors"
    zero.symlink_to("/dev/zero")  # read as a file it would give 8 zero bytes, then forever more
    refused(tmp_path, ["diff", good, zero, "-o", out], "not a regular file (a character device)", zero, out)
    sock_path = tmp_path / "s.safetensors"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(sock_path))
        refused(tmp_path, ["diff", good, sock_path, "-o", out], "not a regular file (a socket)", sock_path, out)
    finally:
        sock.close()


def test_block_reads_at_an_offset_match_the_reference_loader(tmp_path: Path) -> None:
    """Checkpoint.read_into at byte offsets inside a tensor (how the engine reads a block of a large tensor): every
    slice equals the same bytes of the tensor as the reference loader reads it."""
    from capmerge.io.open import open_checkpoint

    g = torch.Generator().manual_seed(0)
    src = {"first": torch.randn(13, generator=g), "second": torch.randn(7, 9, generator=g)}
    path = save_single(tmp_path / "m.safetensors", src)
    ref = load_file(str(path))
    ck = open_checkpoint(path)
    info = ck.tensors["second"]
    whole = ref["second"].contiguous().view(torch.uint8).numpy().tobytes()
    for start, length in [(0, 4), (4, 8), (36, 100), (len(whole) - 4, 4)]:
        buf = bytearray(length)
        ck.read_into(info, start, memoryview(buf))
        assert bytes(buf) == whole[start : start + length], (start, length)


@pytest.mark.parametrize("size", [2**63, "9223372036854775808", "10000000000TB", "1" + "0" * 40])
def test_shard_size_at_or_past_2_63_is_refused(size: int | str) -> None:
    """docs/reliability.md: ``--shard-size`` is below 2**63 bytes, whether given as an integer or with a unit."""
    from capmerge.errors import UsageError
    from capmerge.io.writer import parse_size

    with pytest.raises(UsageError, match=r"^size too large: .* \(at most 2\*\*63 - 1 bytes\)"):
        parse_size(size)
    assert parse_size(2**63 - 1) == 2**63 - 1
    assert parse_size("1TB") == 10**12


def test_shard_size_message_shows_40_characters_whole_and_cuts_longer() -> None:
    from capmerge.errors import UsageError
    from capmerge.io.writer import parse_size

    forty, forty_one = "9" * 40, "9" * 41
    with pytest.raises(UsageError) as exc:
        parse_size(forty)
    assert exc.value.what == f"size too large: '{forty}' (at most 2**63 - 1 bytes)"
    with pytest.raises(UsageError) as exc:
        parse_size(forty_one)
    assert exc.value.what == f"size too large: '{forty}'… (41 characters) (at most 2**63 - 1 bytes)"


def test_dtype_error_names_the_choices() -> None:
    from capmerge.errors import UsageError
    from capmerge.io.checkpoint import parse_dtype

    with pytest.raises(UsageError) as exc:
        parse_dtype("int8", allow_auto=True)
    assert exc.value.what == "invalid dtype 'int8' (choose from auto, float32, bfloat16, float16)"
    with pytest.raises(UsageError) as exc:
        parse_dtype("int8", allow_auto=False)
    assert exc.value.what == "invalid dtype 'int8' (choose from float32, bfloat16, float16)"
    assert parse_dtype("torch.bfloat16", allow_auto=False) == "BF16"


def test_a_file_cut_short_after_it_was_opened_is_an_error_not_a_hang(tmp_path: Path) -> None:
    """The header was valid when read; the data then shrank under capmerge (another process truncated the file):
    reading the tensor ends with one error naming the tensor, it does not wait for bytes that will not come."""
    from capmerge.errors import CheckpointError
    from capmerge.io.open import open_checkpoint

    path = save_single(tmp_path / "m.safetensors", {"w": torch.arange(64, dtype=torch.float32)})
    ck = open_checkpoint(path)
    os.truncate(path, path.stat().st_size - 16)
    with pytest.raises(CheckpointError, match="unexpected end of file while reading tensor w"):
        ck.read_tensor("w")
