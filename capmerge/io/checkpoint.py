"""Open any checkpoint as a lazy view: tensor name → (shape, dtype, shard, byte range).

Only headers are read here; tensor data is read on demand (``Checkpoint.read_into`` / ``read_tensor``). Accepted
references: a ``.safetensors`` file, a ``*.safetensors.index.json`` file, or a directory holding ``model.safetensors``
(or ``capvector.safetensors``) or one sharded layout; PyTorch pickles (:mod:`capmerge.io.pickles`), LoRA adapters
(:mod:`capmerge.io.lora`) and compressed vectors (:mod:`capmerge.io.compression`) open as lazy views with the same
interface. Other sources (hub ids) plug in through :func:`register_resolver`: a resolver maps a reference to a local
path or ``None``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capmerge.errors import CheckpointError, CheckpointNotFoundError, UsageError
from capmerge.io import jsonfile as _json

# safetensors dtype code -> (item size in bytes, is floating point)
DTYPES: dict[str, tuple[int, bool]] = {
    "F64": (8, True),
    "F32": (4, True),
    "F16": (2, True),
    "BF16": (2, True),
    "F8_E4M3": (1, True),
    "F8_E5M2": (1, True),
    "I64": (8, False),
    "I32": (4, False),
    "I16": (2, False),
    "I8": (1, False),
    "U64": (8, False),
    "U32": (4, False),
    "U16": (2, False),
    "U8": (1, False),
    "BOOL": (1, False),
}
# Dtypes the format defines that capmerge does not compute with (refused as "unsupported", not "unknown").
OTHER_FORMAT_DTYPES = frozenset({"F4", "F6_E2M3", "F6_E3M2", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "C64"})
# Names users pass on the command line -> safetensors codes.
PathLike = str | os.PathLike[str]
DTYPE_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}
MAP_WINDOW = 1 << 26  # bytes of a tensor mapped at a time (Checkpoint.map_tensor)
# Single-file weight names a directory may hold (any other .safetensors name is ambiguous).
KNOWN_SINGLE_NAMES = ("model.safetensors", "capvector.safetensors")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
# The reference loader's limit on the header length (safetensors' MAX_HEADER_SIZE).
MAX_HEADER = 100_000_000
_U64 = 1 << 64
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# Header key of capmerge vectors telling how tensors are stored: dense (absent), lowrank or sparse.
VECTOR_FORMAT_KEY = "capmerge.vector_format"


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: ``nbytes`` bytes at absolute offset ``start`` of file ``shard``."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    shard: str
    start: int
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype][0]

    @property
    def is_float(self) -> bool:
        return DTYPES[self.dtype][1]


@dataclass
class Header:
    """A parsed and validated safetensors header."""

    path: str
    raw: bytes  # the 8-byte length field + the JSON header, as stored (for fingerprints)
    metadata: dict[str, str]
    tensors: dict[str, TensorInfo]  # in data-offset order


def require_regular_file(path: str | os.PathLike[str]) -> os.stat_result:
    """Refuse a FIFO, device, socket or directory before it is opened (opening a FIFO blocks until a writer comes;
    a device never ends). Follows symlinks: a symlink to a regular file is fine."""
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CheckpointNotFoundError("no such file or directory", path) from None
    except OSError as e:
        raise CheckpointError(f"cannot read file: {e.strerror or e}", path) from None
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"not a regular file ({_file_kind(st.st_mode)})", path)
    return st


def _file_kind(mode: int) -> str:
    for test, what in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):  # fmt: skip
        if test(mode):
            return what
    return "not a plain file"


def read_header(path: str | os.PathLike[str]) -> Header:
    """Read and validate the header of one safetensors file without reading tensor data."""
    path = os.fspath(path)
    require_regular_file(path)
    try:
        # O_NONBLOCK: should the path have become a FIFO since the check, opening it still does not hang.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise CheckpointError(f"not a regular file ({_file_kind(st.st_mode)})", path)
            head, first = f.read(8), f.read(1)
            n = header_length(path, head, st.st_size, first)
            raw_json = first + f.read(n - 1)
    except OSError as e:
        raise CheckpointError(f"cannot read file: {e.strerror or e}", path) from e
    return parse_header(path, head, raw_json, st.st_size)


def header_length(path: str, head: bytes, size: int, first: bytes) -> int:
    """The header length ``N`` from the first 8 bytes of a file of ``size`` bytes whose byte 8 is ``first``,
    checked as the reference loader checks it (at least 8 bytes, ``N`` ≤ 100 000 000 and within the file) and
    against the format's rule that the header begins with ``{``."""
    if len(head) < 8:
        raise CheckpointError("not a safetensors file (shorter than 8 bytes)", path)
    (n,) = struct.unpack("<Q", head)
    if n == 0:
        raise CheckpointError("not a safetensors file (empty header)", path)
    if first != b"{":
        raise CheckpointError("not a safetensors file (the header does not begin with '{')", path)
    if n > MAX_HEADER:
        raise CheckpointError(f"header length field ({n} bytes) is over the format's limit of {MAX_HEADER}", path)
    if n > size - 8:
        raise CheckpointError(f"header length field ({n} bytes) is larger than the file ({size} bytes)", path)
    return n


