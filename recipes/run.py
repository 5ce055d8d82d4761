"""Running a validated recipe: step by step in dependency order, reusing outputs whose content key is unchanged."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from capmerge.errors import CapmergeError, ModelAsVectorError, UsageError
from capmerge.recipes.schema import INPUT, INPUTS, PAIR, SCHEMA, Recipe, Step, StepRef, file_identity, step_key

STAMPS = ".capmerge-steps"


def _default_output(step: Step, workdir: str) -> dict[str, str]:
    base = os.path.join(workdir, step.name)
    if step.op in ("diff", "compress"):
        return {"output": base + ".safetensors"}
    if step.op == "apply":
        alpha = step.options.get("alpha")
        sweep = isinstance(alpha, list) and len(alpha) > 1
        return {"output": base + ("-a{alpha}" if sweep else "")}
    if step.op == "inspect":
        return {"json": base + ".json"}
    if step.op == "merge":
        return {"output": base}
    return {}


def _missing_dirs(paths: list[str]) -> list[str]:
    """The directories among ``paths`` and their parents that do not exist yet, deepest first."""
    missing: set[str] = set()
    for p in paths:
        while p and not os.path.exists(p) and p not in missing:
            missing.add(p)
            p = os.path.dirname(p)
    return sorted(missing, key=lambda d: d.count(os.sep), reverse=True)


def _stat_tree(path: str) -> Any:
    p = Path(path)
    if p.is_file():
        st = p.stat()
        return [st.st_size, st.st_mtime_ns]
    if p.is_dir():
        return sorted([str(q.relative_to(p)), q.stat().st_size, q.stat().st_mtime_ns] for q in p.rglob("*")
                      if q.is_file())  # fmt: skip
    return None


class _Runner:
    def __init__(self, recipe: Recipe, rerun: bool, progress: Callable[[str, str], None] | None) -> None:
        self.recipe = recipe
        self.workdir = recipe.workdir
        self.rerun = rerun
        self.progress = progress
        self.outputs: dict[str, list[str]] = {}
        self.keys: dict[str, str] = {}

    def stamp_path(self, step: Step) -> str:
        return os.path.join(self.workdir, STAMPS, step.name + ".json")

    def resolve(self, step: Step) -> tuple[dict[str, Any], dict[str, Any]]:
        """Options with step references replaced by paths, and the identity of every input (for the key)."""
        schema = SCHEMA[step.op]
        opts: dict[str, Any] = {}
        ids: dict[str, Any] = {}
        for k, v in step.options.items():
            kind = schema[k][0]
            if kind not in (INPUT, INPUTS, PAIR):
                opts[k] = v
                continue
            paths: list[str] = []
            idents: list[Any] = []
            for x in v if isinstance(v, list) else [v]:
                if isinstance(x, StepRef):
                    outs = self.outputs[x.step]
                    if kind == INPUT and len(outs) != 1:
                        where = f"{self.recipe.path}:{step.lines.get(k, step.line)}: steps.{step.name}.{k}"
                        raise UsageError(f"{k}: step {x.step!r} has {len(outs)} outputs; {k} takes one", where)
                    paths += outs
                    idents += [["step", self.keys[x.step], i] for i in range(len(outs))]
                else:
                    paths.append(x)
                    idents.append(file_identity(x))
            opts[k] = paths[0] if kind == INPUT else paths
            ids[k] = idents
        for k, v in _default_output(step, self.workdir).items():
            opts.setdefault(k, v)
        return opts, ids

    def cached(self, step: Step, key: str) -> dict[str, Any] | None:
        if self.rerun:
            return None
        try:
            stamp = json.loads(Path(self.stamp_path(step)).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if stamp.get("key") != key:
            return None
        for out, sig in stamp.get("outputs", {}).items():
            if _stat_tree(out) != sig:
                return None
        return stamp

    def owned(self, step: Step) -> set[str]:
        """Outputs this step wrote on an earlier run (they may be replaced without --force)."""
        try:
            stamp = json.loads(Path(self.stamp_path(step)).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return set()
        return set(stamp.get("outputs", {}))

    def run(self, plan: bool) -> dict[str, Any]:
        if not plan:  # before any step runs: a missing feature must not leave half a pipeline behind
            for step in self.recipe.steps:
                if step.op in ("compress", "push"):
                    _lazy(step.op, f"{self.recipe.path}:{step.line}: steps.{step.name}")
        report: list[dict[str, Any]] = []
        for step in self.recipe.steps:
            opts, ids = self.resolve(step)
            key = step_key(step.op, opts, ids)
            self.keys[step.name] = key
            entry: dict[str, Any] = {"step": step.name, "op": step.op, "key": key[:16]}
            hit = self.cached(step, key)
            if hit is not None:
                self.outputs[step.name] = list(hit["outputs"])
                entry.update(status="cached", outputs=list(hit["outputs"]), result=hit.get("result"))
            elif plan:
                self.outputs[step.name] = _planned_outputs(step, opts)
                entry.update(status="will run", outputs=self.outputs[step.name], options=_printable(opts))
            else:
                if self.progress:
                    self.progress(step.name, "running")
                t0 = time.perf_counter()
                planned = [os.path.dirname(os.path.abspath(o)) for o in _planned_outputs(step, opts)]
                new_dirs = _missing_dirs([os.path.abspath(self.workdir), *planned])
                try:
                    outs, result = self.execute(step, opts)
                except BaseException as e:
                    for d in new_dirs:  # a failed step leaves no directory behind that it created
                        with contextlib.suppress(OSError):
                            os.rmdir(d)  # only empty ones: never what another writer put there since
                    if isinstance(e, CapmergeError) and not e.where:  # an option's error: at the step in the recipe
                        e.where = f"{self.recipe.path}:{step.line}: steps.{step.name}"
                    raise
                self.outputs[step.name] = outs
                entry.update(status="ran", outputs=outs, result=result, seconds=round(time.perf_counter() - t0, 3))
                stamp = {"key": key, "op": step.op, "outputs": {o: _stat_tree(o) for o in outs if _stat_tree(o)},
                         "result": result}  # fmt: skip
                os.makedirs(os.path.dirname(self.stamp_path(step)), exist_ok=True)
                tmp = self.stamp_path(step) + ".tmp"
                Path(tmp).write_text(json.dumps(stamp, indent=1, default=str), encoding="utf-8")
                os.replace(tmp, self.stamp_path(step))
            if self.progress:
                self.progress(step.name, entry["status"])
            report.append(entry)
        return {"recipe": self.recipe.path, "workdir": self.workdir, "variables": _printable(self.recipe.variables),
                "steps": report}  # fmt: skip

    def execute(self, step: Step, opts: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
        os.makedirs(self.workdir, exist_ok=True)
        if step.op in ("diff", "apply", "compress", "merge"):
            # Outputs in the work directory, or written by this step before, are ours to replace.
            owned, wd = self.owned(step), os.path.abspath(self.workdir) + os.sep
            planned = _planned_outputs(step, opts)
            if planned and all(p in owned or os.path.abspath(p).startswith(wd) for p in planned):
                opts["force"] = True
        if step.op == "diff":
            from capmerge.api import diff

            o = dict(opts)
            s = diff(o.pop("base"), o.pop("aux"), o.pop("output"), **o)
            return [s.output], s.to_dict()
        if step.op == "apply":
            from capmerge.merge.apply import apply

            o = dict(opts)
            for k in ("layers",):
                if isinstance(o.get(k), list):
                    o[k] = ",".join(map(str, o[k]))
                elif isinstance(o.get(k), int):
                    o[k] = str(o[k])
            try:
                s = apply(o.pop("base"), o.pop("vectors", []), o.pop("output"), **o)
            except ModelAsVectorError as e:  # the fix spelled in recipe keys, at the step's place in the recipe
                from capmerge.merge.vectorcheck import for_recipe

                line = step.lines.get("vectors", step.line)
                raise for_recipe(e, f"{step.name} ({self.recipe.path}:{line})") from None
            return list(s.outputs), s.to_dict()
        if step.op == "merge":
            from capmerge.recipes.mergekit import merge_models

            o = dict(opts)
            params = o.pop("parameters", None) or {}
            if o.get("dtype") == "auto":  # each tensor's own
                o.pop("dtype")
            s = merge_models(o.pop("models"), o.pop("output"), **o, **params)
            return [s.output], s.to_dict()
        if step.op == "inspect":
            return self._inspect(opts)
        if step.op == "compress":
            fn = _lazy("compress")
            o = dict(opts)
            res = fn(o.pop("vector"), o.pop("output"), **o)
            return [opts["output"]], _as_dict(res)
        if step.op == "push":
            fn = _lazy("push")
            o = dict(opts)
            url = fn(o.pop("path"), o.pop("repo_id"), **o)
            return [], {"url": str(url)}
        raise AssertionError(step.op)

    def _inspect(self, opts: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
        from capmerge.analysis.stats import inspect

        o = dict(opts)
        json_out, plot_out = o.pop("json"), o.pop("plot", None)
        if plot_out is not None:
            from capmerge.analysis.report import require_matplotlib

            require_matplotlib()
        result = inspect(o.pop("paths", []), **o)
        for p in (json_out, plot_out):
            if p and os.path.dirname(p):
                os.makedirs(os.path.dirname(p), exist_ok=True)
        tmp = json_out + ".tmp"
        Path(tmp).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, json_out)
        outs = [json_out]
        if plot_out:
            from capmerge.analysis.report import plot

            plot(result, plot_out)
            outs.append(plot_out)
        summary: dict[str, Any] = {"vectors": {v["label"]: v["total"]["l2"] for v in result.get("vectors", [])}}
        if result.get("comparisons"):
            summary["cos"] = [c["total"]["cos"] for c in result["comparisons"]]
        return outs, summary


def _lazy(name: str, where: str | None = None) -> Callable[..., Any]:
    """``compress`` / ``push`` steps: their modules are imported only when a step needs them (and checked before any
    step runs, so that a missing dependency never leaves half a pipeline behind)."""
    try:
        if name == "compress":
            from capmerge.io.compress import compress

            return compress
        from capmerge.share import push

        return push
    except ImportError as e:
        raise CapmergeError(f"the {name} step needs capmerge.{name}, which cannot be imported ({e})", where) from None


def _as_dict(res: Any) -> dict[str, Any]:
    if hasattr(res, "to_dict"):
        return res.to_dict()
    if isinstance(res, dict):
        return res
    return {"result": str(res)}


def _planned_outputs(step: Step, opts: dict[str, Any]) -> list[str]:
    if step.op == "push":
        return []
    if step.op == "inspect":
        return [p for p in (opts.get("json"), opts.get("plot")) if p]
    out = opts["output"]
    if step.op == "apply":
        from capmerge.merge.masks import expand_template

        alphas = opts.get("alpha", 1.0)
        alphas = alphas if isinstance(alphas, list) else [alphas]
        dens = opts.get("density") if "{density}" in out else None
        dens = (dens if isinstance(dens, list) else [dens]) if dens is not None else [1.0]
        return [expand_template(out, alpha=a, density=d) for d in dens for a in alphas]
    return [out]


def _printable(v: Any) -> Any:
    from capmerge.recipes.schema import _plain

    return _plain(v)


def execute(recipe: Recipe, *, plan: bool, rerun: bool, progress: Callable[[str, str], None] | None) -> dict[str, Any]:
    """Run (or, with ``plan``, only describe) the steps of a validated recipe."""
    return _Runner(recipe, rerun, progress).run(plan)
