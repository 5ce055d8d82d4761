"""Mutation score of the core math and header I/O modules: one small operator mutation at a time, targeted tests.

Not part of ``make test`` (``make mutation`` runs it; ~25 min on 2 busy cores with the defaults). For each module
group below, every mutation point of the functions in scope is listed from the module's ``ast``:

* arithmetic operators (``+``↔``-``, ``*``↔``/``, ``//``→``*``, ``%``→``//``, ``**``→``*``, ``<<``↔``>>``,
  ``&``↔``|``, ``^``→``&``), also in ``x += …``;
* comparisons (``<``↔``<=``, ``>``↔``>=``, ``==``↔``!=``, ``in``↔``not in``, ``is``↔``is not``);
* ``and``↔``or``, ``not x``→``x``;
* constants: an integer or float ``c``→``c + 1``, ``True``↔``False`` (strings are left alone: messages are checked
  by other suites);
* statements: an expression, assignment, ``raise`` or ``assert`` replaced by ``pass``; ``return X``→``return None``.

A fixed-seed sample (``--per-group`` mutants per group, ``random.Random(--seed)``) is applied one at a time to a
scratch copy of the tracked files (the module rewritten with ``ast.unparse``; the unmutated rewrite must pass first),
and the group's targeted tests run with ``pytest -x`` under a timeout (3 × the clean run + 20 s). A failing run
kills the mutant; a passing run lets it survive. Rows go to ``--csv`` (group, module, function, line, mutation,
status, seconds); the score per group is (killed + timeout) / sampled: a mutant that makes the tests hang is
detected too (the CSV tells the two apart).

``--only ID...`` reruns given mutants (the ``id`` column) against the current tests and records their status in the
CSV's ``after`` column (the others keep theirs).
"""

from __future__ import annotations

import argparse
import ast
import csv
import os
import random
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# group -> (modules with the functions in scope (None: all), targeted tests: those that import the modules)
GROUPS: dict[str, tuple[dict[str, list[str] | None], list[str]]] = {
    "functional": ({"capmerge/functional.py": None}, ["tests/test_functional.py", "tests/test_merge_methods.py"]),
    "compute": (
        {"capmerge/merge/compute.py": None},
        ["tests/test_native.py", "tests/test_compute.py", "tests/test_diff_apply.py", "tests/test_functional.py"],
    ),
    "masks": (
        {"capmerge/merge/masks.py": ["alpha_for", "parse_layers", "layer_index", "parse_float_list"]},
        ["tests/test_masks.py"],
    ),
    "ortho": (
        {
            "capmerge/ortho/_math.py": None,
            "capmerge/ortho/functional.py": None,
            "capmerge/ortho/loss.py": ["stored_rows"]
            + [f"OrthogonalityLoss.{m}" for m in ("_finish", "_stats", "_penalty", "_aggregate", "forward", "report")],
        },
        ["tests/test_ortho.py"],
    ),
    "checkpoint": (
        {
            "capmerge/io/checkpoint.py": [
                "parse_header",
                "_entry",
                "read_header",
                "_decode_json",
                "_check_layout",
                "header_length",
                "parse_dtype",
                "_no_duplicates",
                "_parse_float",
                "_parse_int",
                "_no_constant",
                "_u64",
                "checkpoint_bounds",
                "Checkpoint.read_into",
                "Checkpoint.read_tensor",
                "Checkpoint.read_bytes",
            ]  # fmt: skip
        },
        ["tests/test_checkpoint.py", "tests/test_input_rules.py"],
    ),
    "writer": (
        {
            "capmerge/io/writer.py": [
                "SafetensorsFile.__init__",
                "SafetensorsFile.place",
                "SafetensorsFile.discard_last",
                "SafetensorsFile.finish",
                "SafetensorsFile.close",
                "_entry_json",
                "_nbytes",
                "_pwrite_all",
                "parse_size",
            ]  # fmt: skip
        },
        ["tests/test_input_rules.py", "tests/test_diff_apply.py", "tests/test_write_failures.py"],
    ),
}

BINOP = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Mult,
         ast.Mod: ast.FloorDiv, ast.Pow: ast.Mult, ast.LShift: ast.RShift, ast.RShift: ast.LShift,
         ast.BitAnd: ast.BitOr, ast.BitOr: ast.BitAnd, ast.BitXor: ast.BitAnd}  # fmt: skip
CMPOP = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq,
         ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is}  # fmt: skip
SYM = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//", ast.Mod: "%", ast.Pow: "**",
       ast.LShift: "<<", ast.RShift: ">>", ast.BitAnd: "&", ast.BitOr: "|", ast.BitXor: "^", ast.Lt: "<",
       ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!=", ast.In: "in", ast.NotIn: "not in",
       ast.Is: "is", ast.IsNot: "is not", ast.And: "and", ast.Or: "or"}  # fmt: skip


