"""What a diff or apply did (:class:`Summary`, what ``--json`` prints) and the pieces of a run every command shares:
the progress total and the provenance of an input."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from capmerge.io.checkpoint import Checkpoint
from capmerge.merge.engine import Job, read_total


@dataclass
class Summary:
    """What a diff/apply did. ``to_dict()`` is what ``--json`` prints."""

    command: str
    output: str
    files: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    tensors_written: int = 0
    tensors_changed: int = 0
    tensors_unchanged: int = 0
    tensors_skipped: int = 0
    zero_tensors: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    files_skipped: dict[str, str] = field(default_factory=dict)  # side files of BASE not copied, and why
    bytes_read: int = 0  # tensor data read from the inputs, each tensor once, as stored (what the progress bar counts)
    bytes_reread: int = 0  # read a second time by the pruning passes (ties, dare, breadcrumbs, magnitude)
    bytes_written: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)  # renames, prefix normalisation, tied weights, unwrapped pickles
    warnings: list[str] = field(default_factory=list)  # options that had no effect (e.g. an unmatched override)
    tied: dict[str, str] = field(default_factory=dict)  # alias → the tensor it shares (written once)

    @property
    def gb_per_s(self) -> float:
        return (self.bytes_read + self.bytes_written) / 1e9 / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["gb_per_s"] = round(self.gb_per_s, 3)
        d["seconds"] = round(self.seconds, 4)
        return d

    def line(self) -> str:
        """A one-line human summary (what the CLI prints on stderr)."""
        parts = [f"{self.tensors_changed} tensors changed"]
        if self.command == "diff":
            parts.append(f"{len(self.zero_tensors)} unchanged (zero, left out)")
        else:
            parts.append(f"{self.tensors_unchanged} copied unchanged")
        parts.append(f"{self.tensors_skipped} skipped")
        gb = 1e9
        reread = f" (+{self.bytes_reread / gb:.2f} GB re-read by the pruning pass)" if self.bytes_reread else ""
        return (
            f"{self.command}: {', '.join(parts)}; read {self.bytes_read / gb:.2f} GB{reread}, wrote "
            f"{self.bytes_written / gb:.2f} GB in {self.seconds:.2f} s ({self.gb_per_s:.2f} GB/s) -> {self.output}"
        )


def start_progress(progress: Any, jobs: list[Job]) -> None:
    if hasattr(progress, "set_total"):
        progress.set_total(read_total(jobs), len(jobs))  # the same count as the summary's bytes_read


def input_ref(ck: Checkpoint) -> dict[str, str]:
    return {"ref": ck.ref, "fingerprint": ck.fingerprint()}
