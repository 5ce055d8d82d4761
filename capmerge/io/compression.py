"""Compressed capability vectors: low-rank and sparse, each a valid safetensors file.

File format (also in docs/formats.md, "Vector file format"). The header's ``__metadata__`` holds

* ``capmerge.vector_format``: ``lowrank`` or ``sparse`` (absent or ``dense``: a plain vector, one tensor per name);
* ``capmerge.tensors``: JSON ``{name: {"dtype": "BF16", "shape": [m, n], "storage": "dense" | "lowrank" | "sparse"}}``
  — the dense tensors the file stands for;
* ``capmerge.compression`` and ``capmerge.compression_report``: what ``compress`` ran with and achieved (see
  :mod:`capmerge.io.compression_record`, which writes them and reads them back: ``compression_info``).

and per tensor ``name`` of that map:

* ``dense``: the tensor itself under ``name``;
* ``lowrank``: ``name.lora_B`` [m, r] and ``name.lora_A`` [r, n·…] with τ = (B·A).reshape(shape), computed in
  float32 and rounded once to ``dtype`` (any scale is folded into B and A);
* ``sparse``: ``name.indices`` (I32, or I64 above 2³¹ elements: ascending flat row-major indices) and
  ``name.values`` (``dtype``, or I8 with a float32 scalar ``name.scale``: value = q·scale); every other entry is 0.

:func:`open_compressed` opens such a file as a lazy view of the dense tensors (one reconstruction at a time), which is
what ``open_checkpoint`` returns for it, so ``apply``, every merge method and ``inspect`` read it unchanged.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable
from typing import Any

from capmerge._version import __version__
from capmerge.errors import CheckpointError
from capmerge.io.checkpoint import DTYPES, VECTOR_FORMAT_KEY, Checkpoint, TensorInfo
from capmerge.io.lazy import LazyCheckpoint

TENSORS_KEY = "capmerge.tensors"
KINDS = ("dense", "lowrank", "sparse")
PathLike = str | os.PathLike[str]


# -- reading -------------------------------------------------------------------------------------------------------
def _acc(code: str) -> Any:
    import torch

    return torch.float64 if code == "F64" else torch.float32


def _needs_check(finite: bool, bound: float, code: str) -> bool:
    """Whether blocks must be checked for NaN/Inf: stored parts all finite, and a bound on |element| that does not
    rule out overflow in ``code`` (or in the float32 arithmetic)."""
    import torch

    from capmerge._torch import torch_dtype

    return finite and not bound < float(torch.finfo(torch_dtype(code)).max)


class LowRankBlocks:
    """τ = B·A (B [m, r], A [r, c]), flat row-major, built in tiles at fixed positions: ``BLOCK_ELEMS // c`` rows
    at a time (a row in ``BLOCK_ELEMS``-column pieces when c is larger), each computed in float32 (float64 for F64)
    and rounded once to ``code``. An element's value does not depend on the range it is read in."""

    def __init__(self, b: Any, a: Any, code: str, *, finite: bool | None = None) -> None:
        import torch

        from capmerge._torch import torch_dtype

        acc = _acc(code)
        self.b, self.a = b.to(acc), a.to(acc)
        self.dt = torch_dtype(code)
        self.rows, self.rank = self.b.shape
        self.cols = self.a.shape[1]
        if finite is None:
            finite = bool(torch.isfinite(self.b).all()) and bool(torch.isfinite(self.a).all())
        bmax = float(self.b.abs().max()) if self.b.numel() else 0.0
        amax = float(self.a.abs().max()) if self.a.numel() else 0.0
        self.check = _needs_check(finite, self.rank * bmax * amax, code)
        self.overflow = False
        self._tile: tuple[int, Any] | None = None  # the last tile built (start element, flat values)

    def _tile_at(self, pos: int) -> tuple[int, Any]:
        from capmerge.io.lazy import BLOCK_ELEMS

        row, col = divmod(pos, self.cols)
        if self.cols <= BLOCK_ELEMS:
            per = BLOCK_ELEMS // self.cols
            r0 = row // per * per
            c0, c1, r1 = 0, self.cols, min(self.rows, r0 + per)
        else:
            r0, r1 = row, row + 1
            c0 = col // BLOCK_ELEMS * BLOCK_ELEMS
            c1 = min(self.cols, c0 + BLOCK_ELEMS)
        start = r0 * self.cols + c0
        if self._tile is not None and self._tile[0] == start:
            return self._tile
        self._tile = None  # release the previous tile before building the next
        t = (self.b[r0:r1] @ self.a[:, c0:c1]).to(self.dt).reshape(-1)
        if self.check and not bool(t.isfinite().all()):
            self.overflow = True
        self._tile = (start, t)
        return self._tile

    def singular_values(self, rows: int, cols: int, k: int) -> tuple[Any, float, bool]:
        """(σ of B·A, ‖B·A‖²_F, exact) from an r × r problem: with B = Q_b·R_b and Aᵀ = Q_a·R_a (Q orthonormal),
        σ(B·A) = σ(R_b·R_aᵀ), in float64 — without building B·A (of the unrounded product)."""
        import torch

        rb = torch.linalg.qr(self.b.double(), mode="r").R
        ra = torch.linalg.qr(self.a.double().T, mode="r").R
        core = rb @ ra.T
        return torch.linalg.svdvals(core), float(core.square().sum()), True

    def fill(self, start: int, end: int, out: Any) -> None:
        pos = start
        while pos < end:
            t0, t = self._tile_at(pos)
            take = min(end, t0 + t.numel()) - pos
            out[pos - start : pos - start + take] = t[pos - t0 : pos - t0 + take]
            pos += take


