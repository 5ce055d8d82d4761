"""``capmerge run RECIPE.yaml [key=value ...]`` and ``capmerge recipes list|show|copy|validate``."""

from __future__ import annotations

import json
import os
import shutil
import sys
from typing import Annotated, Any

import typer

from capmerge.cli.app import app, handle_errors
from capmerge.cli.common import Force, Progress, report
from capmerge.errors import UsageError

RUN_HELP = """Run a YAML recipe: steps (diff, apply, inspect, compress, push) with named outputs, ${var} variables
set with key=value, intermediate outputs cached in a work directory by content key. A mergekit configuration (a
YAML file with a top-level merge_method) runs unchanged: capmerge run config.yml -o OUT, or as mergekit-yaml takes
it: capmerge run config.yml OUT [--cuda --out-shard-size 1B ...: its options] (docs/mergekit.md).

Examples:

  capmerge run capvector.yaml pretrained=P/ sft=S/ aux=A/ alpha=0.6

  capmerge run mergekit-config.yml -o merged/     # a mergekit configuration (mergekit-yaml config.yml merged/)

  capmerge run my-recipe.yaml --plan          # validate and print the resolved steps; nothing runs

  capmerge recipes list                       # the shipped recipes; `capmerge recipes copy NAME .` to start one
"""

recipes_app = typer.Typer(help="The shipped recipes: list, show, copy; validate any recipe file.", no_args_is_help=True)
app.add_typer(recipes_app, name="recipes")


def _progress(quiet: bool) -> Any:
    if quiet:
        return None

    def show(step: str, status: str) -> None:
        if status == "running":
            print(f"step {step}: running", file=sys.stderr)

    return show


@app.command("run", help=RUN_HELP, context_settings={"ignore_unknown_options": True})
def run_cmd(
    recipe: Annotated[str, typer.Argument(help="Recipe file, or the name of a shipped recipe.")],
    overrides: Annotated[
        list[str] | None, typer.Argument(metavar="KEY=VALUE...", help="Variable values: name=value ...")
    ] = None,
    plan: Annotated[bool, typer.Option("--plan", help="Validate and print the resolved steps; run nothing.")] = False,
    workdir: Annotated[
        str | None, typer.Option("--workdir", metavar="DIR", help="Work directory (overrides workdir:).")
    ] = None,
    rerun: Annotated[bool, typer.Option("--rerun", help="Ignore cached step outputs; run every step.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the run (or plan) as JSON on stdout.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress on stderr.")] = False,
    output: Annotated[
        str | None,
        typer.Option("--output", "-o", metavar="PATH", help="mergekit configurations: the output directory."),
    ] = None,
    force: Force = False,
) -> None:
    from capmerge.recipes.mergekit import is_config
    from capmerge.recipes.recipe import find, parse_overrides, run_recipe

    if is_config(recipe):
        _run_mergekit(recipe, overrides or [], output, force=force, plan=plan, quiet=quiet, as_json=as_json)
        return
    with handle_errors():
        unknown = [a for a in overrides or [] if a.startswith("-") and a != "-"]
        if unknown:
            raise UsageError(f"no such option: {unknown[0]}")
        if output is not None or force:
            find(recipe)  # a missing file is reported as missing, not as a misplaced option
            raise UsageError(f"{'-o/--output' if output is not None else '--force'} is for mergekit configurations; "
                             "a recipe names its outputs in its steps (e.g. out=DIR)")  # fmt: skip
        values = parse_overrides(overrides or [])
        result = run_recipe(recipe, workdir=workdir, plan=plan, rerun=rerun, progress=_progress(quiet), **values)
    if as_json:
        print(json.dumps(result, indent=2, default=str))
        return
    out = sys.stdout if plan else sys.stderr
    if quiet and not plan:
        return
    print(f"recipe {result['recipe']} (work directory {result['workdir']})", file=out)
    for s in result["steps"]:
        outs = ", ".join(s["outputs"]) or "-"
        took = f" in {s['seconds']:.2f} s" if "seconds" in s else ""
        print(f"  {s['step']:<16} {s['op']:<8} {s['status']}{took} -> {outs}", file=out)
        for warning in (s.get("result") or {}).get("warnings", []):
            print(f"warning: step {s['step']}: {warning}", file=sys.stderr)
        if plan and s.get("options"):
            for k, v in s["options"].items():
                print(f"      {k}: {json.dumps(v)}", file=out)


