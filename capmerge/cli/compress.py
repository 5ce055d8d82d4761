"""``capmerge compress VECTOR -o OUT (--rank R | --energy E | --density D [--bits 8])``."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from capmerge.cli.app import app, fail, handle_errors
from capmerge.cli.common import Exclude, Force, Include, Json, Output, Quiet

HELP = """Compress a capability vector: low rank (truncated SVD per matrix) or sparse (top entries by magnitude).

The output is a safetensors file that every command reads directly (apply, inspect, compress). Reports per tensor
and in total: size before/after, relative error ‖τ − τ̂‖/‖τ‖ and cosine(τ, τ̂).

Examples:

  capmerge compress capvector.safetensors -o tau-r64.safetensors --rank 64

  capmerge compress capvector.safetensors -o tau-e90.safetensors --energy 0.9

  capmerge compress capvector.safetensors -o tau-sparse.safetensors --density 0.05 --bits 8
"""


@app.command("compress", help=HELP)
def compress_cmd(
    vector: Annotated[str, typer.Argument(help="The vector to compress (any checkpoint reference).")],
    output: Output = None,
    rank: Annotated[int | None, typer.Option("--rank", help="Low rank: singular directions kept per matrix.")] = None,
    energy: Annotated[
        float | None, typer.Option("--energy", help="Low rank: fraction of each matrix's squared norm kept, e.g. 0.9.")
    ] = None,
    density: Annotated[
        float | None, typer.Option("--density", help="Sparse: fraction of entries kept (largest magnitudes).")
    ] = None,
    bits: Annotated[int | None, typer.Option("--bits", help="Sparse: 8 stores values as int8 + a scale.")] = None,
    include: Include = None,
    exclude: Exclude = None,
    per_tensor: Annotated[bool, typer.Option("--per-tensor", help="Print one line per tensor on stderr.")] = False,
    force: Force = False,
    quiet: Quiet = False,
    as_json: Json = False,
) -> None:
    with handle_errors():
        if not output:
            raise fail("missing option -o/--output (a .safetensors file or a directory)")
        from capmerge.io.compress import compress

        summary = compress(vector, output, rank=rank, energy=energy, density=density, bits=bits, include=include,
                           exclude=exclude, force=force)  # fmt: skip
    if as_json:
        print(json.dumps(summary.to_dict(), indent=2))
    if not quiet:
        if per_tensor:
            for t in summary.tensors:
                how = f"rank {t['rank']}" if "rank" in t else f"nnz {t['nnz']}" if "nnz" in t else t.get("why", "")
                print(f"  {t['name']}: {t['storage']} ({how}) {t['bytes_before']} -> {t['bytes_after']} bytes, "
                      f"rel error {t['rel_error']:.4g}, cosine {t['cosine']:.6f}", file=sys.stderr)  # fmt: skip
        print(summary.line(), file=sys.stderr)
