"""Recipe validation: the schema, variables, references and the step graph — every error with file:line: key."""

from __future__ import annotations

import math
import os
import re
from typing import Any

from capmerge.errors import CapmergeError
from capmerge.merge.overrides import (
    MERGEKIT_PARAMS,
    Override,
    OverrideError,
    Overrides,
    from_filter_list,
    is_filter_list,
)
from capmerge.recipes import yaml_lines as _yaml
from capmerge.recipes.expand import _Ctx
from capmerge.recipes.schema import (
    _ENUMS,
    INPUT,
    INPUTS,
    OPTION,
    OUTPUT,
    PAIR,
    SCHEMA,
    TOP_KEYS,
    Recipe,
    RecipeError,
    Step,
    StepRef,
    Unset,
    _methods,
)

_HUB_ID = re.compile(r"hf://.+|[A-Za-z0-9][\w.\-]*/[\w.\-]+(@[\w.\-/]+)?")
_STEP_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")


def check(doc: Any, where: str, stem: str, overrides: dict[str, Any], require_values: bool) -> Recipe:
    """Validate a parsed recipe document; raise :class:`RecipeError` listing every problem."""
    if not isinstance(doc, _yaml.LineDict):
        raise RecipeError([("a recipe is a mapping with a steps: key", f"{where}:1")])
    raw_vars = doc.get("vars") or _yaml.LineDict()
    ctx = _Ctx(where, {}, {}, {})
    if not isinstance(raw_vars, dict):
        ctx.err("vars: must be a mapping of names to default values", _yaml.line_of(doc, "vars"), "vars")
        raw_vars = _yaml.LineDict()
    lines = {k: _yaml.line_of(raw_vars, k) for k in raw_vars}
    ctx = _Ctx(where, dict(raw_vars), lines, overrides)
    for key in doc:
        if key not in TOP_KEYS:
            ctx.err(f"unknown key {key!r} (expected one of {', '.join(TOP_KEYS)})", _yaml.line_of(doc, key), key)
    for name in raw_vars:
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_\-]*", name):
            ctx.err(f"invalid variable name {name!r}", lines[name], f"vars.{name}")
    for name in overrides:
        if name not in raw_vars:
            known = ", ".join(map(str, raw_vars)) or "none"
            ctx.err(f"unknown variable {name!r} given on the command line (the recipe defines: {known})",
                    _yaml.line_of(doc, "vars"), "vars")  # fmt: skip
    variables = {}
    for name in raw_vars:
        variables[name] = ctx.var(name, lines[name], f"vars.{name}")
    description = doc.get("description", "")
    if not isinstance(description, str):
        ctx.err("description: must be a string", _yaml.line_of(doc, "description"), "description")
    workdir: Any = os.path.join("capmerge-work", stem)
    if "workdir" in doc:
        workdir = ctx.subst(doc["workdir"], _yaml.line_of(doc, "workdir"), "workdir")
        if not isinstance(workdir, str | Unset) or workdir == "":
            ctx.err("workdir: must be a non-empty path", _yaml.line_of(doc, "workdir"), "workdir")
    steps_node = doc.get("steps")
    steps: list[Step] = []
    if "steps" not in doc:
        ctx.err("missing key steps: (the steps to run)", doc.line, "steps")
    elif not isinstance(steps_node, _yaml.LineDict) or not steps_node:
        ctx.err("steps: must be a non-empty mapping of step names to steps", _yaml.line_of(doc, "steps"), "steps")
    else:
        for name, body in steps_node.items():
            step = _check_step(ctx, name, body, _yaml.line_of(steps_node, name))
            if step is not None:
                steps.append(step)
    names = {s.name for s in steps}
    for s in steps:
        for key, ref, line in input_ref(s):
            if ref.step not in names:
                known = ", ".join(sorted(names))
                ctx.err(f"${{steps.{ref.step}}} names no step (steps: {known})", line, f"steps.{s.name}.{key}")
            elif ref.step == s.name:
                ctx.err("a step cannot use its own output", line, f"steps.{s.name}.{key}")
            elif ref.step not in s.deps:
                s.deps.append(ref.step)
    ordered = _order(ctx, steps)
    if require_values:
        for name in sorted(ctx.unset):
            ctx.err(f"variable {name!r} has no value (give {name}=... on the command line)", lines.get(name, 1),
                    f"vars.{name}")  # fmt: skip
    if ctx.errors:
        raise RecipeError(ctx.errors)
    return Recipe(where, stem, description, variables, workdir if isinstance(workdir, str) else "", ordered,
                  sorted(ctx.unset))  # fmt: skip


