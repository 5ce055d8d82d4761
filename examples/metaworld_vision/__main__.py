"""``python -m examples.metaworld_vision [--quick]``: CapVector on Meta-World from pixels, behind a gate."""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from examples.metaworld_capvector.pipeline import log

from .config import FULL, QUICK, SMOKE
from .pipeline import run_dir, run_pipeline
from .report import load_results, write_report

HERE = Path(__file__).parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m examples.metaworld_vision", description=__doc__)
    p.add_argument("--quick", action="store_true", help="calibration, gate and a miniature of the rest (≤ 20 min)")
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # the test suite's miniature
    p.add_argument("--cache", type=Path, default=Path("metaworld-cache/vision"),
                   help="rendered demos, embeddings, checkpoints, per-job results (default: %(default)s)")  # fmt: skip
    p.add_argument("--out", type=Path, help="report directory (default: results/ here, results/quick/ with --quick)")
    p.add_argument("--seeds", type=str, help="comma-separated training seeds (default: the mode's)")
    p.add_argument("--workers", type=int, default=1, help="processes over seeds and runs (default: 1)")
    p.add_argument("--report-only", action="store_true", help="rewrite the report from OUT/results.json")
    args = p.parse_args(argv)

    cfg = SMOKE if args.smoke else QUICK if args.quick else FULL
    if args.seeds:
        cfg = cfg.replace(seeds=tuple(int(s) for s in args.seeds.split(",")))
    out = args.out or HERE / "results" / ("" if cfg.name == "full" else cfg.name)
    if args.report_only:
        res = load_results(out)
    else:
        t0 = time.perf_counter()
        log(f"{cfg.name} mode: {cfg.n_pre} pretraining, {cfg.n_small} small-set, {cfg.n_val} validation, "
            f"{cfg.n_test} test tasks; seeds {list(cfg.seeds)}; cache {args.cache}, report {out}")  # fmt: skip
        res = run_pipeline(cfg, args.cache, args.workers)
        out.mkdir(parents=True, exist_ok=True)
        seed0 = run_dir(cfg, args.cache, cfg.seeds[0])
        for name in ("inspect.json", "inspect.png"):  # capmerge inspect's own output for the first seed
            shutil.copyfile(seed0 / name, out / name)
        log(f"done in {time.perf_counter() - t0:.0f} s")
    print(write_report(res, out))
    print(f"report: {out}/results.md, results.csv, results.json, success.png, cosine_layers.png"
          + (", paired.png" if res["paired"] else ""))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
