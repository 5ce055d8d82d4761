"""``capmerge merge MODEL... [--base B] --method NAME [--t T] [--weights ...] -o OUT``: models merged, optionally
relative to a base (mergekit's merge methods), beside ``apply`` (vectors added to a base)."""

from __future__ import annotations

import math
from typing import Annotated, Any

import typer

from capmerge.cli.app import app, handle_errors
from capmerge.cli.common import Force, Json, Progress, Quiet, report

HELP = """Merge whole models into one, optionally relative to a base model (the model-centric methods of mergekit:
linear, slerp, ties, dare, ...), tensor by tensor in float32. To add capability vectors to a base, use apply.

Per-model parameters (--weights, --density, --param k=a,b): one value, or one per model.

Global parameters (--t, --lambda, --epsilon, --param k=...): one value, or a gradient over the layers (0,0.5,1).

A method's parameters and defaults: capmerge merge --method NAME --list-params.

Examples:

  capmerge merge A/ B/ --method linear --weights 0.7,0.3 -o merged/

  capmerge merge org/model-a@main B/ --base P/ --method slerp --t 0.3 -o merged/

  capmerge merge A/ B/+lora-adapter/ --method linear --weights 1,1 --override 'mlp:weight=0.2/0.8' -o merged/
"""

PerModel = Annotated[str | None, typer.Option(help="Per-model: one value, or one per model (comma-separated).")]
Global = Annotated[str | None, typer.Option(help="Global: one value, or a gradient over the layers (a,b,...).")]


