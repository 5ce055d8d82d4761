"""Open any checkpoint as a lazy view: tensor name → (shape, dtype, shard, byte range).

Only headers are read here; tensor data is read on demand (``Checkpoint.read_into`` / ``read_tensor``).
Accepted references: a ``.safetensors`` file, a ``*.safetensors.index.json`` file, or a directory holding
``model.safetensors`` (or ``capvector.safetensors``) or one sharded layout; PyTorch pickles (:mod:`capmerge.pickles`),
LoRA adapters (:mod:`capmerge.lora`) and compressed vectors (:mod:`capmerge.compression`) open as lazy views with the
same interface. Other sources (hub ids) plug in through :func:`register_resolver`: a resolver maps a reference to a
local path or ``None``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capmerge import _json
from capmerge.errors import AmbiguousCheckpointError, CheckpointError, CheckpointNotFoundError

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
# Names users pass on the command line -> safetensors codes.
DTYPE_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}
# Single-file weight names a directory may hold (any other .safetensors name is ambiguous).
KNOWN_SINGLE_NAMES = ("model.safetensors", "capvector.safetensors")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
MAX_HEADER = 100 * 1024 * 1024
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


def read_header(path: str | os.PathLike[str]) -> Header:
    """Read and validate the header of one safetensors file without reading tensor data."""
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError("not a safetensors file (shorter than 8 bytes)", path)
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > MAX_HEADER:
                first = f.read(1)
                if first != b"{":
                    raise CheckpointError("not a safetensors file (no JSON header)", path)
                raise CheckpointError(f"header length field ({n} bytes) is larger than the file ({size} bytes)", path)
            raw_json = f.read(n)
    except OSError as e:
        raise CheckpointError(f"cannot read file: {e.strerror or e}", path) from e
    return parse_header(path, head, raw_json, size)


def parse_header(path: str, head: bytes, raw_json: bytes, size: int) -> Header:
    """Validate a safetensors header given as bytes: the 8-byte length field, the JSON, and the file's size
    (for headers read without the file at hand, e.g. by ranged reads from the Hub)."""
    n = len(raw_json)
    hdr = _json.loads(raw_json, "not a safetensors file: the header", path)
    if not isinstance(hdr, dict):
        raise CheckpointError("not a safetensors file (header is not a JSON object)", path)
    data_start = 8 + n
    data_len = size - data_start
    metadata = hdr.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError("invalid __metadata__ (must map strings to strings)", path)
    entries: list[tuple[int, int, str, str, tuple[int, ...]]] = []
    for name, e in hdr.items():
        if not isinstance(e, dict):
            raise CheckpointError(f"invalid header entry for tensor {name}", path)
        dtype, shape, offs = e.get("dtype"), e.get("shape"), e.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise CheckpointError(f"unsupported dtype {dtype!r} of tensor {name}", path)
        if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
            raise CheckpointError(f"invalid shape {shape!r} of tensor {name}", path)
        if (
            not isinstance(offs, list)
            or len(offs) != 2
            or not all(isinstance(o, int) and o >= 0 for o in offs)
            or offs[0] > offs[1]
        ):
            raise CheckpointError(f"invalid data_offsets {offs!r} of tensor {name}", path)
        numel = 1
        for s in shape:
            numel *= s
        if offs[1] - offs[0] != numel * DTYPES[dtype][0]:
            raise CheckpointError(
                f"data_offsets {offs} of tensor {name} do not match its shape {shape} and dtype {dtype}", path
            )
        entries.append((offs[0], offs[1], name, dtype, tuple(shape)))
    entries.sort()
    expected = 0
    contiguous = True
    prev_end, prev_name = 0, None
    for b, e, name, _, _ in entries:
        if b < prev_end and e > b:
            raise CheckpointError(f"overlapping data_offsets: tensor {name} overlaps tensor {prev_name}", path)
        contiguous = contiguous and b == expected
        expected = e
        if e > b:
            prev_end, prev_name = max(prev_end, e), name
    if entries and max(e for _, e, *_ in entries) > data_len:
        if contiguous:
            raise CheckpointError(
                f"truncated data: the header needs {expected} bytes of tensor data, the file holds {data_len}", path
            )
        bad = next(name for _, e, name, *_ in entries if e > data_len)
        raise CheckpointError(f"data_offsets of tensor {bad} point past the end of the file", path)
    tensors = {
        name: TensorInfo(name, dtype, shape, path, data_start + b, e - b) for b, e, name, dtype, shape in entries
    }
    return Header(path, head + raw_json, {str(k): v for k, v in metadata.items()}, tensors)


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
                fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
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


def _pread_into(fd: int, view: memoryview, pos: int) -> int:
    data = os.pread(fd, len(view), pos)
    view[: len(data)] = data
    return len(data)


Resolver = Callable[[str], "str | None"]


def _hub_resolver(ref: str) -> str | None:
    """Hub references (``hf://org/name[@rev][/sub]``, or a bare ``org/name``): fetched and verified first."""
    from capmerge import hub

    return hub.resolve(ref) if hub.parse_ref(ref) is not None else None


_RESOLVERS: list[Resolver] = [_hub_resolver]


def register_resolver(resolver: Resolver) -> None:
    """Add a resolver that maps a non-path reference (e.g. a hub id) to a local path, or returns None."""
    _RESOLVERS.append(resolver)


def open_checkpoint(
    ref: str | os.PathLike[str] | Checkpoint,
    *,
    key: str | None = None,
    trust_pickle: bool = False,
    headers_only: bool = False,
) -> Checkpoint:
    """Open a checkpoint reference as a lazy :class:`Checkpoint` (headers only).

    Args:
        ref: a ``.safetensors`` file, a ``*.safetensors.index.json``, a ``.bin``/``.pt``/``.pth`` state dict, a
            ``pytorch_model.bin.index.json``, a directory holding one of those, a PEFT LoRA adapter directory, a
            compressed (low-rank / sparse) vector, or anything a registered resolver maps to one of these.
        key: the entry of a nested pickle that holds the state dict (``state_dict``, ``model`` ...); without it a
            nested state dict is unwrapped when only one entry holds tensors.
        trust_pickle: load pickles that need more than tensors (runs code from the file; prints a warning).
        headers_only: the caller reads no tensor data; a hub reference is then opened from ranged reads of its
            safetensors headers where the Hub allows them (nothing downloaded), else fetched as usual.

    Compressed vectors and LoRA adapters open as views of DENSE tensors (each built when read); ``kind`` and
    ``storage(name)`` tell how they are stored.
    """
    if isinstance(ref, Checkpoint):
        return ref
    ref_s = os.fspath(ref)
    path = Path(ref_s)
    if not path.exists():
        if headers_only:
            from capmerge import hub

            remote = hub.open_headers(ref_s) if hub.parse_ref(ref_s) is not None else None
            if remote is not None:
                return _vector_view(remote)
        for resolver in _RESOLVERS:
            local = resolver(ref_s)
            if local is not None:
                path = Path(local)
                break
        else:
            raise CheckpointNotFoundError("no such file or directory", ref_s)
    opts = {"key": key, "trust_pickle": trust_pickle}
    if path.is_dir():
        return _vector_view(_open_dir(ref_s, path, opts))
    name = path.name
    if name.endswith(".safetensors.index.json"):
        return _vector_view(_open_index(ref_s, path))
    if name.endswith(".bin.index.json") or name.endswith(".pt.index.json"):
        from capmerge.pickles import open_pickle_index

        return open_pickle_index(ref_s, path, **opts)
    if name.endswith(PICKLE_SUFFIXES):
        from capmerge.pickles import open_pickle

        return open_pickle(ref_s, path, **opts)
    hdr = read_header(path)
    return _vector_view(Checkpoint(ref_s, [str(path)], hdr.tensors, hdr.metadata, root=None, headers=[hdr]))


def _vector_view(ck: Checkpoint) -> Checkpoint:
    """Compressed vectors (header key ``capmerge.vector_format``) open as a lazy view of their dense tensors."""
    if ck.metadata.get(VECTOR_FORMAT_KEY, "dense") == "dense":
        return ck
    from capmerge.compression import open_compressed

    return open_compressed(ck)


def _open_dir(ref: str, path: Path, opts: dict[str, Any]) -> Checkpoint:
    files = sorted(p.name for p in path.iterdir() if p.is_file())
    if "adapter_config.json" in files:
        from capmerge.lora import open_adapter

        return open_adapter(ref, path)
    indexes = [f for f in files if f.endswith(".safetensors.index.json")]
    singles = [f for f in files if f.endswith(".safetensors")]
    if len(indexes) > 1:
        raise AmbiguousCheckpointError(
            f"directory holds several weight sets ({', '.join(indexes)}); pass the one to use", ref
        )
    if indexes:
        sharded = _open_index(ref, path / indexes[0])
        loose = [f for f in singles if str(path / f) not in sharded.files]
        if loose:
            raise AmbiguousCheckpointError(
                f"directory holds several weight sets ({', '.join([indexes[0], *loose])}); pass the one to use", ref
            )
        sharded.root = str(path)
        return sharded
    known = [f for f in singles if f in KNOWN_SINGLE_NAMES]
    if len(singles) == 1 and known:
        hdr = read_header(path / singles[0])
        return Checkpoint(ref, [hdr.path], hdr.tensors, hdr.metadata, root=str(path), headers=[hdr])
    if singles:
        raise AmbiguousCheckpointError(
            f"directory holds several candidate weight files ({', '.join(singles)}); pass the file to use", ref
        )
    pickle_indexes = [f for f in files if f.endswith((".bin.index.json", ".pt.index.json"))]
    pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
    if len(pickle_indexes) == 1:
        from capmerge.pickles import open_pickle_index

        ck: Checkpoint = open_pickle_index(ref, path / pickle_indexes[0], **opts)
        ck.root = str(path)
        return ck
    if pickle_indexes or len(pickles) > 1:
        shown = ", ".join((pickle_indexes or pickles)[:5])
        raise AmbiguousCheckpointError(f"directory holds several weight sets ({shown}); pass the one to use", ref)
    if pickles:
        from capmerge.pickles import open_pickle

        ck = open_pickle(ref, path / pickles[0], **opts)
        ck.root = str(path)
        return ck
    others = [f for f in files if f.endswith(WEIGHT_SUFFIXES)]
    if others:
        raise CheckpointError(f"no supported weights in directory (found {', '.join(others[:5])})", ref)
    raise CheckpointNotFoundError(
        "no weights in directory (expected model.safetensors, *.safetensors.index.json, pytorch_model.bin or an "
        "adapter_config.json)",
        ref,
    )


def read_weight_map(index: Path) -> dict[str, str]:
    """The ``weight_map`` (tensor name → shard file) of a ``*.index.json``, validated."""
    try:
        raw = index.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read index: {e.strerror or e}", str(index)) from None
    data = _json.loads(raw, "index", str(index))
    wmap = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wmap, dict) or not all(isinstance(v, str) for v in wmap.values()):
        raise CheckpointError("index has no valid weight_map", str(index))
    return wmap


def _open_index(ref: str, index: Path) -> Checkpoint:
    wmap = read_weight_map(index)
    base = index.parent
    shard_names = sorted(set(wmap.values()))
    headers: dict[str, Header] = {}
    for s in shard_names:
        p = base / s
        if not p.is_file():
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