def input_ref(step: Step) -> list[tuple[str, StepRef, int]]:
    out = []
    for key, v in step.options.items():
        for x in v if isinstance(v, list) else [v]:
            if isinstance(x, StepRef):
                out.append((key, x, step.lines.get(key, step.line)))
    return out


def _check_step(ctx: _Ctx, name: Any, body: Any, line: int) -> Step | None:
    key = f"steps.{name}"
    if not isinstance(name, str) or not _STEP_NAME.fullmatch(name):
        ctx.err(f"invalid step name {name!r} (letters, digits, _ and -)", line, key)
        return None
    if not isinstance(body, _yaml.LineDict):
        ctx.err("a step is a mapping with an op: key", line, key)
        return None
    op = body.get("op")
    if not isinstance(op, str) or op not in SCHEMA:
        what = "missing op:" if op is None else f"unknown op {op!r}"
        ctx.err(f"{what} (choose from {', '.join(SCHEMA)})", _yaml.line_of(body, "op") if op else line, f"{key}.op")
        return None
    schema = SCHEMA[op]
    options: dict[str, Any] = {}
    lines: dict[str, int] = {}
    filter_lists: dict[str, Any] = {}
    for k in body:
        if k == "op":
            continue
        kline = _yaml.line_of(body, k)
        if k not in schema:
            ctx.err(f"unknown key {k!r} for op {op} (expected: {', '.join(schema)})", kline, f"{key}.{k}")
            continue
        value = ctx.subst(body[k], kline, f"{key}.{k}")
        kind, typ, _ = schema[k]
        if op == "apply" and (k == "overrides" or (k in MERGEKIT_PARAMS and is_filter_list(value))):
            filter_lists[k] = value  # per-tensor parameters: checked and normalised below
            lines[k] = kline
            continue
        problem = _check_value(k, kind, typ, value)
        if problem:
            ctx.err(problem, kline, f"{key}.{k}")
            continue
        if kind in (INPUT, INPUTS, PAIR):
            for i, x in enumerate(value if isinstance(value, list) else [value]):
                missing = _missing_input(x)
                if missing:
                    iline = _yaml.line_of(value, i) if isinstance(value, list) else kline
                    ctx.err(missing, iline, f"{key}.{k}")
        options[k] = _yaml.plain(value)
        lines[k] = kline
    for k, (_, _, required) in schema.items():
        if required and k not in body:
            ctx.err(f"missing key {k!r} for op {op}", line, f"{key}.{k}")
    if op == "apply" and not options.get("vectors") and not options.get("add") and "vectors" not in body:
        ctx.err("apply needs vectors: or add:", line, key)
    if op == "merge":
        _check_merge(ctx, key, body, options, line)
    if filter_lists:
        _check_overrides(ctx, key, options, lines, filter_lists)
    if op == "inspect":
        if ("task" in body) != ("capability" in body):
            ctx.err("task: and capability: go together", line, key)
        if "task" in body and ("paths" in body or "against" in body):
            ctx.err("task:/capability: build both vectors; give no paths: or against:", line, key)
        if not any(k in body for k in ("paths", "task")):
            ctx.err("inspect needs paths: or task: + capability:", line, key)
    return Step(name, op, line, options, lines)


def _check_merge(ctx: _Ctx, key: str, body: Any, options: dict[str, Any], line: int) -> None:
    """A merge step's parameters against its method (names, per-model counts), before any data is read."""
    from capmerge.merge.methods.registry import MODEL_METHODS
    from capmerge.recipes.mergekit import split_parameters

    method = MODEL_METHODS.get(options.get("method", "linear"))
    params = options.get("parameters")
    if method is None or not isinstance(params, dict):
        return
    models = options.get("models")
    models = models if isinstance(models, list) else [models]
    refs = [str(m) for m in models] if all(isinstance(m, str) for m in models) else None  # a step's: counted later
    pline, raw = _yaml.line_of(body, "parameters"), body.get("parameters")
    for k, v in params.items():
        try:
            split_parameters(method, {k: v}, refs, None)
        except CapmergeError as e:
            ctx.err(e.args[0], _yaml.line_of(raw, k) if isinstance(raw, _yaml.LineDict) and k in raw else pline,
                    f"{key}.parameters.{k}")  # fmt: skip


def _has_unset(v: Any) -> bool:
    if isinstance(v, Unset):
        return True
    if isinstance(v, dict):
        return any(_has_unset(x) for x in v.values())
    if isinstance(v, list):
        return any(_has_unset(x) for x in v)
    return False