class _BadJson(Exception):
    """What makes a header's JSON invalid for the format although Python's json would take it."""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook``: a key given twice is an error (the format forbids it; json.loads keeps the last)."""
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _BadJson(f"duplicate name {shown(json.dumps(k))} in the header (the format forbids it)")
        out[k] = v
    return out


def _no_constant(name: str) -> Any:
    # Python's json takes NaN and Infinity; JSON (and serde_json) does not
    raise _BadJson(f"not a safetensors file (header is not valid JSON: {name} is no JSON number)")


def _parse_int(text: str) -> Any:
    # Past 20 digits a number cannot be a u64 anyway: read it as serde_json does (a float; out of range past ~1e308),
    # which also spares int()'s 4300-digit limit.
    if len(text) <= 20:
        return int(text)
    return _parse_float(text)


def _parse_float(text: str) -> float:
    x = float(text)
    if math.isinf(x):
        raise _BadJson("not a safetensors file (header is not valid JSON: a number out of range)")
    return x


def shown(x: Any, limit: int = 80) -> str:
    """``x`` for an error line: strings quoted only when they hold control characters, JSON for the rest, cut to
    ``limit`` characters (a hostile header may hold megabyte names or newlines)."""
    text = x if isinstance(x, str) and x.isprintable() else json.dumps(x) if not isinstance(x, str) else repr(x)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _u64(x: Any) -> bool:
    """A JSON integer the reference reads as ``usize``: not a bool, not a float, 0 ≤ x < 2**64."""
    return type(x) is int and 0 <= x < _U64


def parse_header(path: str, head: bytes, raw_json: bytes, size: int) -> Header:
    """Validate a safetensors header given as bytes: the 8-byte length field, the JSON, and the file's size
    (for headers read without the file at hand, e.g. by ranged reads from the Hub).

    The one validation of the format in capmerge: the rules of the format's specification (header begins with
    ``{``, no duplicate keys, ``__metadata__`` a string→string map, data offsets tiling the byte buffer with no
    hole) and of the reference loader (``safetensors``' ``SafeTensors::read_metadata`` and ``Metadata::validate``:
    JSON as serde_json reads it, shape entries and offsets unsigned 64-bit integers, byte counts that do not
    overflow 64 bits, the last offset at the end of the file). A file that passes loads with ``safetensors``; one
    that fails gets a message naming the tensor.
    """
    n = header_length(path, head, size, raw_json[:1])
    if len(raw_json) != n:
        raise CheckpointError(f"header length field ({n} bytes) is larger than the file ({size} bytes)", path)
    hdr = _decode_json(path, raw_json)
    data_start = 8 + n
    metadata = hdr.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError("invalid __metadata__ (must map strings to strings)", path)
    entries = sorted(_entry(path, name, e) for name, e in hdr.items())
    _check_layout(path, entries, size - data_start)
    tensors = {
        name: TensorInfo(name, dtype, shape, path, data_start + b, e - b) for b, e, name, dtype, shape in entries
    }
    return Header(path, head + raw_json, dict(metadata), tensors)


def _decode_json(path: str, raw_json: bytes) -> dict[str, Any]:
    """The header's JSON as serde_json reads it: UTF-8, no duplicate keys, no NaN, no lone surrogate, an object."""
    try:
        hdr = json.loads(
            raw_json.decode("utf-8"),
            object_pairs_hook=_no_duplicates,
            parse_constant=_no_constant,
            parse_int=_parse_int,
            parse_float=_parse_float,
        )
    except UnicodeDecodeError:
        raise CheckpointError("not a safetensors file (header is not valid UTF-8)", path) from None
    except _BadJson as e:
        raise CheckpointError(str(e), path) from None
    except RecursionError:
        raise CheckpointError("not a safetensors file (header is not valid JSON: nested too deeply)", path) from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"not a safetensors file (header is not valid JSON: {e.msg})", path) from None
    if b"\\u" in raw_json:  # an escaped lone surrogate decodes to no Unicode string (serde_json refuses it)
        try:
            json.dumps(hdr, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise CheckpointError(
                "not a safetensors file (header is not valid JSON: a \\u escape that is no character)", path
            ) from None
    if not isinstance(hdr, dict):
        raise CheckpointError("not a safetensors file (header is not a JSON object)", path)
    return hdr


def _entry(path: str, name: str, e: Any) -> tuple[int, int, str, str, tuple[int, ...]]:
    """One tensor's entry checked as the reference checks it: (begin, end, name, dtype, shape)."""
    tensor = f"tensor {shown(name)}"
    if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= e.keys():
        raise CheckpointError(f"invalid header entry for {tensor} (needs dtype, shape and data_offsets)", path)
    dtype, shape, offs = e["dtype"], e["shape"], e["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        what = "unsupported" if isinstance(dtype, str) and dtype in OTHER_FORMAT_DTYPES else "unknown"
        raise CheckpointError(f"{what} dtype {shown(dtype)} of {tensor}", path)
    if not isinstance(shape, list) or not all(_u64(s) for s in shape):
        raise CheckpointError(f"invalid shape {shown(shape)} of {tensor} (integers from 0 to 2**64-1)", path)
    if not isinstance(offs, list) or len(offs) != 2 or not all(_u64(o) for o in offs):
        raise CheckpointError(f"invalid data_offsets {shown(offs)} of {tensor} (two integers from 0 to 2**64-1)", path)
    if offs[0] > offs[1]:
        raise CheckpointError(f"invalid data_offsets {offs} of {tensor} (end before begin)", path)
    numel = 1
    for s in shape:  # in the reference's order: a 0 after an overflowing prefix does not save it
        numel *= s
        if numel >= _U64:
            raise CheckpointError(f"shape {shown(shape)} of {tensor} overflows 64 bits", path)
    nbits = numel * DTYPES[dtype][0] * 8
    if nbits >= _U64:
        raise CheckpointError(f"shape {shown(shape)} of {tensor} overflows 64 bits", path)
    if offs[1] - offs[0] != nbits // 8:
        raise CheckpointError(
            f"data_offsets {offs} of {tensor} do not match its shape {shown(shape)} and dtype {dtype}", path
        )
    return (offs[0], offs[1], name, dtype, tuple(shape))


def _check_layout(path: str, entries: list[tuple[int, int, str, str, tuple[int, ...]]], data_len: int) -> None:
    """Sorted by offset, the tensors tile the data exactly: no overlap, no hole, nothing past or after the end."""
    expected, prev_name = 0, None
    for b, e, name, _, _ in entries:
        if b < expected:
            raise CheckpointError(
                f"overlapping data_offsets: tensor {shown(name)} overlaps tensor {shown(prev_name)}", path
            )
        if e > data_len:
            if b == expected:
                raise CheckpointError(
                    f"truncated data: the header needs {e} bytes of tensor data, the file holds {data_len}", path
                )
            raise CheckpointError(f"data_offsets of tensor {shown(name)} point past the end of the file", path)
        if b > expected:
            where = f"between tensor {shown(prev_name)} and " if prev_name is not None else "before "
            raise CheckpointError(
                f"{b - expected} bytes of data {where}tensor {shown(name)} belong to no tensor "
                "(data_offsets must cover the data)",
                path,
            )
        expected, prev_name = e, name
    if expected != data_len:
        raise CheckpointError(
            f"{data_len - expected} bytes after the last tensor's data belong to no tensor "
            "(data_offsets must cover the data)",
            path,
        )


@dataclass
class Checkpoint:
    """A lazy view of a checkpoint: headers parsed, no tensor data read.

    Attributes:
        ref: the reference as the user gave it.
        files: the weight files, in order (one, or the shards).
        tensors: name → :class:`TensorInfo`, in storage order (shard by shard, offset by offset).
        metadata: the ``__metadata__`` of the first file.
        root: the directory whose non-weight files belong to this checkpoint (None for a bare file).
        index_path: the ``*.index.json`` for sharded checkpoints.
    """

    ref: str
    files: list[str]
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    root: str | None = None
    index_path: str | None = None
    headers: list[Header] = field(default_factory=list, repr=False)
    _fds: dict[str, int] = field(default_factory=dict, repr=False)

    direct = True  # tensors are byte ranges of files (the engine may copy them file to file)

    @property
    def kind(self) -> str:
        """The vector kind: ``dense``, ``lowrank`` or ``sparse`` (header key ``capmerge.vector_format``)."""
        return "dense"

    def storage(self, name: str) -> dict[str, Any]:
        """How tensor ``name`` is stored: ``{"storage": "dense" | "lowrank" | "sparse", "nbytes": stored bytes,
        "dtype": ...}`` plus ``rank`` (low-rank) or ``nnz``/``bits`` (sparse)."""
        info = self._info(name)
        return {"storage": "dense", "nbytes": info.nbytes, "dtype": info.dtype}

    def renamed(self, tensors: dict[str, TensorInfo]) -> Checkpoint:
        """The same checkpoint under other names (``tensors``: new name → this checkpoint's TensorInfo)."""
        import dataclasses

        return dataclasses.replace(self, tensors=tensors)

    @property
    def sharded(self) -> bool:
        return self.index_path is not None

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def fingerprint(self) -> str:
        """sha256 over the raw headers of all weight files (file names included): cheap, reads no tensor data."""
        h = hashlib.sha256()
        for hd in self.headers:
            h.update(os.path.basename(hd.path).encode())
            h.update(hd.raw)
        return "sha256:" + h.hexdigest()

    def shard_of(self, name: str) -> str:
        return os.path.basename(self.tensors[name].shard)

    def fd(self, path: str) -> int:
        fd = self._fds.get(path)
        if fd is None:
            try:
                fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NONBLOCK", 0))
            except OSError as e:
                raise CheckpointError(f"cannot open: {e.strerror or e}", path) from e
            prev = self._fds.setdefault(path, fd)  # two threads may open it at once: keep one descriptor
            if prev != fd:
                os.close(fd)
                fd = prev
        return fd

    def read_into(self, info: TensorInfo, byte_offset: int, buf: memoryview) -> None:
        """Fill ``buf`` with the bytes of ``info`` starting at ``byte_offset`` (relative to the tensor)."""
        fd = self.fd(info.shard)
        pos = info.start + byte_offset
        view = buf
        while len(view):
            got = os.preadv(fd, [view], pos) if hasattr(os, "preadv") else _pread_into(fd, view, pos)
            if got <= 0:
                raise CheckpointError(f"unexpected end of file while reading tensor {info.name}", info.shard)
            view = view[got:]
            pos += got

    def map_tensor(self, info: TensorInfo) -> TensorMap | None:
        """Read-only views of the bytes of ``info`` mapped from its file (no copy), or None where they cannot be (no
        mmap here, the file shorter than the header says: :meth:`read_into` then reports it)."""
        if info.nbytes == 0 or not self.direct or type(self).read_into is not Checkpoint.read_into:
            return None  # a lazy view (low-rank product, sparse entries): its bytes are not the file's
        try:
            import mmap  # noqa: F401

            if os.fstat(self.fd(info.shard)).st_size < info.start + info.nbytes:
                return None
        except (ImportError, OSError):
            return None
        return TensorMap(self.fd(info.shard), info.start, info.nbytes)

    def read_bytes(self, name: str) -> bytearray:
        info = self._info(name)
        buf = bytearray(info.nbytes)
        self.read_into(info, 0, memoryview(buf))
        return buf

    def read_tensor(self, name: str) -> Any:
        """Read one tensor into a new CPU ``torch.Tensor`` (imports torch)."""
        from capmerge._torch import tensor_from_bytes

        info = self._info(name)
        return tensor_from_bytes(self.read_bytes(name), info.dtype, info.shape)

    def _info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"no tensor named {name}", self.ref) from None

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


class TensorMap:
    """One tensor's bytes, mapped from its file a window of :data:`MAP_WINDOW` bytes at a time: :meth:`view` gives
    byte ranges relative to the tensor. A window stays mapped while a view of it lives, so what is mapped (RSS) is
    bounded by the windows in flight, not by the tensor's size."""

    def __init__(self, fd: int, start: int, nbytes: int) -> None:
        self._fd, self._start, self._nbytes = fd, start, nbytes
        self._win: tuple[int, int, memoryview] | None = None  # (first, end) tensor bytes of the window, its view

    def view(self, start: int, end: int) -> memoryview:
        w = self._win
        if w is None or start < w[0] or end > w[1]:
            import mmap

            pos = self._start + start
            first = pos - pos % mmap.ALLOCATIONGRANULARITY
            last = min(self._start + self._nbytes, max(self._start + end, first + MAP_WINDOW))
            mm = mmap.mmap(self._fd, last - first, offset=first, access=mmap.ACCESS_READ)
            w = self._win = (first - self._start, last - self._start, memoryview(mm))
        return w[2][start - w[0] : end - w[0]]

    def close(self) -> None:
        """Drop the current window (unmapped once no view of it lives)."""
        self._win = None


def _pread_into(fd: int, view: memoryview, pos: int) -> int:
    data = os.pread(fd, len(view), pos)
    view[: len(data)] = data
    return len(data)


def read_json_file(path: Path, what: str) -> Any:
    """A small JSON side file (an index, an adapter config): a regular file, within the JSON limits of
    :mod:`capmerge.io.jsonfile`; any failure is one CheckpointError naming ``what`` and the file."""
    require_regular_file(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read {what}: {e.strerror or e}", str(path)) from None
    return _json.loads(raw, what, str(path))


def read_weight_map(index: Path) -> dict[str, str]:
    """The ``weight_map`` (tensor name → shard file) of a ``*.index.json``, validated: every shard is a plain file
    name, so that an index never leads outside its own directory."""
    data = read_json_file(index, "index")
    wmap = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wmap, dict) or not all(isinstance(v, str) for v in wmap.values()):
        raise CheckpointError("index has no valid weight_map", str(index))
    for name, shard in wmap.items():
        if not is_plain_name(shard):
            raise CheckpointError(
                f"index names shard {shown(json.dumps(shard))} for tensor {shown(name)}: a shard must be a plain "
                "file name in the index's directory (no path separator, no '..', not absolute)",
                str(index),
            )
    return wmap


def is_plain_name(name: str) -> bool:
    """A file name with no directory part: no separator (``/`` or ``\\``), not ``.``/``..``, not empty, no NUL."""
    return name not in ("", ".", "..") and not any(c in name for c in "/\\\0") and not os.path.isabs(name)


_HUB_CACHE_ENTRY = re.compile(r"(models|datasets|spaces)--.+")


def checkpoint_bounds(root: str | os.PathLike[str]) -> list[str]:
    """The real directories that files of the checkpoint directory ``root`` may lead into by symlinks: ``root``
    itself and, when ``root`` is a snapshot of the Hugging Face cache, its cache entry (the ``models--org--name/``
    folder holding ``snapshots/`` and ``blobs/``: the snapshot's files are symlinks into ``blobs/``)."""
    bounds = [os.path.realpath(root)]
    for start in (Path(os.path.abspath(root)), Path(bounds[0])):
        for up in start.parents:
            if up.name == "snapshots" and _HUB_CACHE_ENTRY.fullmatch(up.parent.name) and (up.parent / "blobs").is_dir():
                bounds.append(os.path.realpath(up.parent))
                break
    return bounds


def leads_outside(path: str | os.PathLike[str], bounds: list[str]) -> str | None:
    """Where ``path`` really leads (symlinks resolved) when that is outside every directory of ``bounds``;
    None when it stays inside one."""
    real = os.path.realpath(path)
    for b in bounds:
        if real == b or real.startswith(b.rstrip(os.sep) + os.sep):
            return None
    return real


def open_index(ref: str, index: Path) -> Checkpoint:
    wmap = read_weight_map(index)
    base = index.parent
    shard_names = sorted(set(wmap.values()))
    headers: dict[str, Header] = {}
    for s in shard_names:
        p = base / s
        if not p.exists():
            raise CheckpointError(f"index names a shard that does not exist: {s}", str(index))
        headers[s] = read_header(p)
    tensors: dict[str, TensorInfo] = {}
    for s in shard_names:
        for name, info in headers[s].tensors.items():
            if wmap.get(name) == s:
                tensors[name] = info
    for name, s in wmap.items():
        if name not in headers[s].tensors:
            raise CheckpointError(f"tensor {name} is missing from its shard {s}", str(base / s))
    hdrs = [headers[s] for s in shard_names]
    return Checkpoint(
        ref,
        [h.path for h in hdrs],
        tensors,
        hdrs[0].metadata if hdrs else {},
        root=str(base),
        index_path=str(index),
        headers=hdrs,
    )


def parse_dtype(dtype: str | None, *, allow_auto: bool) -> str | None:
    """``auto``/None → None (keep each tensor's dtype); ``bfloat16`` etc. → safetensors code."""
    if dtype is None or (allow_auto and dtype == "auto"):
        return None
    code = DTYPE_NAMES.get(str(dtype).lower().replace("torch.", ""))
    if code is None:
        choices = ("auto, " if allow_auto else "") + "float32, bfloat16, float16"
        raise UsageError(f"invalid dtype {dtype!r} (choose from {choices})")
    return code
