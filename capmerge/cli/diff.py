"""``capmerge diff BASE AUX [-o OUT]``: write the capability vector τ = AUX − BASE."""

from __future__ import annotations

from typing import Annotated

import typer

from capmerge.cli.app import app, command_line, handle_errors
from capmerge.cli.common import (
    AllowMissing,
    AllowNonfinite,
    Device,
    Exclude,
    Force,
    Include,
    Json,
    Key,
    Output,
    Progress,
    Quiet,
    Rename,
    TrustPickle,
    report,
)


@app.command(
    "diff",
    help="Write the capability vector τ = AUX − BASE (float32 math, rounded once to the output dtype).\n\n"
    "Example: capmerge diff sft/ aux/ -o capvector.safetensors\n\n"
    "Two LoRA adapters of one base: capmerge diff sft_adapter/ aux_adapter/ -o tau.safetensors  (exact, low rank)",
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
    rename: Rename = None,
    key: Key = None,
    trust_pickle: TrustPickle = False,
    dense: Annotated[
        bool, typer.Option("--dense", help="LoRA adapters: write τ dense (base weight names), not low rank.")
    ] = False,
    adapter_base: Annotated[
        str | None,
        typer.Option(
            "--base",
            metavar="PATH",
            help="LoRA adapters: the base model, for modules_to_save weights in one adapter only.",
        ),
    ] = None,
    list_tensors: Annotated[
        bool, typer.Option("--list-tensors", help="Dry run: print the final pairing of tensor names (no data read).")
    ] = False,
    quiet: Quiet = False,
    as_json: Json = False,
) -> None:
    from capmerge.api import diff

    if list_tensors:
        with handle_errors():
            from capmerge.api import diff_pairs

            _print_pairs(diff_pairs(base, aux, rename=rename, key=key, trust_pickle=trust_pickle), as_json)
        return
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
                rename=rename,
                key=key,
                trust_pickle=trust_pickle,
                dense=dense,
                adapter_base=adapter_base,
                command=command_line(),
            )
        finally:
            progress.close()
    report(summary, quiet=quiet, as_json=as_json)


def _print_pairs(desc: dict, as_json: bool) -> None:
    import json
    import sys

    if as_json:
        print(json.dumps(desc, indent=2))
        return
    for name, (b, a) in desc["pairs"].items():
        print(f"  {name}   (BASE {b}, AUX {a})" if (b, a) != (name, name) else f"  {name}")
    for n in desc["only_base"]:
        print(f"  {n}   (only in BASE)")
    for n in desc["only_aux"]:
        print(f"  {n}   (only in AUX)")
    for note in desc["notes"]:
        print(f"note: {note}", file=sys.stderr)
    print(f"{len(desc['pairs'])} pairs, {len(desc['only_base'])} only in BASE, {len(desc['only_aux'])} only in AUX",
          file=sys.stderr)  # fmt: skip