def _check_overrides(
    ctx: _Ctx, key: str, options: dict[str, Any], lines: dict[str, int], lists: dict[str, Any]
) -> None:
    """Per-tensor parameters of an apply step: ``overrides:`` entries and mergekit-style filter lists
    (``alpha: [{filter: attn, value: 0.5}, {value: 1.0}]``) become one ``overrides`` option, in that order (the
    lists in the order alpha, weights, density, gamma); a filter list's default becomes the step's own value."""
    entries: list[tuple[Any, int, str, dict[str, str]]] = []  # (override mapping, its line, key path, key map)
    if "overrides" in lists:
        value = lists["overrides"]
        if not isinstance(value, Unset):
            if not isinstance(value, list) or not value:
                ctx.err("overrides: expected a list of {filter: REGEX, alpha: ..., density: ...} mappings",
                        lines["overrides"], f"{key}.overrides")  # fmt: skip
            else:
                for i, e in enumerate(value):
                    at = _yaml.line_of(value, i) or lines["overrides"]
                    entries.append((e, at, f"{key}.overrides[{i}]", {}))
    for k in MERGEKIT_PARAMS:
        if k not in lists:
            continue
        value = lists[k]
        try:
            converted, default = from_filter_list(k, value)
        except OverrideError as e:  # values given on the command line have no lines: the key's line then
            i = int(str(e.where)[1:-1])
            at = (_yaml.line_of(value[i], e.key) if e.key else 0) or _yaml.line_of(value, i) or lines[k]
            ctx.err(f"{k}: {e.what}", at, f"{key}.{k}[{i}]" + (f".{e.key}" if e.key else ""))
            continue
        for i, d in converted:
            d = _yaml.LineDict(d)
            src = getattr(value[i], "lines", {})
            d.line = _yaml.line_of(value, i) or lines[k]
            d.lines = {"filter": src.get("filter"), MERGEKIT_PARAMS[k]: src.get("value")}
            entries.append((d, d.line, f"{key}.{k}[{i}]", {MERGEKIT_PARAMS[k]: "value"}))
        if default is None:
            continue
        target = k
        if k == "alpha" and isinstance(default, list):
            target = "alpha_gradient"  # as in an override, a list for alpha is a gradient
            if "alpha_gradient" in options:
                ctx.err("alpha: the default of the filter list is a gradient, and alpha_gradient is given too",
                        lines[k], f"{key}.alpha")  # fmt: skip
                continue
        typ = SCHEMA["apply"][target][1]
        problem = _check_value(k, OPTION, typ, default)
        if problem:
            at = _yaml.line_of(value, len(value) - 1) or lines[k]
            ctx.err(problem, at, f"{key}.{k}[{len(value) - 1}].value")
            continue
        options[target] = _yaml.plain(default)
        lines.setdefault(target, lines[k])
    vectors = [x for k in ("vectors", "add") for x in _items(options.get(k))]
    n_vectors = len(vectors) if vectors and all(isinstance(v, str) for v in vectors) else None
    plain: list[Any] = []
    for spec, line, where, keymap in entries:
        plain.append(_yaml.plain(spec))
        if _has_unset(spec):
            continue
        try:
            ov = Override.parse(plain[-1], where)
            if n_vectors is not None:
                Overrides([ov]).check_vectors(n_vectors)
        except OverrideError as e:
            at, src = line, keymap.get(str(e.key), e.key)
            if e.key and isinstance(spec, _yaml.LineDict):
                if e.key == "weight" and "weights" in spec.lines:
                    src = "weights"
                at = spec.lines.get(e.key if e.key in spec.lines else src) or line
            ctx.err(e.what, at, where + (f".{src}" if src else ""))
    if plain:
        options["overrides"] = plain
        lines.setdefault("overrides", min(lines[k] for k in lists))


def _items(v: Any) -> list[Any]:
    """An option's value as a list (a single ${steps.x} or unset ${var} stands for one or more items)."""
    return [] if v is None else v if isinstance(v, list) else [v]


