"""Options shared by several commands, progress display and summary output."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer

Output = Annotated[
    str | None, typer.Option("--output", "-o", metavar="PATH", help="Output: a .safetensors file, or a directory.")
]
Force = Annotated[bool, typer.Option("--force", "-f", help="Replace an existing output (atomically).")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar and no summary on stderr.")]
Json = Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout.")]
AllowMissing = Annotated[
    bool, typer.Option("--allow-missing", help="Skip (and report) tensors present on one side only.")
]
AllowNonfinite = Annotated[
    bool, typer.Option("--allow-nonfinite", help="Keep NaN/Inf produced from finite inputs instead of failing.")
]
Include = Annotated[
    list[str] | None, typer.Option("--include", help="Only tensors whose name matches this regex (repeatable).")
]
Device = Annotated[
    str,
    typer.Option(
        "--device", help="auto (a CUDA GPU when present and triton imports) | cpu | cuda | cuda:N. Same results."
    ),
]
Exclude = Annotated[
    list[str] | None, typer.Option("--exclude", help="Leave out tensors matching this regex (repeatable).")
]

Rename = Annotated[
    list[str] | None,
    typer.Option("--rename", help="'REGEX=REPLACEMENT' applied to the tensor names of every input before pairing "
                 "(repeatable). Wrapper prefixes (module., _orig_mod., model., base_model.model.) pair automatically."),
]  # fmt: skip
Key = Annotated[
    str | None, typer.Option("--key", help="Entry of a nested .bin/.pt state dict to use (e.g. state_dict, model).")
]
TrustPickle = Annotated[
    bool,
    typer.Option("--trust-pickle", help="Load pickles that hold more than tensors (RUNS CODE from the file)."),
]


class Progress:
    """A rich progress bar on stderr (tensors, bytes, throughput); a no-op unless stderr is a terminal."""

    def __init__(self, enabled: bool, label: str) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self.label = label
        self._bar: Any = None
        self._task: Any = None
        self._tensors = 0
        self._total_tensors = 0

    def set_total(self, total_bytes: int, total_tensors: int) -> None:
        if not self.enabled:
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )
        from rich.progress import Progress as RichProgress

        self._total_tensors = total_tensors
        self._bar = RichProgress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[tensors]}"),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self._task = self._bar.add_task(self.label, total=total_bytes, tensors=f"0/{total_tensors} tensors")
        self._bar.start()

    def __call__(self, done_bytes: int, tensors: int) -> None:
        if self._bar is None:
            return
        self._tensors += tensors
        self._bar.update(self._task, completed=done_bytes, tensors=f"{self._tensors}/{self._total_tensors} tensors")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def report(summary: Any, *, quiet: bool, as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary.to_dict(), indent=2))
    if not quiet:
        for note in getattr(summary, "notes", []):
            print(f"note: {note}", file=sys.stderr)
        for warning in getattr(summary, "warnings", []):
            print(f"warning: {warning}", file=sys.stderr)
        print(summary.line(), file=sys.stderr)
        if summary.skipped:
            shown = list(summary.skipped.items())[:10]
            more = f" (+{len(summary.skipped) - 10} more)" if len(summary.skipped) > 10 else ""
            print("skipped: " + "; ".join(f"{n}: {why}" for n, why in shown) + more, file=sys.stderr)
        for name, why in getattr(summary, "files_skipped", {}).items():
            print(f"warning: {name} not copied into the output: {why}", file=sys.stderr)
