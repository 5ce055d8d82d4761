"""``python -m examples.metaworld_capvector [--quick]``: the CapVector experiment on Meta-World, end to end."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from .config import FULL, QUICK
from .pipeline import log, run_pipeline
from .report import load_results, write_report

HERE = Path(__file__).parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m examples.metaworld_capvector", description=__doc__)
    p.add_argument("--quick", action="store_true", help="small settings: the whole pipeline in a few minutes")
    p.add_argument("--cache", type=Path, help="demos, embeddings, checkpoints (default: metaworld-cache/MODE)")
    p.add_argument("--out", type=Path, help="report directory (default: results/ here; demo-output/metaworld-quick)")
    p.add_argument("--seeds", type=str, help="comma-separated training seeds (default: the mode's)")
    p.add_argument("--workers", type=int, default=1, help="processes over seeds/variants (default: 1)")
    p.add_argument("--report-only", action="store_true", help="rewrite the report from OUT/results.json")
    args = p.parse_args(argv)

    cfg = QUICK if args.quick else FULL
    if args.seeds:
        cfg = cfg.replace(seeds=tuple(int(s) for s in args.seeds.split(",")))
    out = args.out or (Path("demo-output/metaworld-quick") if args.quick else HERE / "results")
    cache = args.cache or Path("metaworld-cache") / cfg.name
    if args.report_only:
        res = load_results(out)
    else:
        t0 = time.perf_counter()
        log(f"{cfg.name} mode: {cfg.n_pre} pretraining, {cfg.n_small} small-set, {cfg.n_held} held-out tasks; "
            f"seeds {list(cfg.seeds)}; cache {cache}, report {out}")  # fmt: skip
        res = run_pipeline(cfg, cache, args.workers)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(res, indent=1))
        seed0 = cache / "runs" / f"seed{cfg.seeds[0]}"
        for name in ("inspect.json", "inspect.png"):  # capmerge inspect's own output for the first seed
            shutil.copyfile(seed0 / name, out / name)
        log(f"done in {time.perf_counter() - t0:.0f} s")
    print(write_report(res, out))
    print(f"report: {out}/results.md, results.csv, success_curve.png, cosine_layers.png, results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