class SparseBlocks:
    """The dense view of sparse entries: ``values`` (times ``scale``, in float32 — float64 for F64 — rounded once to
    ``code``) at flat ``indices``, zeros elsewhere. The indices are checked once: in range, strictly increasing."""

    def __init__(self, indices: Any, values: Any, scale: Any, code: str, numel: int, name: str, where: str) -> None:
        import torch

        from capmerge._torch import torch_dtype

        idx = indices.reshape(-1).long()
        if idx.numel():
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0:
                at = int((idx < 0).nonzero()[0])
                raise CheckpointError(f"sparse tensor {name} has a negative index ({int(idx[at])} at position {at})",
                                      where)  # fmt: skip
            if hi >= numel:
                at = int((idx >= numel).nonzero()[0])
                raise CheckpointError(f"sparse tensor {name} has an index past its {numel} elements "
                                      f"({int(idx[at])} at position {at})", where)  # fmt: skip
            step = idx[1:] - idx[:-1]
            if idx.numel() > 1 and not bool((step > 0).all()):
                at = int((step <= 0).nonzero()[0]) + 1
                what = "repeated" if int(step[at - 1]) == 0 else f"after {int(idx[at - 1])}"
                raise CheckpointError(f"sparse tensor {name} has indices that are not strictly increasing "
                                      f"({int(idx[at])} {what} at position {at})", where)  # fmt: skip
        acc = _acc(code)
        self.idx, self.values = idx, values.reshape(-1)
        self.scale = scale.reshape(()).to(acc) if scale is not None else None
        self.acc, self.dt = acc, torch_dtype(code)
        finite = (not values.is_floating_point() or bool(torch.isfinite(values).all())) and (
            self.scale is None or bool(torch.isfinite(self.scale)))  # fmt: skip
        vmax = float(self.values.abs().max()) if self.values.numel() else 0.0
        self.check = _needs_check(finite, vmax * (abs(float(self.scale)) if self.scale is not None else 1.0), code)
        self.overflow = False

    def singular_values(self, rows: int, cols: int, k: int) -> tuple[Any, float, bool]:
        """(top singular values, ‖τ‖²_F, exact=False) of the dense view as a rows × cols matrix, by a randomized SVD
        of the sparse matrix (seeded: the same values every run) — without building the dense matrix."""
        import torch

        v = self.values.to(self.acc)
        v = (v * self.scale if self.scale is not None else v).to(self.dt).double()
        ij = torch.stack([self.idx // cols, self.idx % cols])  # checked: in range, ascending, no repeats
        m = torch.sparse_coo_tensor(ij, v, (rows, cols), is_coalesced=True, check_invariants=False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            _, s, _ = torch.svd_lowrank(m, q=min(k + 10, rows, cols), niter=4)
        return s, float(v.square().sum()), False

    def fill(self, start: int, end: int, out: Any) -> None:
        import torch

        lo, hi = (int(i) for i in torch.searchsorted(self.idx, torch.tensor([start, end])))
        out.zero_()
        if hi > lo:
            v = self.values[lo:hi].to(self.acc)
            v = (v * self.scale if self.scale is not None else v).to(self.dt)
            out[self.idx[lo:hi] - start] = v
            if self.check and not bool(v.isfinite().all()):
                self.overflow = True


class StoredBlocks:
    """A tensor stored as it is: its bytes, a range at a time."""

    overflow = False

    def __init__(self, ck: Checkpoint, info: TensorInfo) -> None:
        self.ck, self.info = ck, info

    def fill(self, start: int, end: int, out: Any) -> None:
        import torch

        if end > start:
            view = memoryview(out.view(torch.uint8).numpy()).cast("B")
            self.ck.read_into(self.info, start * self.info.itemsize, view)


def lowrank_dense(b: Any, a: Any, code: str, shape: tuple[int, ...]) -> Any:
    """τ = B·A, whole, as :class:`LowRankBlocks` builds it (float32 — float64 for F64 — rounded once to ``code``)."""
    import torch

    from capmerge._torch import torch_dtype

    out = torch.empty(b.shape[0] * a.shape[1], dtype=torch_dtype(code))
    LowRankBlocks(b, a, code).fill(0, out.numel(), out)
    return out.reshape(shape)


def sparse_dense(idx: Any, values: Any, scale: Any, code: str, shape: tuple[int, ...]) -> Any:
    """The dense tensor of a sparse entry (values scattered at flat indices, zeros elsewhere), whole."""
    import torch

    from capmerge._torch import torch_dtype

    out = torch.empty(math.prod(shape), dtype=torch_dtype(code))
    SparseBlocks(idx, values, scale, code, out.numel(), "", "").fill(0, out.numel(), out)
    return out.reshape(shape)


def _parts(name: str, storage: str) -> list[str]:
    if storage == "lowrank":
        return [f"{name}.lora_B", f"{name}.lora_A"]
    if storage == "sparse":
        return [f"{name}.indices", f"{name}.values"]
    return [name]


MAX_NUMEL = 2**63 - 1  # what a safetensors shape can describe


def _entry(name: str, e: Any, where: str) -> tuple[str, tuple[int, ...], str]:
    """(dtype, shape, storage) of one ``capmerge.tensors`` entry, checked."""
    if not isinstance(e, dict):
        raise CheckpointError(f"invalid {TENSORS_KEY} entry of tensor {name} (not an object)", where)
    code, shape, storage = e.get("dtype"), e.get("shape"), e.get("storage")
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                              for s in shape):  # fmt: skip
        raise CheckpointError(f"invalid shape {shape!r} in the {TENSORS_KEY} entry of tensor {name}", where)
    if math.prod(shape) > MAX_NUMEL:
        raise CheckpointError(f"shape {shape} in the {TENSORS_KEY} entry of tensor {name} is too large", where)
    if not isinstance(code, str) or code not in DTYPES or not isinstance(storage, str) or storage not in KINDS:
        raise CheckpointError(f"invalid dtype or storage in the {TENSORS_KEY} entry of tensor {name}", where)
    if storage != "dense" and not DTYPES[code][1]:
        raise CheckpointError(f"{storage} tensor {name} has the non-float dtype {code}", where)
    return code, tuple(shape), storage


def open_compressed(ck: Checkpoint) -> LazyCheckpoint:
    """A lazy view of the dense tensors of a low-rank or sparse vector ``ck`` (checked against its header)."""
    kind = ck.metadata.get(VECTOR_FORMAT_KEY, "dense")
    if kind not in KINDS:
        raise CheckpointError(f"unknown {VECTOR_FORMAT_KEY} {kind!r} (expected one of {', '.join(KINDS)})", ck.ref)
    try:
        table = json.loads(ck.metadata.get(TENSORS_KEY, ""))
        assert isinstance(table, dict)
    except (json.JSONDecodeError, AssertionError, RecursionError, ValueError):
        raise CheckpointError(f"{kind} vector without a valid {TENSORS_KEY} header entry", ck.ref) from None
    infos: dict[str, TensorInfo] = {}
    blocks: dict[str, Callable[[], Any]] = {}
    storages: dict[str, dict[str, Any]] = {}
    for name, e in table.items():
        code, shape, storage = _entry(name, e, ck.ref)
        parts = _parts(name, storage)
        missing = [p for p in parts if p not in ck.tensors]
        if missing:
            raise CheckpointError(f"{storage} tensor {name} lacks {', '.join(missing)}", ck.ref)
        got = [ck.tensors[p] for p in parts]
        numel = math.prod(shape)
        nbytes = sum(i.nbytes for i in got)
        st: dict[str, Any] = {"storage": storage, "nbytes": nbytes, "dtype": code}
        if storage == "dense":
            ok = got[0].shape == shape and got[0].dtype == code
        elif storage == "lowrank":
            b, a = got
            ok = (
                len(b.shape) == 2
                and len(a.shape) == 2
                and b.is_float
                and a.is_float
                and b.shape[1] == a.shape[0]
                and b.shape[0] * a.shape[1] == numel
            )
            ok = ok and len(shape) >= 2 and b.shape[0] == shape[0]
            st["rank"] = b.shape[1] if ok else 0
        else:
            i, v = got
            ok = i.shape == v.shape and len(i.shape) == 1 and i.dtype in ("I32", "I64") and i.shape[0] <= numel
            st["nnz"] = i.shape[0] if ok else 0
            if v.dtype == "I8":
                st["bits"] = 8
                sc = ck.tensors.get(f"{name}.scale")
                ok = ok and sc is not None and sc.dtype == "F32" and sc.numel == 1
                if sc is not None:
                    parts.append(sc.name)
                    st["nbytes"] += sc.nbytes
            else:
                ok = ok and v.dtype == code
        if not ok:
            what = {"dense": "stored tensor", "lowrank": "factors", "sparse": "indices and values"}[storage]
            raise CheckpointError(f"{what} of {storage} tensor {name} ({_shapes(got)}) do not match its shape "
                                  f"{list(shape)} and dtype {code}", ck.ref)  # fmt: skip
        infos[name] = TensorInfo(name, code, shape, got[0].shard, 0, numel * DTYPES[code][0])
        blocks[name] = _opener(ck, name, storage, parts, code, numel)
        storages[name] = st
    return LazyCheckpoint(
        ck.ref,
        ck.files,
        infos,
        ck.metadata,
        root=ck.root,
        index_path=ck.index_path,
        headers=ck.headers,
        blocks=blocks,
        vector_kind=kind,
        storages=storages,
        source="compressed",
        digest=ck.fingerprint(),
        keep_alive=[ck],
    )


def _shapes(infos: list[TensorInfo]) -> str:
    return ", ".join(f"{i.name.rsplit('.', 1)[-1] if '.' in i.name else i.name} {i.dtype} {list(i.shape)}"
                     for i in infos)  # fmt: skip


def _opener(ck: Checkpoint, name: str, storage: str, parts: list[str], code: str, numel: int) -> Callable[[], Any]:
    def open_blocks() -> Any:
        if storage == "dense":
            return StoredBlocks(ck, ck.tensors[parts[0]])
        ts = [ck.read_tensor(p) for p in parts]
        if storage == "lowrank":
            return LowRankBlocks(ts[0], ts[1], code)
        where = ck.tensors[parts[0]].shard
        return SparseBlocks(ts[0], ts[1], ts[2] if len(ts) > 2 else None, code, numel, name, where)

    return open_blocks


# -- writing -------------------------------------------------------------------------------------------------------
def write_vector(
    output: PathLike,
    inputs: list[Checkpoint],
    planned: list[tuple[str, str, tuple[int, ...]]],
    tensors: Iterable[tuple[str, Any]],
    metadata: Callable[[], dict[str, str]],
    *,
    force: bool = False,
) -> tuple[list[str], int]:
    """Write ``tensors`` (name, CPU tensor), one at a time, into one safetensors file at ``output`` (a
    ``.safetensors`` file, or ``capvector.safetensors`` in a directory), atomically. ``planned`` bounds the names,
    dtypes and shapes (to size the header); ``metadata()`` is called once all tensors are written."""
    import torch

    from capmerge._torch import SAFETENSORS_CODES
    from capmerge.io.writer import VECTOR_NAME, Output, SafetensorsFile, _pwrite_all, _write_error, finish_files

    out = Output(output, inputs, force=force)
    try:
        rel = "" if out.single_file else VECTOR_NAME + ".safetensors"
        f = SafetensorsFile(out.path_for(rel), planned, metadata_room=4096 + 200 * len(planned), check_space=False)
        out.files.append(f)
        for name, t in tensors:
            t = t.contiguous()
            nbytes = t.numel() * t.element_size()
            off = f.place(name, SAFETENSORS_CODES[t.dtype], tuple(t.shape), nbytes)
            if nbytes:
                try:
                    _pwrite_all(f.fd, t.reshape(-1).view(torch.uint8).numpy().data, off)
                except OSError as e:
                    raise _write_error(e, f.path) from e
        names, written = finish_files(out, [(os.path.basename(out.out) if out.single_file else rel, f)],
                                       metadata(), None)  # fmt: skip
        out.commit()
    except BaseException:
        out.abort()
        raise
    return names, written


def vector_metadata(kind: str, table: dict[str, dict[str, Any]], extra: dict[str, str]) -> dict[str, str]:
    return {
        "format": "pt",
        "capmerge.kind": "capability-vector",
        "capmerge.version": __version__,
        **extra,
        VECTOR_FORMAT_KEY: kind,
        TENSORS_KEY: json.dumps(table, separators=(",", ":")),
    }


# -- compression ---------------------------------------------------------------------------------------------------
