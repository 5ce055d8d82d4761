"""``capmerge apply BASE VECTOR... -o OUT [--alpha A]``: θ_out = θ_base + α·Σ τ_i."""

from __future__ import annotations

from typing import Annotated

import typer

from capmerge.cli.app import app, fail, handle_errors
from capmerge.cli.common import AllowMissing, AllowNonfinite, Force, Json, Output, Progress, Quiet, report


@app.command(
    "apply",
    help="Add capability vectors to a checkpoint: θ_out = θ_base + α·Σ τ_i\n\n"
    "(float32 math, rounded once to the output dtype).\n\n"
    "Example: capmerge apply pretrained/ capvector.safetensors -o meta/ --alpha 0.5",
)
def apply_cmd(
    base: Annotated[str, typer.Argument(help="Checkpoint to add the vectors to (e.g. the pretrained model).")],
    vectors: Annotated[list[str], typer.Argument(help="One or more capability vectors.")],
    output: Output = None,
    alpha: Annotated[float, typer.Option("--alpha", "-a", help="Global scale α of the summed vectors.")] = 1.0,
    dtype: Annotated[
        str, typer.Option("--dtype", help="auto (each base tensor's dtype) | float32 | bfloat16 | float16.")
    ] = "auto",
    allow_missing: AllowMissing = False,
    allow_nonfinite: AllowNonfinite = False,
    force: Force = False,
    quiet: Quiet = False,
    as_json: Json = False,
) -> None:
    from capmerge.api import apply

    if not output:
        raise fail("missing option -o/--output (a .safetensors file or a directory)")
    progress = Progress(not quiet, "apply")
    with handle_errors():
        try:
            summary = apply(
                base,
                vectors,
                output,
                alpha=alpha,
                dtype=dtype,
                allow_missing=allow_missing,
                force=force,
                allow_nonfinite=allow_nonfinite,
                progress=progress,
            )
        finally:
            progress.close()
    report(summary, quiet=quiet, as_json=as_json)
