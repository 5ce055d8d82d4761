"""Benchmark every model-centric merge method (`capmerge run CONFIG.yml`) against the I/O floor and mergekit.

Run:
    .venv/bin/python benchmarks/bench_methods.py                     # every method, 0.95b (16 layers), mergekit too
    .venv/bin/python benchmarks/bench_methods.py --size tiny         # quick end-to-end check
    .venv/bin/python benchmarks/bench_methods.py --methods ties,slerp --no-mergekit
    .venv/bin/python benchmarks/bench_methods.py --memory-depth      # + capmerge at 4 layers: RssAnon 4 vs 16 layers
    .venv/bin/python benchmarks/bench_methods.py --memory-depth --mergekit-layers 4   # mergekit only at 4 layers

Checkpoints come from bench_apply's generator: a base P and three models A, B, C (P plus independent uniform noise),
bf16, 2 shards, HF layout, reused on later runs. For each method one mergekit configuration is written (three models,
plus the base where the method uses one; slerp, nearswap and arcee_fusion take one model, nuslerp two, passthrough
one), dtype bfloat16. Each checkpoint set's files are dropped from the page cache and read back once
(bench_apply.settle: the cache a sequential read leaves, in large folios), and with the inputs read into the page
cache before each run (untimed) the script times:

    floor      plain copies: read every input of the configuration, write one model's bytes (the fastest of cat, dd
               and an O_DIRECT copy, benchmarks/direct_copy.py)
    capmerge   capmerge run CONFIG.yml -o OUT (a process, the Hub offline); steady = seconds − the same configuration
               on the tiny preset (start-up: python, torch, planning; the median of as many runs)
    mergekit   mergekit-yaml CONFIG.yml OUT (when .venv-mergekit exists), × = mergekit seconds / capmerge seconds

Memory is the peak RssAnon (and VmRSS) of the process tree, sampled from /proc every 20 ms. With --memory-depth the
capmerge runs are repeated at 4 layers of the same width: a streaming merge's RssAnon does not grow with depth
(goal: within 15 %). Rows are printed and appended to benchmarks/results.csv (case = METHOD_floor / _capmerge /
_mergekit).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_apply as ba  # noqa: E402 - the generator, measuring and CSV helpers are bench_apply's

GOAL_RATIO = 3.0  # steady capmerge time / I/O floor
GOAL_MEMORY = 1.15  # RssAnon at 16 layers / at 4 layers
W = [0.5, 0.3, 0.2]
D = 0.3

# method -> (models, uses the base, global parameters, per-model parameters for model i)
METHODS: dict[str, tuple[str, bool, dict[str, object], dict[str, object]]] = {
    "linear": ("ABC", False, {}, {"weight": None}),
    "task_arithmetic": ("ABC", True, {}, {"weight": None}),
    "ties": ("ABC", True, {}, {"weight": None, "density": D}),
    "dare_linear": ("ABC", True, {}, {"weight": None, "density": D}),
    "dare_ties": ("ABC", True, {}, {"weight": None, "density": D}),
    "breadcrumbs": ("ABC", True, {}, {"weight": None, "density": D, "gamma": 0.01}),
    "breadcrumbs_ties": ("ABC", True, {}, {"weight": None, "density": D, "gamma": 0.01}),
    "della": ("ABC", True, {}, {"weight": None, "density": D, "epsilon": 0.1}),
    "della_linear": ("ABC", True, {}, {"weight": None, "density": D, "epsilon": 0.1}),
    "slerp": ("A", True, {"t": 0.3}, {}),
    "nuslerp": ("AB", True, {}, {"weight": None}),
    "multislerp": ("ABC", True, {}, {"weight": None}),
    "karcher": ("ABC", False, {}, {}),
    "model_stock": ("ABC", True, {}, {}),
    "sce": ("ABC", True, {"select_topk": D}, {}),
    "nearswap": ("A", True, {"t": 0.001}, {}),
    "arcee_fusion": ("A", True, {}, {}),
    "passthrough": ("A", False, {}, {}),
}


def config_text(method: str, dirs: dict[str, Path]) -> str:
    """The mergekit configuration of ``method`` over ``dirs`` (bf16 in, bf16 out)."""
    models, uses_base, params, per_model = METHODS[method]
    cfg: dict[str, object] = {"merge_method": method}
    if uses_base:
        cfg["base_model"] = str(dirs["P"])
    cfg["models"] = []
    for i, m in enumerate(models):
        mp = {k: (W[i] if v is None else v) for k, v in per_model.items()}
        cfg["models"].append({"model": str(dirs[m]), **({"parameters": mp} if mp else {})})  # type: ignore[union-attr]
    if params:
        cfg["parameters"] = params
    cfg["dtype"] = "bfloat16"
    return json.dumps(cfg, indent=1) + "\n"  # JSON is YAML


def inputs_of(method: str, dirs: dict[str, Path]) -> list[Path]:
    models, uses_base, _, _ = METHODS[method]
    return ([dirs["P"]] if uses_base else []) + [dirs[m] for m in models]


def compare_note(out: Path, ref: Path, name: str) -> str:
    a, b = ba.read_tensor(out, name), ba.read_tensor(ref, name)
    equal = (a == b).float().mean().item()
    diff = (a.float() - b.float()).abs().max().item()
    return f"vs mergekit {name.removeprefix('model.')}: {equal:.2%} equal, max diff {diff:.2e}"


def run_methods(methods: list[str], dirs: dict[str, Path], out_root: Path, *, cli: str, mergekit: bool,
                floor: bool, repeats: int) -> dict[str, ba.Case]:  # fmt: skip
    """floor / capmerge / mergekit per method, interleaved per repeat; outputs deleted (and synced) after each."""
    out_root.mkdir(parents=True, exist_ok=True)
    cases: dict[str, ba.Case] = {}
    flags = ba.mergekit_flags() if mergekit else []
    check = next(n for n in ba.tensor_names(dirs["P"]) if n.endswith("q_proj.weight"))
    for method in methods:
        config = out_root / f"{method}.yml"
        config.write_text(config_text(method, dirs))
        ins = inputs_of(method, dirs)
        out, mk_out, floor_out = (out_root / n for n in ("capmerge-out", "mergekit-out", "floor.bin"))
        names = ["floor"] * floor + ["capmerge"] + ["mergekit"] * mergekit
        for n in names:
            cases[f"{method}_{n}"] = ba.Case(f"{method}_{n}")
        print(f"  {method}", file=sys.stderr, flush=True)
        for r in range(repeats):
            ba.read_all(ins)
            if floor:
                cases[f"{method}_floor"].runs.append(ba.measure_floor(ins[0], ins[1:], floor_out))
            ba.clean(out)
            cmd = [cli, "run", str(config), "-o", str(out), "--quiet", "--force"]
            cases[f"{method}_capmerge"].runs.append(ba.measure(cmd, env=ba.OFFLINE_ENV))
            if mergekit:
                ba.read_all(ins)
                ba.clean(mk_out)
                cmd = [str(ba.MERGEKIT_YAML), str(config), str(mk_out), *flags]
                cases[f"{method}_mergekit"].runs.append(ba.measure(cmd, env=ba.OFFLINE_ENV))
                if r == repeats - 1 and cases[f"{method}_capmerge"].ok and cases[f"{method}_mergekit"].ok:
                    cases[f"{method}_mergekit"].notes.append(compare_note(out, mk_out, check))
            ba.clean(out, mk_out)
        last = [cases[f"{method}_{n}"].runs[-1] for n in names]
        done = [f"{n} {r.seconds:.1f} s ({r.peak_anon_mb:.0f} MB RssAnon)" for n, r in zip(names, last, strict=True)]
        print(f"    {', '.join(done)}", file=sys.stderr, flush=True)
    return cases


def make_rows(cases: dict[str, ba.Case], startup: dict[str, ba.Case] | None, methods: list[str],
              size: str) -> list[dict[str, object]]:  # fmt: skip
    rows: list[dict[str, object]] = []
    for method in methods:
        floor = cases.get(f"{method}_floor")
        floor_s = floor.seconds if floor else None
        cm = cases[f"{method}_capmerge"]
        for kind in ("floor", "capmerge", "mergekit"):
            case = cases.get(f"{method}_{kind}")
            if case is None:
                continue
            sec = case.seconds
            tiny = startup.get(f"{method}_{kind}") if startup and kind != "floor" else None
            start = tiny.seconds if tiny else None
            notes = list(case.notes) if case.ok else [case.error(), *case.notes]
            if kind == "mergekit" and sec is not None and cm.seconds:
                notes.insert(0, f"{sec / cm.seconds:.1f}x capmerge's time")
            rows.append({
                "case": case.name, "size": size, "seconds": sec, "floor_seconds": floor_s,
                "ratio": sec / floor_s if sec is not None and floor_s else None,
                "steady_ratio": (sec - start) / floor_s if sec is not None and start is not None and floor_s else None,
                "startup_seconds": start,
                "peak_rss_mb": case.peak("peak_rss_mb") if case.ok else None,
                "peak_rss_anon_mb": case.peak("peak_anon_mb") if case.ok else None,
                "notes": "; ".join(n for n in notes if n),
            })  # fmt: skip
    return rows


def print_summary(by_depth: dict[int, list[dict[str, object]]], depths: list[int], methods: list[str]) -> None:
    """One line per method: steady/floor at the timed depth, RssAnon at each depth, mergekit's time."""
    get = {(d, str(r["case"])): r for d in depths for r in by_depth[d]}
    head = ["method", "layers", "floor s", "capmerge s", "steady/floor", *[f"RssAnon L{d} MB" for d in depths],
            "L/4 RssAnon", "mergekit s", "mergekit x"]  # fmt: skip
    body = []
    timed = max(depths)
    for m in methods:
        d_mk = next((d for d in depths if (d, f"{m}_mergekit") in get), timed)
        cm = get.get((timed, f"{m}_capmerge"), {})
        mk = get.get((d_mk, f"{m}_mergekit"), {})
        cm_mk = get.get((d_mk, f"{m}_capmerge"), {})
        anon = [get.get((d, f"{m}_capmerge"), {}).get("peak_rss_anon_mb") for d in depths]
        growth = anon[-1] / anon[0] if len(anon) > 1 and all(isinstance(a, float) and a for a in anon) else None
        mk_x = mk["seconds"] / cm_mk["seconds"] if mk.get("seconds") and cm_mk.get("seconds") else None
        body.append([m, str(timed), ba.fmt(cm.get("floor_seconds")), ba.fmt(cm.get("seconds")),
                     ba.fmt(cm.get("steady_ratio")), *[ba.fmt(a, ".0f") for a in anon], ba.fmt(growth),
                     ba.fmt(mk.get("seconds")) + (f" (L{d_mk})" if mk and d_mk != timed else ""),
                     ba.fmt(mk_x, ".1f")])  # fmt: skip
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]
    for line in [head, ["-" * w for w in widths], *body]:
        print(
            "  ".join(x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(line, widths, strict=True)))
        )
    ratios = [r for r in (get.get((timed, f"{m}_capmerge"), {}).get("steady_ratio") for m in methods) if r]
    if ratios:
        over = [m for m in methods if (get.get((timed, f"{m}_capmerge"), {}).get("steady_ratio") or 0) > GOAL_RATIO]
        print(f"steady/floor median {statistics.median(ratios):.2f}; over {GOAL_RATIO:g}x: {', '.join(over) or 'none'}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size", choices=sorted(ba.PRESETS), default="0.95b", help="checkpoint preset (default 0.95b)")
    ap.add_argument("--layers", type=int, help="override the preset's number of layers (the timed depth)")
    ap.add_argument("--methods", help="comma-separated methods (default: all of " + ", ".join(METHODS) + ")")
    ap.add_argument("--repeats", type=int, default=1, help="runs per case; the median is reported (default 1)")
    ap.add_argument("--work-dir", type=Path, default=ba.REPO / "benchmarks" / "work", help="checkpoints and outputs")
    ap.add_argument("--no-mergekit", action="store_true", help="skip mergekit even when .venv-mergekit exists")
    ap.add_argument(
        "--mergekit-layers",
        type=int,
        help="run mergekit only at this depth, capmerge there too for the ratio (default: the timed depth)",
    )
    ap.add_argument("--memory-depth", action="store_true", help="also run capmerge (and its floor) at 4 layers")
    ap.add_argument("--capmerge", help="capmerge executable (default: .venv/bin/capmerge, else the one on PATH)")
    ap.add_argument("--no-csv", action="store_true", help="print only; do not append to results.csv")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    methods = args.methods.split(",") if args.methods else list(METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        sys.exit(f"unknown method {unknown[0]!r} (choose from {', '.join(METHODS)})")
    cli = ba.capmerge_bin(args.capmerge)
    if cli is None:
        sys.exit("capmerge CLI not found (install the package or pass --capmerge)")
    use_mergekit = not args.no_mergekit and ba.MERGEKIT_YAML.exists()
    if not use_mergekit and not args.no_mergekit:
        print("mergekit not installed (bench_apply.py --setup-mergekit): skipped", file=sys.stderr)
    base = ba.PRESETS[args.size]
    timed = args.layers or base.layers
    mk_depth = args.mergekit_layers or timed
    # capmerge runs at mergekit's depth too (its ratio is taken there), and at 4 layers for the memory check
    depths = sorted({timed, mk_depth} | ({4} if args.memory_depth else set()))
    work: Path = args.work_dir.resolve()

    tiny = ba.PRESETS["tiny"]
    print("start-up (tiny preset)", file=sys.stderr)
    tiny_root = work / f"methods-tiny-L{tiny.layers}"
    tiny_dirs = ba.ensure_checkpoints(tiny_root, tiny, names="PABC")
    # the start-up as a median of as many runs as the timed ones: one run of it on a noisy machine could read more
    # than the whole steady part of a fast method (task_arithmetic's steady ratio read 0.6x)
    startup = run_methods(methods, tiny_dirs, tiny_root / "out", cli=cli, mergekit=False, floor=False,
                          repeats=args.repeats)  # fmt: skip
    by_depth: dict[int, list[dict[str, object]]] = {}
    for layers in depths:
        preset = ba.Preset(**{**asdict(base), "layers": layers})
        label = args.size if layers == base.layers else f"{args.size}-L{layers}"
        root = work / f"methods-{args.size}-L{layers}"
        print(label, file=sys.stderr)
        dirs = ba.ensure_checkpoints(root, preset, names="PABC")
        mk = use_mergekit and layers == mk_depth
        cases = run_methods(methods, dirs, root / "out", cli=cli, mergekit=mk, floor=True, repeats=args.repeats)
        for m in methods:
            floor = cases[f"{m}_floor"]
            floor.notes.append(f"{ba.human(ba.nbytes(dirs['P']))} per checkpoint")
            floor.notes.append(f"fastest copy by repeat: {' '.join(r.method for r in floor.runs)}")
        by_depth[layers] = make_rows(cases, startup, methods, label)
        ba.clean(root / "out")
    ba.clean(tiny_root / "out")
    rows = [r for d in depths for r in by_depth[d]]
    ba.print_table(rows)
    print()
    print_summary(by_depth, depths, methods)
    if not args.no_csv:
        ba.append_csv(rows)
        print(f"appended {len(rows)} rows to {ba.RESULTS.relative_to(ba.REPO)}")
    print(f"total wall time {time.perf_counter() - t_start:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