def _run_mergekit(config: str, rest: list[str], output: str | None, *, force: bool, plan: bool, quiet: bool,
                  as_json: bool) -> None:  # fmt: skip
    """``capmerge run CONFIG.yml -o OUT`` (or ``capmerge run CONFIG.yml OUT [mergekit-yaml options]``, as
    ``mergekit-yaml`` takes it: :mod:`capmerge.recipes.mergekit_cli`; several documents: mergekit-multi's stages)."""
    from capmerge.recipes.mergekit import load_all, run_configs
    from capmerge.recipes.mergekit_cli import split_options

    with handle_errors():
        if plan:
            raise UsageError("--plan is for recipes; a mergekit configuration is checked before anything is read")
        rest, opts = split_options(rest)
        quiet = quiet or opts.quiet
        if opts.out_path is not None:
            if output is not None and output != opts.out_path:
                raise UsageError("give the output once: -o/--output or --out-path")
            output = opts.out_path
        bad = [a for a in rest if "=" in a] or rest[1:] or ([rest[0]] if rest and output is not None else [])
        if bad:
            raise UsageError(f"unexpected argument {bad[0]!r} (a mergekit configuration takes -o OUT)")
        out = output if output is not None else (rest[0] if rest else None)
        if out is None and opts.intermediate_dir is None:
            load_all(config)  # a bad configuration is reported first
            raise UsageError("missing option -o/--output (the output directory)")
        if opts.threads is not None:
            os.environ["CAPMERGE_THREADS"] = str(opts.threads)
        if opts.hub_cache is not None:
            _use_hub_cache(opts.hub_cache)
        progress = Progress(not quiet, "merge")
        try:
            ran = run_configs(config, out, intermediate_dir=opts.intermediate_dir, lazy=opts.lazy, force=force,
                              progress=progress, options=opts)  # fmt: skip
        finally:
            progress.close()
    for note in opts.notes if not quiet else []:  # after the merge: a failed one says its error alone
        print(f"note: {note}", file=sys.stderr)
    several = len(ran) > 1 or opts.intermediate_dir is not None
    for path, summary in ran:
        if summary is None:
            if not quiet:
                print(f"merge: kept {path} (it holds a model; --no-lazy merges it again)", file=sys.stderr)
        else:
            report(summary, quiet=quiet, as_json=as_json and not several)
    if as_json and several:  # one JSON document: the merges in the order they ran
        print(json.dumps([s.to_dict() if s is not None else {"output": p, "kept": True} for p, s in ran], indent=2))


def _use_hub_cache(path: str) -> None:
    """Fetch Hub models into ``path`` for this command (mergekit's --transformers-cache)."""
    os.environ["HF_HUB_CACHE"] = path
    if "huggingface_hub.constants" in sys.modules:
        sys.modules["huggingface_hub.constants"].HF_HUB_CACHE = path


@recipes_app.command("list", help="List the shipped recipes.")
def list_cmd() -> None:
    from capmerge.recipes.recipe import describe, shipped

    for name, path in shipped().items():
        print(f"{name:<22} {describe(path)}")


@recipes_app.command("show", help="Print a shipped recipe.")
def show_cmd(name: Annotated[str, typer.Argument(help="Recipe name (see `capmerge recipes list`).")]) -> None:
    from capmerge.recipes.recipe import shipped_path

    with handle_errors():
        path = shipped_path(name)
    sys.stdout.write(path.read_text(encoding="utf-8"))


@recipes_app.command("copy", help="Copy a shipped recipe to a file or directory, to edit it.")
def copy_cmd(
    name: Annotated[str, typer.Argument(help="Recipe name.")],
    dest: Annotated[str, typer.Argument(help="Destination file or existing directory.")],
    force: Annotated[bool, typer.Option("--force", "-f", help="Replace an existing file.")] = False,
) -> None:
    from capmerge.errors import OutputExistsError, UsageError
    from capmerge.recipes.recipe import shipped_path

    with handle_errors():
        src = shipped_path(name)
        target = os.path.join(dest, src.name) if os.path.isdir(dest) else dest
        parent = os.path.dirname(os.path.abspath(target))
        if not os.path.isdir(parent):
            raise UsageError("the destination's directory does not exist", dest)
        if os.path.exists(target) and not force:
            raise OutputExistsError("destination exists (use --force to replace it)", target)
        shutil.copyfile(src, target)
    print(f"copied {src.name} to {target}", file=sys.stderr)


@recipes_app.command("validate", help="Check a recipe (schema, variables, inputs, step graph) without running it.")
def validate_cmd(
    recipe: Annotated[str, typer.Argument(help="Recipe file, or the name of a shipped recipe.")],
    overrides: Annotated[
        list[str] | None, typer.Argument(metavar="KEY=VALUE...", help="Variable values: name=value ...")
    ] = None,
) -> None:
    from capmerge.recipes.recipe import load, parse_overrides

    with handle_errors():
        r = load(recipe, parse_overrides(overrides or []), require_values=False)
    needs = f"; needs values for: {', '.join(r.unset)}" if r.unset else ""
    print(f"ok: {r.path}: {len(r.steps)} steps ({', '.join(s.name for s in r.steps)}){needs}")