@dataclass
class Mutant:
    id: str  # group:module:walk index:variant
    group: str
    module: str
    function: str
    line: int
    what: str
    index: int
    variant: int


def _scopes(tree: ast.Module) -> dict[int, str]:
    """id(node) -> qualified name of the function it is in ("" outside functions)."""
    out: dict[int, str] = {}

    def visit(node: ast.AST, qual: str, in_func: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{qual}.{child.name}" if qual else child.name
                is_func = not isinstance(child, ast.ClassDef)
                out[id(child)] = name if (is_func or in_func) else ""
                visit(child, name, in_func or is_func)
            else:
                out[id(child)] = qual if in_func else ""
                visit(child, qual, in_func)

    visit(tree, "", False)
    return out


def _skipped(tree: ast.Module) -> set[int]:
    """Nodes never mutated: docstrings, annotations, decorators, f-strings and everything under them."""
    skip: set[int] = set()

    def under(node: ast.AST | None) -> None:
        if node is not None:
            skip.update(id(n) for n in ast.walk(node))

    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                under(body[0])
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            under(node.returns)
            for d in node.decorator_list:
                under(d)
            for a in node.args.args + node.args.kwonlyargs + node.args.posonlyargs:
                under(a.annotation)
        if isinstance(node, ast.ClassDef):
            for d in node.decorator_list:
                under(d)
        if isinstance(node, ast.AnnAssign):
            under(node.annotation)
        if isinstance(node, ast.JoinedStr):
            under(node)
    return skip


def _variants(node: ast.AST) -> list[str]:
    """Descriptions of the mutations of one node (their order is the variant number)."""
    if isinstance(node, (ast.BinOp, ast.AugAssign)) and type(node.op) in BINOP:
        out = [f"{SYM[type(node.op)]} -> {SYM[BINOP[type(node.op)]]}"]
        return out + (["statement -> pass"] if isinstance(node, ast.AugAssign) else [])
    if isinstance(node, ast.Compare):
        return [f"{SYM[type(op)]} -> {SYM[CMPOP[type(op)]]}" for op in node.ops]
    if isinstance(node, ast.BoolOp):
        return [f"{SYM[type(node.op)]} -> {'or' if isinstance(node.op, ast.And) else 'and'}"]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return ["not x -> x"]
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool):
            return [f"{node.value} -> {not node.value}"]
        if isinstance(node.value, (int, float)):
            return [f"{node.value!r} -> {node.value + 1!r}"]
    if isinstance(node, ast.Return) and node.value is not None:
        return ["return X -> return None"]
    if isinstance(node, (ast.Expr, ast.Assign, ast.Raise, ast.Assert)):
        return ["statement -> pass"]
    return []


def _apply(node: ast.AST, variant: int) -> ast.AST:
    """Mutate ``node`` in place, or return its replacement."""
    if isinstance(node, ast.AugAssign) and variant == 1:
        return ast.Pass()
    if isinstance(node, (ast.BinOp, ast.AugAssign)):
        node.op = BINOP[type(node.op)]()
    elif isinstance(node, ast.Compare):
        node.ops[variant] = CMPOP[type(node.ops[variant])]()
    elif isinstance(node, ast.BoolOp):
        node.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
    elif isinstance(node, ast.UnaryOp):
        return node.operand
    elif isinstance(node, ast.Constant):
        node.value = (not node.value) if isinstance(node.value, bool) else node.value + 1
    elif isinstance(node, ast.Return):
        node.value = ast.Constant(None)
    else:
        return ast.Pass()
    return node


def mutants(group: str, module: str, funcs: list[str] | None) -> Iterator[Mutant]:
    tree = ast.parse((ROOT / module).read_text())
    scopes, skip = _scopes(tree), _skipped(tree)
    for index, node in enumerate(ast.walk(tree)):
        func = scopes.get(id(node), "")
        if not func or id(node) in skip or (funcs is not None and func not in funcs):
            continue
        for variant, what in enumerate(_variants(node)):
            line = getattr(node, "lineno", 0)
            yield Mutant(f"{group}:{module}:{index}:{variant}", group, module, func, line, what, index, variant)


def mutated_source(m: Mutant) -> str:
    tree = ast.parse((ROOT / m.module).read_text())
    if m.index >= 0:
        parents = {id(c): p for p in ast.walk(tree) for c in ast.iter_child_nodes(p)}
        node = list(ast.walk(tree))[m.index]
        new = _apply(node, m.variant)
        if new is not node:  # put the replacement where the node was in its parent
            parent = parents[id(node)]
            for field, value in ast.iter_fields(parent):
                if value is node:
                    setattr(parent, field, new)
                elif isinstance(value, list) and node in value:
                    value[value.index(node)] = new
    return ast.unparse(ast.fix_missing_locations(tree)) + "\n"


