"""``capmerge diff BASE AUX [-o OUT]``: write the capability vector τ = AUX − BASE."""

from __future__ import annotations

from typing import Annotated

import typer

from capmerge.cli.app import app, handle_errors
from capmerge.cli.common import (
    AllowMissing,
    AllowNonfinite,
    Device,
    Exclude,
    Force,
    Include,
    Json,
    Output,
    Progress,
    Quiet,
    report,
)


@app.command(
    "diff",
    help="Write the capability vector τ = AUX − BASE (float32 math, rounded once to the output dtype).\n\n"
    "Example: capmerge diff sft/ aux/ -o capvector.safetensors",
)
def diff_cmd(
    base: Annotated[str, typer.Argument(help="Base checkpoint (e.g. the plain-SFT model): file, directory or index.")],
    aux: Annotated[str, typer.Argument(help="Checkpoint trained with auxiliary objectives.")],
    output: Output = None,
    dtype: Annotated[
        str, typer.Option("--dtype", help="auto (each tensor's dtype in AUX) | float32 | bfloat16 | float16.")
    ] = "auto",
    shard_size: Annotated[
        str, typer.Option("--shard-size", help="Largest shard of a directory output (5GB, 500MB, 2GiB...).")
    ] = "5GB",
    include: Include = None,
    exclude: Exclude = None,
    allow_missing: AllowMissing = False,
    allow_nonfinite: AllowNonfinite = False,
    force: Force = False,
    device: Device = "auto",
    quiet: Quiet = False,
    as_json: Json = False,
) -> None:
    from capmerge.api import diff

    progress = Progress(not quiet, "diff")
    with handle_errors():
        try:
            summary = diff(
                base,
                aux,
                output or "capvector.safetensors",
                dtype=dtype,
                include=include,
                exclude=exclude,
                allow_missing=allow_missing,
                shard_size=shard_size,
                force=force,
                allow_nonfinite=allow_nonfinite,
                progress=progress,
                device=device,
            )
        finally:
            progress.close()
    report(summary, quiet=quiet, as_json=as_json)