def _is_num(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _check_value(key: str, kind: str, typ: str, v: Any) -> str | None:
    if isinstance(v, Unset):
        return None
    if kind in (INPUT, OUTPUT):
        if kind == INPUT and isinstance(v, StepRef):
            return None
        return None if isinstance(v, str) and v else f"{key}: expected a path, got {v!r}"
    if kind in (INPUTS, PAIR):
        items = v if isinstance(v, list) else [v]
        if kind == PAIR and (not isinstance(v, list) or len(v) != 2):
            return f"{key}: expected a list of two checkpoints, got {_plain_repr(v)}"
        if not items:
            return f"{key}: expected one or more paths"
        for x in items:
            if not (isinstance(x, StepRef | Unset) or (isinstance(x, str) and x)):
                return f"{key}: expected paths, got {x!r}"
        return None
    if typ == "bool":
        return None if isinstance(v, bool) else f"{key}: expected true or false, got {v!r}"
    if typ == "int":
        return None if isinstance(v, int) and not isinstance(v, bool) else f"{key}: expected an integer, got {v!r}"
    if typ == "number":
        return None if _is_num(v) else f"{key}: expected a number, got {v!r}"
    if typ == "numbers":
        items = v if isinstance(v, list) else [v]
        ok = items and all(_is_num(x) for x in items)
        return None if ok else f"{key}: expected a number or a list of numbers, got {_plain_repr(v)}"
    if typ == "str":
        return None if isinstance(v, str) and v else f"{key}: expected a string, got {v!r}"
    if typ == "strs":
        items = v if isinstance(v, list) else [v]
        ok = items and all(isinstance(x, str) for x in items)
        if ok and key in ("include", "exclude"):
            for x in items:
                try:
                    re.compile(x)
                except re.error as e:
                    return f"{key}: invalid regex {x!r} ({e})"
        return None if ok else f"{key}: expected a string or a list of strings, got {_plain_repr(v)}"
    if typ == "size":
        from capmerge.io.writer import parse_size

        try:
            parse_size(v if isinstance(v, int | str) else str(v))
        except ValueError as e:  # UsageError
            return f"{key}: {e}"
        return None
    if typ == "layers":
        from capmerge.merge.masks import parse_layers

        try:
            parse_layers(str(v) if not isinstance(v, list) else ",".join(map(str, v)))
        except ValueError as e:  # UsageError
            return f"{key}: {e}"
        return None
    if typ == "enum":
        choices = _ENUMS[key]
        return None if v in choices else f"{key}: invalid value {v!r} (choose from {', '.join(choices)})"
    if typ == "method":
        choices = _methods()
        return None if v in choices else f"unknown method {v!r} (choose from {', '.join(choices)})"
    if typ == "model_method":
        from capmerge.merge.methods.registry import MODEL_METHODS

        return None if v in MODEL_METHODS else f"unknown merge method {v!r} (choose from {', '.join(MODEL_METHODS)})"
    if typ == "params":
        if not isinstance(v, dict):
            return f"{key}: expected a mapping of the method's parameters, got {_plain_repr(v)}"
        for k, x in v.items():
            items = x if isinstance(x, list) else [x]
            if not items or not all(_is_num(i) or isinstance(i, bool) for i in items):
                return f"{key}.{k}: expected a number, true/false or a list of numbers, got {_plain_repr(x)}"
        return None
    raise AssertionError(typ)


def _plain_repr(v: Any) -> str:
    return repr(_yaml.plain(v))


def _missing_input(x: Any) -> str | None:
    """A local path that does not exist (hub ids — org/name, hf://... — are resolved when the step runs)."""
    if not isinstance(x, str):
        return None
    if os.path.exists(x):
        return None
    from capmerge.io.checkpoint import WEIGHT_SUFFIXES

    looks_local = x.endswith((*WEIGHT_SUFFIXES, ".json")) or os.path.isdir(x.split("/")[0])
    if _HUB_ID.fullmatch(x) and (x.startswith("hf://") or not looks_local):
        return None
    return f"input does not exist: {x}"


def _order(ctx: _Ctx, steps: list[Step]) -> list[Step]:
    """Steps in dependency order (file order among independent steps); a cycle is an error."""
    by_name = {s.name: s for s in steps}
    done: list[Step] = []
    state: dict[str, int] = {}  # 1 = visiting, 2 = done
    reported = False

    def visit(s: Step, stack: list[str]) -> None:
        nonlocal reported
        if state.get(s.name) == 2:
            return
        if state.get(s.name) == 1:
            if not reported:
                cycle = [*stack[stack.index(s.name) :], s.name]
                ctx.err(f"steps depend on each other in a cycle ({' -> '.join(cycle)})", s.line, f"steps.{s.name}")
                reported = True
            return
        state[s.name] = 1
        for d in s.deps:
            if d in by_name:
                visit(by_name[d], [*stack, s.name])
        state[s.name] = 2
        done.append(s)

    for s in steps:
        visit(s, [])
    return done