@app.command("merge", help=HELP)
def merge_cmd(
    models: Annotated[
        list[str] | None, typer.Argument(metavar="MODEL...", help="Models (MODEL+LORA: adapter applied).")
    ] = None,
    output: Annotated[
        str | None,
        typer.Option(
            "--output",
            "-o",
            metavar="PATH",
            help="Output: a directory (weights, config, tokenizer, model card) or a .safetensors file.",
        ),
    ] = None,
    method: Annotated[str, typer.Option(help="A model-centric merge method (see --list-params).")] = "linear",
    base: Annotated[str | None, typer.Option(metavar="PATH", help="Base model (required by some methods).")] = None,
    weights: PerModel = None,
    density: PerModel = None,
    t: Global = None,
    lambda_: Annotated[str | None, typer.Option("--lambda", help="Global: λ (one value or a gradient).")] = None,
    epsilon: Global = None,
    gamma: Global = None,
    select_topk: Global = None,
    normalize: Annotated[
        bool | None, typer.Option("--normalize/--no-normalize", help="The method's normalize.")
    ] = None,
    rescale: Annotated[bool | None, typer.Option("--rescale/--no-rescale", help="The method's rescale.")] = None,
    param: Annotated[
        list[str] | None, typer.Option(help="Any parameter of the method: KEY=VALUE (repeatable).")
    ] = None,
    override: Annotated[
        list[str] | None,
        typer.Option(
            help="Per-tensor parameters 'REGEX:key=value,...' (repeatable); lists use / (per model for per-model "
            "parameters, a gradient for global ones). The first matching --override wins, then the options above.",
        ),
    ] = None,
    out_dtype: Annotated[
        str | None,
        typer.Option(
            "--dtype",
            help="Output dtype: float32 | bfloat16 | float16 (default: the dtype each tensor's inputs promote "
            "to: their own where they agree).",
        ),
    ] = None,
    tokenizer_source: Annotated[
        str | None,
        typer.Option(
            help="Tokenizer to copy: base, a model, or union (every model's tokens; embeddings aligned to it) "
            "(default: the base's, else "
            "the first model's).",
        ),
    ] = None,
    chat_template: Annotated[
        str | None,
        typer.Option(
            help="Chat template of the output tokenizer: a name (chatml, llama3, mistral, alpaca, exaone), the "
            "template text, or auto (the models' most common).",
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of random methods (masks depend on seed and tensor name).")] = 0,
    shard_size: Annotated[
        str, typer.Option(help="Largest weight file of a directory output (5GB, 500MB ...).")
    ] = "5GB",
    list_params: Annotated[
        bool, typer.Option("--list-params", help="Print the method's parameters and defaults; merge nothing.")
    ] = False,
    allow_nonfinite: Annotated[
        bool, typer.Option("--allow-nonfinite", help="Keep NaN/Inf produced from finite inputs.")
    ] = False,
    force: Force = False,
    quiet: Quiet = False,
    as_json: Json = False,
) -> None:
    from capmerge.errors import UsageError

    given = {"weight": weights, "density": density, "t": t, "lambda": lambda_, "epsilon": epsilon, "gamma": gamma,
             "select_topk": select_topk, "normalize": normalize, "rescale": rescale}  # fmt: skip
    with handle_errors():
        from capmerge.merge.methods.registry import get_model_method

        m = get_model_method(method)
        if list_params:
            _print_params(m)
            return
        if not models:
            raise UsageError("no models given (capmerge merge MODEL... -o OUT)")
        if not output:
            raise UsageError("missing option -o/--output (a directory or a .safetensors file)")
        values: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
        for item in param or []:
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise UsageError(f"--param {item!r}: expected KEY=VALUE")
            values[key.strip().replace("-", "_")] = value
        spec = build_spec(m, models, base, values, override or [])
        from capmerge.cli.app import command_line
        from capmerge.merge.modelmerge import run_merge

        spec.out_dtype, spec.seed, spec.tokenizer_source, spec.chat_template, spec.command = (
            out_dtype,
            seed,
            tokenizer_source,
            chat_template,
            command_line(),
        )
        progress = Progress(not quiet, "merge")
        try:
            summary = run_merge(spec, output, force=force, allow_nonfinite=allow_nonfinite, shard_size=shard_size,
                                progress=progress)  # fmt: skip
        finally:
            progress.close()
    report(summary, quiet=quiet, as_json=as_json)


def _print_params(m: Any) -> None:
    print(f"{m.name}: {m.summary}" if m.summary else m.name)
    print(f"  base model: {m.base}")
    for scope, params in (("per model", m.model_params), ("global", m.params)):
        for k, d in params.items():
            print(f"  {k:<14} {scope:<10} {'required' if d is None else f'default {d}'}")


def _value(text: str, kind: type, key: str) -> Any:
    from capmerge.errors import UsageError

    text = text.strip()
    if kind is bool:
        low = text.lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise UsageError(f"{key}: expected true or false, got {text!r}")
    if kind is str:
        return text
    try:
        value = float(text) if kind is float or "." in text or "e" in text.lower() else int(text)
    except ValueError:
        raise UsageError(f"{key}: invalid number {text!r}") from None
    if not math.isfinite(value):  # nan, inf: as a configuration's value, refused before anything is read
        raise UsageError(f"{key}: invalid number {text!r} (expected a finite number)")
    return value


def _values(text: Any, kind: type, key: str, sep: str) -> list[Any]:
    if isinstance(text, bool):
        return [text]
    return [_value(x, kind, key) for x in str(text).split(sep)]


_OPTIONS = {"weight": "--weights W", "density": "--density D", "t": "--t T", "lambda": "--lambda L",
            "epsilon": "--epsilon E", "gamma": "--gamma G", "select_topk": "--select-topk K"}  # fmt: skip


def build_spec(m: Any, models: list[str], base: str | None, values: dict[str, Any], overrides: list[str]) -> Any:
    """The :class:`~capmerge.merge.modelmerge.MergeSpec` of a command line, every parameter checked against the
    method's (per-model lists: one value or one per model; global lists: a gradient)."""
    import re

    from capmerge.errors import UsageError
    from capmerge.merge.model_params import Cond, check_param, kind_of, per_model
    from capmerge.merge.modelmerge import MergeSpec, SourceSpec

    known = {**m.params, **m.model_params}

    own: list[dict[str, Any]] = [{} for _ in models]
    glob: dict[str, Any] = {}
    for spec_text in overrides:
        where = f"--override {spec_text!r}"
        filt, sep, rest = spec_text.rpartition(":")
        if not sep or not rest.strip():
            raise UsageError("expected REGEX:key=value[,key=value...]", where)
        try:
            re.compile(filt)
        except re.error as e:
            raise UsageError(f"invalid regex {filt!r} ({e})", where) from None
        for item in rest.split(","):
            key, eq, value = item.partition("=")
            key = key.strip().replace("-", "_")
            key = "weight" if key == "weights" else key
            if not eq:
                raise UsageError(f"invalid parameter {item.strip()!r} (expected key=value)", where)
            check_param(m, key, where)
            vals = _values(value, kind_of(known[key]), key, "/")
            if key in m.model_params:
                for i, v in enumerate(per_model(key, vals, models, base, where)):
                    own[i].setdefault(key, []).append(Cond(v, filt, regex=True))
            else:
                glob.setdefault(key, []).append(Cond(vals if len(vals) > 1 else vals[0], filt, regex=True))
    for key, text in values.items():
        where = f"--{key.replace('_', '-')}" if key != "weight" else "--weights"
        check_param(m, key, where)
        vals = _values(text, kind_of(known[key]), key, ",")
        if key in m.model_params:
            for i, v in enumerate(per_model(key, vals, models, base, where)):
                own[i].setdefault(key, []).append(Cond(v))
        else:
            glob.setdefault(key, []).append(Cond(vals if len(vals) > 1 else vals[0]))
    for key in (k for k, d in known.items() if d is None):  # required, and given nowhere: say which option sets it
        if not glob.get(key) and not any(o.get(key) for o in own):
            opt = _OPTIONS.get(key, f"--param {key}=V")
            per = key in m.model_params
            scope = "for every model (one value, or one per model)" if per else "(one value, or a gradient)"
            raise UsageError(f"{m.name} needs {key} {scope}: pass {opt}")
    return MergeSpec(m.name, models=[SourceSpec(ref, own[i]) for i, ref in enumerate(models)], base=base,
                     parameters=glob)  # fmt: skip
