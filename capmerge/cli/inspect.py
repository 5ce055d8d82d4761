"""``capmerge inspect PATH... [--json [FILE]] [--plot FILE.png] [--against PATH] [--task P S --capability S A]``."""

from __future__ import annotations

import json
import os
import sys
from typing import Annotated

import typer

from capmerge.cli.app import app, handle_errors

HELP = """Show what a checkpoint or vector holds: header metadata, counts, sizes, and per-tensor / per-layer /
per-module statistics (L2 norm, share of the total, mean |x|, zeros, max |x|) from one streaming pass; compare vectors.

Examples:

  capmerge inspect capvector.safetensors                       # headers + per-layer statistics

  capmerge inspect capvector.safetensors --headers-only        # reads no tensor data

  capmerge inspect cap.safetensors --against task.safetensors --plot cmp.png   # cosines and norm ratios

  capmerge inspect --task P/ S/ --capability S/ A/ --json out.json --plot out.png   # both vectors on the fly
"""


def _json_target(as_json: bool, paths: list[str]) -> str | None:
    """``--json`` prints on stdout; ``--json FILE.json`` writes FILE.json instead.

    ``--json`` is a flag, so FILE.json arrives among the PATHs: a ``*.json`` name that is not an index
    (``*.index.json``) cannot be a checkpoint, so it is taken out of the PATHs as the JSON output.
    """
    if not as_json:
        return None
    outs = [p for p in paths if p.lower().endswith(".json") and not p.lower().endswith(".index.json")]
    if not outs:
        return "-"
    if len(outs) > 1:
        from capmerge.errors import UsageError

        raise UsageError(f"--json takes one output file, got {', '.join(outs)}")
    paths.remove(outs[0])
    return outs[0]


@app.command("inspect", help=HELP)
def inspect_cmd(
    paths: Annotated[
        list[str] | None, typer.Argument(metavar="PATH...", help="Checkpoints or vectors (file, directory, index).")
    ] = None,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json", metavar="[FILE]", help="Print the results as JSON on stdout; --json FILE.json writes FILE.json."
        ),
    ] = False,
    plot: Annotated[
        str | None,
        typer.Option("--plot", metavar="FILE", help="Write a PNG: per-layer norms and cosines (needs matplotlib)."),
    ] = None,
    against: Annotated[
        str | None,
        typer.Option("--against", metavar="PATH", help="Compare every PATH with this vector: cosines, norm ratios."),
    ] = None,
    task: Annotated[
        tuple[str, str] | None,
        typer.Option("--task", metavar="P S", help="Task vector S − P, built on the fly (with --capability)."),
    ] = None,
    capability: Annotated[
        tuple[str, str] | None,
        typer.Option("--capability", metavar="S A", help="Capability vector A − S, compared with the task vector."),
    ] = None,
    by: Annotated[str, typer.Option("--by", help="Table rows: layer | tensor | module.")] = "layer",
    headers_only: Annotated[
        bool, typer.Option("--headers-only", help="Stop after the headers: read no tensor data.")
    ] = False,
    spectrum: Annotated[
        bool, typer.Option("--spectrum", help="Top singular values of 2-D tensors (randomized SVD): energy, ranks.")
    ] = False,
    top: Annotated[int, typer.Option("--top", help="Table rows shown (largest norms first; 0 = all).")] = 20,
    layer_pattern: Annotated[
        str | None, typer.Option("--layer-pattern", help="Regex whose first group is the block index.")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No table on the terminal.")] = False,
) -> None:
    from capmerge.errors import UsageError

    paths = list(paths or [])
    with handle_errors():
        target = _json_target(as_json, paths)
        if top < 0:
            raise UsageError(f"--top must be 0 or more, got {top}")
        if plot is not None:
            from capmerge.analysis.report import require_matplotlib

            if headers_only:
                raise UsageError("--plot needs tensor data; it cannot be combined with --headers-only")
            require_matplotlib()
        for out in (target if target not in (None, "-") else None, plot):
            if out is not None:
                parent = os.path.dirname(os.path.abspath(out))
                if not os.path.isdir(parent):
                    raise UsageError("the output's directory does not exist", out)
                if os.path.isdir(out):
                    raise UsageError("the output is a directory", out)
        inputs = {os.path.abspath(p) for p in [*paths, *(task or ()), *(capability or ()), against] if p}
        for out in (target, plot):
            if out not in (None, "-") and os.path.abspath(out) in inputs:
                raise UsageError("the output would overwrite an input", out)
        from capmerge.analysis.stats import inspect

        result = inspect(paths, against=against, task=task, capability=capability, by=by, spectrum=spectrum,
                         headers_only=headers_only, layer_pattern=layer_pattern)  # fmt: skip
        if plot is not None:
            from capmerge.analysis.report import plot as write_plot

            write_plot(result, plot)
        text = json.dumps(result, indent=2)
        if target == "-":
            print(text)
        elif target is not None:
            from capmerge.io.writer import replace_atomically

            def write_json(tmp: str) -> None:
                with open(tmp, "w", encoding="utf-8") as f:
                    f.write(text + "\n")

            replace_atomically(target, write_json)
    if target != "-" and not quiet:
        from capmerge.analysis.report import print_report

        print_report(result, top=top)
    if not quiet:
        for out, what in ((target if target != "-" else None, "JSON"), (plot, "plot")):
            if out is not None:
                print(f"wrote {what} to {out}", file=sys.stderr)