def prepare(work: Path) -> None:
    shutil.rmtree(work, ignore_errors=True)
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        src, dst = ROOT / rel, work / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            os.symlink(os.readlink(src), dst)
        elif src.is_file():
            shutil.copy2(src, dst)
    for extra in [*(ROOT / "capmerge").glob("_native*.so"), *(ROOT / "tests").glob("test_*.py")]:
        shutil.copy2(extra, work / extra.relative_to(ROOT))  # the built kernel; new tests not yet committed


def run_tests(work: Path, tests: list[str], timeout: float) -> tuple[str, float]:
    env = dict(os.environ, PYTHONPATH=str(work), CAPMERGE_DEBUG="")
    present = [t for t in tests if (work / t).exists()]  # tests/test_compute.py came with the first run's findings
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *present]
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, cwd=work, env=env, capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return "timeout", time.perf_counter() - t0
    return ("survived" if r.returncode == 0 else "killed"), time.perf_counter() - t0


def evaluate(work: Path, ms: list[Mutant], clean: dict[str, float]) -> list[dict[str, object]]:
    rows = []
    for i, m in enumerate(ms, 1):
        path = work / m.module
        original = path.read_text()
        path.write_text(mutated_source(m))
        try:
            tests = GROUPS[m.group][1]
            status, secs = run_tests(work, tests, 3 * clean[m.group] + 20)
        finally:
            path.write_text(original)
        rows.append({"id": m.id, "group": m.group, "module": m.module, "function": m.function, "line": m.line,
                     "mutation": m.what, "status": status, "seconds": round(secs, 1)})  # fmt: skip
        print(f"[{i}/{len(ms)}] {status:8} {m.module}:{m.line} {m.function}: {m.what}", file=sys.stderr, flush=True)
    return rows


def clean_runs(work: Path, groups: list[str]) -> dict[str, float]:
    """Each group's tests on the unmutated modules, rewritten with ast.unparse as the mutants are: must pass."""
    out = {}
    for g in groups:
        modules = GROUPS[g][0]
        originals = {mod: (work / mod).read_text() for mod in modules}
        for mod in modules:
            (work / mod).write_text(mutated_source(Mutant("", g, mod, "", 0, "", -1, 0)))
        status, secs = run_tests(work, GROUPS[g][1], 900)
        for mod, text in originals.items():
            (work / mod).write_text(text)
        if status != "survived":
            sys.exit(f"the clean run of group {g} fails: fix that first")
        out[g] = secs
        print(f"clean {g}: {secs:.1f} s", file=sys.stderr, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/capmerge-mutation"))
    ap.add_argument("--per-group", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--groups", nargs="+", default=list(GROUPS))
    ap.add_argument("--csv", type=Path, default=ROOT / "benchmarks" / "mutation.csv")
    ap.add_argument("--only", nargs="+", help="rerun these mutant ids and print their status")
    args = ap.parse_args()

    prepare(args.work)
    every = {g: [m for mod, funcs in GROUPS[g][0].items() for m in mutants(g, mod, funcs)] for g in GROUPS}
    if args.only:
        by_id = {m.id: m for ms in every.values() for m in ms}
        picked = [by_id[i] for i in args.only]
        clean = clean_runs(args.work, sorted({m.group for m in picked}))
        after = {str(row["id"]): row["status"] for row in evaluate(args.work, picked, clean)}
        for i, status in after.items():
            print(f"{i}: {status}")
        if args.csv.exists():  # record the rerun next to the first run's status
            with args.csv.open(newline="") as f:
                rows = list(csv.DictReader(f))
            for row in rows:
                row["after"] = after.get(row["id"], row.get("after") or row["status"])
            with args.csv.open("w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)
        return

    rng = random.Random(args.seed)
    sample = [m for g in args.groups for m in rng.sample(every[g], min(args.per_group, len(every[g])))]
    clean = clean_runs(args.work, args.groups)
    rows = evaluate(args.work, sample, clean)
    with args.csv.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)

    print(f"{'group':11} {'mutants':>7} {'sampled':>7} {'killed':>6} {'survived':>8} {'timeout':>7} {'score':>6} "
          f"{'clean s':>7}")  # fmt: skip
    total: Counter[str] = Counter()
    for g in args.groups:
        c = Counter(str(r["status"]) for r in rows if r["group"] == g)
        total.update(c)
        detected = c["killed"] + c["timeout"]
        print(f"{g:11} {len(every[g]):>7} {sum(c.values()):>7} {c['killed']:>6} {c['survived']:>8} {c['timeout']:>7} "
              f"{detected / max(sum(c.values()), 1):>6.0%} {clean[g]:>7.1f}")  # fmt: skip
    score = (total["killed"] + total["timeout"]) / len(rows)
    print(f"{'all':11} {sum(len(every[g]) for g in args.groups):>7} {len(rows):>7} {total['killed']:>6} "
          f"{total['survived']:>8} {total['timeout']:>7} {score:>6.0%}")  # fmt: skip


if __name__ == "__main__":
    main()
