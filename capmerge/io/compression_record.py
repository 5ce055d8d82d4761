"""The compression record: what ``compress`` writes into a vector's header about itself, and how it is read back.

Two ``__metadata__`` keys (the file format is in :mod:`capmerge.io.compression` and docs/formats.md):

* ``capmerge.compression``: JSON of the options ``compress`` ran with;
* ``capmerge.compression_report``: compact JSON of what it achieved, ``{"bytes_before", "bytes_after", "ratio",
  "rel_error", "cosine", "tensors": {name: {"storage", "rank" | "nnz" [, "bits"], "method", "rel_error",
  "cosine"}}}`` — totals, and per tensor stored compressed (dense-stored ones are exact and left out).

:func:`compression_info` reads them together with what the stored tensors' headers say (kinds, ranks, sizes), for
any compressed vector, including LoRA-derived ones that carry no record.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from capmerge.io.checkpoint import Checkpoint
from capmerge.io.open import open_checkpoint

OPTIONS_KEY = "capmerge.compression"  # the options compress ran with
REPORT_KEY = "capmerge.compression_report"  # what it achieved: totals and per compressed tensor
PathLike = str | os.PathLike[str]


def _g(x: float) -> float:
    """A float for the header: 10 significant digits are plenty and keep the JSON short."""
    return float(f"{x:.10g}")


def report_json(s: CompressionSummary) -> str:
    """The ``capmerge.compression_report`` header value of a finished ``compress``: totals, and per tensor stored
    compressed its storage, rank / nnz / bits, relative error and cosine (dense-stored tensors are left out: exact,
    and ``capmerge.tensors`` lists them). Bytes per tensor are left out too: the header's own entries give them."""
    rows = {}
    for t in s.tensors:
        if t["storage"] == "dense":
            continue
        row = {k: t[k] for k in ("storage", "rank", "nnz", "bits", "method") if t.get(k) is not None}
        row.update(rel_error=_g(t["rel_error"]), cosine=_g(t["cosine"]))
        rows[t["name"]] = row
    report = {"bytes_before": s.bytes_before, "bytes_after": s.bytes_after, "ratio": _g(s.ratio),
              "rel_error": _g(s.rel_error), "cosine": _g(s.cosine), "tensors": rows}  # fmt: skip
    return json.dumps(report, separators=(",", ":"))


def _json_entry(ck: Checkpoint, key: str) -> dict[str, Any] | None:
    """The JSON object under header key ``key``, or None when it is absent or not a JSON object."""
    try:
        value = json.loads(ck.metadata.get(key, "null"))
    except (ValueError, RecursionError):  # not JSON, nested too deeply, an integer over Python's digit limit
        return None
    return value if isinstance(value, dict) else None


def compression_info(ck: Checkpoint | PathLike) -> dict[str, Any] | None:
    """How a compressed vector is stored and how close it is to the vector it stands for, from its headers only.

    Args:
        ck: an opened checkpoint (or a reference, opened and closed here): a low-rank or sparse vector written by
            ``compress``, a τ of two LoRA adapters (``diff``), or a LoRA adapter directory.

    Returns:
        None for a dense checkpoint. Otherwise a dict: ``kind`` (``lowrank`` | ``sparse``); ``options`` (what
        ``compress`` ran with, or None); ``recorded`` (the errors come from the ``capmerge.compression_report`` header
        key ``compress`` writes); ``exact`` (stored exactly by construction: LoRA factors); ``counts`` (tensors per
        storage); ``ranks`` (``min``/``median``/``max`` over low-rank tensors, or None); ``nnz`` (entries kept by
        sparse tensors); ``bits`` (8 when sparse values are int8); ``bytes_before`` (dense bytes), ``bytes_after``
        (stored bytes), ``ratio`` (after / before); ``rel_error`` ‖τ − τ̂‖/‖τ‖ and ``cosine`` (τ, τ̂) in total (None
        when not recorded); ``tensors``: name → ``storage``, ``rank`` / ``nnz`` / ``bits``, ``bytes_before``,
        ``bytes_after``, ``rel_error``, ``cosine``. Sizes, ranks and counts are read from the stored tensors' headers.
    """
    if not isinstance(ck, Checkpoint):
        opened = open_checkpoint(ck, headers_only=True)
        try:
            return compression_info(opened)
        finally:
            opened.close()
    kind = ck.kind
    if kind == "dense":
        return None
    options = _json_entry(ck, OPTIONS_KEY)
    report = _json_entry(ck, REPORT_KEY)
    report = report if report is not None and isinstance(report.get("tensors"), dict) else None
    exact = ck.metadata.get("capmerge.source") == "lora-adapters" or getattr(ck, "source", None) == "peft-lora"
    recorded = report["tensors"] if report else {}
    tensors: dict[str, dict[str, Any]] = {}
    counts: dict[str, int] = {}
    ranks: list[int] = []
    nnz = before = after = 0
    bits = None
    for name, info in ck.tensors.items():
        st = ck.storage(name)
        storage = st["storage"]
        row: dict[str, Any] = {"storage": storage}
        row.update({k: st[k] for k in ("rank", "nnz", "bits") if st.get(k) is not None})
        row.update(bytes_before=info.nbytes, bytes_after=st["nbytes"])
        if storage == "dense":  # stored as it is
            row.update(rel_error=0.0, cosine=1.0)
        else:
            rec = recorded.get(name) if isinstance(recorded.get(name), dict) else {}
            row.update(rel_error=rec.get("rel_error"), cosine=rec.get("cosine"))
        tensors[name] = row
        counts[storage] = counts.get(storage, 0) + 1
        if "rank" in row:
            ranks.append(row["rank"])
        nnz += row.get("nnz", 0)
        bits = row.get("bits", bits)
        before += row["bytes_before"]
        after += row["bytes_after"]
    ranks.sort()
    return {
        "kind": kind,
        "options": options,
        "recorded": report is not None,
        "exact": exact,
        "counts": dict(sorted(counts.items())),
        "ranks": {"min": ranks[0], "median": ranks[len(ranks) // 2], "max": ranks[-1]} if ranks else None,
        "nnz": nnz,
        "bits": bits,
        "bytes_before": before,
        "bytes_after": after,
        "ratio": after / before if before else 1.0,
        "rel_error": report.get("rel_error") if report else None,
        "cosine": report.get("cosine") if report else None,
        "tensors": tensors,
    }


@dataclass
class CompressionSummary:
    """What ``compress`` did: per tensor and in total, size before/after, relative error, cosine. ``to_dict()`` is
    what ``--json`` prints."""

    output: str
    kind: str
    tensors: list[dict[str, Any]] = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0
    rel_error: float = 0.0
    cosine: float = 1.0
    files: list[str] = field(default_factory=list)
    bytes_written: int = 0
    seconds: float = 0.0

    @property
    def ratio(self) -> float:
        """Stored size / dense size."""
        return self.bytes_after / self.bytes_before if self.bytes_before else 1.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ratio"] = self.ratio
        return d

    def line(self) -> str:
        counts: dict[str, int] = {}
        for t in self.tensors:
            counts[t["storage"]] = counts.get(t["storage"], 0) + 1
        how = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
        return (
            f"compress ({self.kind}): {len(self.tensors)} tensors ({how}); {self.bytes_before / 1e6:.2f} MB -> "
            f"{self.bytes_after / 1e6:.2f} MB ({100 * self.ratio:.1f}%), relative error {self.rel_error:.4g}, "
            f"cosine {self.cosine:.6f} in {self.seconds:.2f} s -> {self.output}"
        )
