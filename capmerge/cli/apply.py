"""``capmerge apply BASE VECTOR... -o OUT [--alpha A] [--method NAME] ...``: θ_out = θ_base + α·δ."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from capmerge.cli.app import app, fail, handle_errors
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
from capmerge.merge.methods.registry import METHODS

HELP = """Merge capability vectors into a checkpoint: θ_out = θ_base + α·δ, δ = Σ w_i·m_i·prune(τ_i)
(float32 math, rounded once to the output dtype). To merge whole models (linear, slerp ...), use merge.

Examples:

  capmerge apply pretrained/ capvector.safetensors -o meta/ --alpha 0.5

  capmerge apply P/ spatial.safetensors reasoning.safetensors -o M/ --method ties --density 0.3 --weights 0.6,0.4

  capmerge apply P/ --add aux/ --sub sft/ --alpha 0.8 -o meta/     # P + α·(aux − sft) in one pass

  capmerge apply P/ vec.safetensors --alpha 0.2,0.5,1.0 -o 'meta-{alpha}/'   # a sweep, inputs read once

  capmerge apply P/ v1.safetensors v2.safetensors -o M/ --override 'self_attn:alpha=0.3,density=0.2/0.5'
"""


@app.command("apply", help=HELP)
def apply_cmd(
    base: Annotated[str, typer.Argument(help="Checkpoint to merge into (e.g. the pretrained model).")],
    vectors: Annotated[list[str] | None, typer.Argument(metavar="VECTOR...", help="Capability vectors τ_i.")] = None,
    output: Output = None,
    alpha: Annotated[
        str, typer.Option("--alpha", "-a", help="Global scale α, or a list for a sweep (-o needs {alpha}).")
    ] = "1.0",
    method: Annotated[
        str | None,
        typer.Option(help="A merge method: " + " | ".join(METHODS) + " (its options can be overridden one by one)."),
    ] = None,
    weights: Annotated[str | None, typer.Option(help="One weight per vector, e.g. 0.6,0.4 (default 1).")] = None,
    density: Annotated[
        str | None, typer.Option(help="Fraction kept when pruning: one value, one per vector, or a {density} sweep.")
    ] = None,
    gamma: Annotated[float | None, typer.Option(help="breadcrumbs: fraction of largest entries dropped.")] = None,
    sign: Annotated[str | None, typer.Option(help="Sign election: total | frequency | none.")] = None,
    normalize: Annotated[bool | None, typer.Option("--normalize/--no-normalize", help="Divide δ by Σ w_i·m_i.")] = None,
    rescale: Annotated[
        bool | None, typer.Option("--rescale/--no-rescale", help="DARE: divide kept entries by the density.")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="DARE seed (masks depend on seed, tensor name, index).")] = None,
    include: Include = None,
    exclude: Exclude = None,
    layers: Annotated[str | None, typer.Option(help="Only these transformer blocks, e.g. 0-7,12.")] = None,
    layer_pattern: Annotated[
        str | None, typer.Option(help="Regex whose first group is the block index (overrides the default rule).")
    ] = None,
    alpha_gradient: Annotated[
        str | None, typer.Option(help="Per-layer α, e.g. 1.0,0.5,0.0, interpolated over the block index.")
    ] = None,
    override: Annotated[
        list[str] | None,
        typer.Option(
            "--override",
            help="Per-tensor parameters 'REGEX:key=value,...' (repeatable): alpha, weight, density, gamma, "
            "density_gradient; lists use / (density=0.2/0.5 per vector, alpha=1/0.5/0 a gradient over blocks). "
            "For each tensor and parameter the first matching --override wins.",
        ),
    ] = None,
    add: Annotated[
        list[str] | None, typer.Option(metavar="PATH", help="Three-checkpoint form: τ = ADD − SUB (repeatable).")
    ] = None,
    sub: Annotated[
        list[str] | None, typer.Option(metavar="PATH", help="Paired with --add in order (default: BASE).")
    ] = None,
    list_tensors: Annotated[
        bool, typer.Option("--list-tensors", help="Dry run: print which tensors the mask selects (no data read).")
    ] = False,
    dtype: Annotated[
        str, typer.Option("--dtype", help="auto (each base tensor's dtype) | float32 | bfloat16 | float16.")
    ] = "auto",
    allow_missing: AllowMissing = False,
    allow_nonfinite: AllowNonfinite = False,
    allow_model_as_vector: Annotated[
        bool,
        typer.Option(
            "--allow-model-as-vector",
            help="Add a VECTOR that is evidently a whole model as it is (refused by default: pass a model as "
            "--add MODEL, which adds MODEL − BASE).",
        ),
    ] = False,
    force: Force = False,
    device: Device = "auto",
    rename: Rename = None,
    key: Key = None,
    trust_pickle: TrustPickle = False,
    quiet: Quiet = False,
    as_json: Json = False,
) -> None:
    from capmerge.merge.masks import parse_float_list

    with handle_errors():
        alphas = parse_float_list(alpha, "--alpha")
        gradient = parse_float_list(alpha_gradient, "--alpha-gradient") if alpha_gradient else None
        weight_list = parse_float_list(weights, "--weights") if weights else None
        densities = parse_float_list(density, "--density") if density else None
        from capmerge.merge.options import ApplyOptions

        opts = ApplyOptions(
            alpha=alphas, dtype=dtype, method=method, weights=weight_list, density=densities, gamma=gamma, sign=sign,
            normalize=normalize, rescale=rescale, seed=seed, include=include, exclude=exclude, layers=layers,
            layer_pattern=layer_pattern, alpha_gradient=gradient, overrides=override, add=add or [], sub=sub or [],
            allow_missing=allow_missing, force=force, allow_nonfinite=allow_nonfinite, device=device, rename=rename,
            key=key, trust_pickle=trust_pickle, allow_model_as_vector=allow_model_as_vector,
        )  # fmt: skip
        if list_tensors:
            from capmerge.merge.apply import describe

            desc = describe(base, vectors or [], opts)
            _print_listing(desc, as_json, show_params=bool(override or alpha_gradient))
            return
        if not output:
            raise fail("missing option -o/--output (a .safetensors file or a directory)")
        from capmerge.merge.apply import run_apply

        progress = Progress(not quiet, "apply")
        try:
            summary = run_apply(base, vectors or [], output, opts, progress=progress)
        finally:
            progress.close()
    report(summary, quiet=quiet, as_json=as_json)


def _print_listing(desc: dict, as_json: bool, show_params: bool = False) -> None:
    if as_json:
        print(json.dumps(desc, indent=2))
        return
    pairs = desc.get("pairs", {})
    params = desc.get("params", {}) if show_params else {}
    for n in desc["selected"]:
        via = "; ".join(f"{name} in {ref}" for ref, name in pairs.get(n, []))
        print(f"  merge  {n}" + (f"   {_params_text(params[n])}" if n in params else "")
              + (f"   <- {via}" if via else ""))  # fmt: skip
    for n in desc["not_selected"]:
        print(f"  copy   {n}   (outside the mask)")
    for note in desc.get("notes", []):
        print(f"note: {note}", file=sys.stderr)
    for warning in desc.get("warnings", []):
        print(f"warning: {warning}", file=sys.stderr)
    c = desc["counts"]
    layers = ", ".join(f"{k}: {v}" for k, v in desc.get("by_layer", {}).items())
    print(
        f"{c['selected']} tensors selected, {c['not_selected']} outside the mask, {c['untouched']} not in any vector"
        + (f"; by layer: {layers}" if layers else ""),
        file=sys.stderr,
    )


def _params_text(p: dict) -> str:
    """``alpha=0.5 weights=1 density=0.3 gamma=0.01 [override 1: alpha, density]``."""
    from capmerge.merge.masks import format_number

    def fmt(v: object) -> str:
        if isinstance(v, list):
            vals = sorted(set(v), key=v.index)
            return ",".join(format_number(x) for x in (vals if len(vals) > 1 else vals[:1]))
        return format_number(float(v))  # type: ignore[arg-type]

    text = " ".join(f"{k}={fmt(p[k])}" for k in ("alpha", "weights", "density", "gamma"))
    by: dict[int, list[str]] = {}
    for k, i in p.get("overrides", {}).items():
        by.setdefault(i, []).append(k)
    return text + "".join(f" [override {i}: {', '.join(ks)}]" for i, ks in sorted(by.items()))
