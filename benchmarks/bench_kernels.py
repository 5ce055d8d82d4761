"""Benchmark the Triton kernels on a GPU: bandwidth against a device-to-device copy, and against torch eager.

Run (on a machine with a CUDA GPU):
    .venv/bin/python benchmarks/bench_kernels.py                      # 16M and 256M elements, then end-to-end apply
    .venv/bin/python benchmarks/bench_kernels.py --sizes 16M --no-e2e
    TRITON_INTERPRET=1 .venv/bin/python benchmarks/bench_kernels.py --smoke   # no GPU: the code path at 4096 elements

Kernel cases, bf16 in and out, in one run (median of --repeats, CUDA events, after warm-up):

    copy            dst.copy_(src)                                  read n + write n   (the practical limit)
    k1_scale_add    θ + α·τ (Triton merge, K = 1)                   read 2n + write n
    k3_ties         TIES, K = 3, density 0.3, thresholds given      read 4n + write n
    k3_dare         DARE (dare_linear), K = 3, density 0.3          read 4n + write n
    eager_*         the same with torch ops (capmerge.functional)   same bytes counted

GB/s counts bytes read + written; "of copy" is the ratio to the copy's GB/s. Bars (issue 4): k1_scale_add ≥ 85 % of
copy; k3_ties ≥ 70 % and ≥ 5× eager; k3_dare ≥ 70 %. Outputs of the Triton and eager runs are compared (bit-equal).

End to end: `capmerge apply --device cuda` vs `--device cpu` on a generated bf16 Llama-shaped checkpoint (--e2e-size,
default 2.7b ≈ 5.4 GB per checkpoint, made once under --work-dir), TIES of two vectors given as --add A --add S;
the outputs are compared tensor by tensor. Rows are appended to benchmarks/results.csv.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from bench_apply import CSV_COLUMNS, PRESETS, Preset, ensure_checkpoints, git_commit, machine  # noqa: E402

RESULTS = HERE / "results.csv"
E2E_PRESETS = {**PRESETS, "2.7b": Preset(hidden=2560, layers=32, intermediate=6912, vocab=32000, heads=32, shards=3)}
SIZES = {"16M": 16 * 2**20, "256M": 256 * 2**20, "4K": 4096}
DENSITY = 0.3


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="16M,256M", help="comma list of 16M, 256M, 4K (elements)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--no-e2e", action="store_true", help="skip the end-to-end capmerge apply comparison")
    ap.add_argument("--e2e-size", default="2.7b", choices=sorted(E2E_PRESETS))
    ap.add_argument("--work-dir", type=Path, default=HERE / "work")
    ap.add_argument("--no-csv", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="run the code path at 4096 elements (TRITON_INTERPRET=1)")
    return ap.parse_args()


class Timer:
    """Median seconds of ``fn`` over repeats: CUDA events on a GPU, perf_counter otherwise (--smoke)."""

    def __init__(self, repeats: int, cuda: bool) -> None:
        self.repeats, self.cuda = repeats, cuda

    def __call__(self, fn) -> float:  # type: ignore[no-untyped-def]
        fn()
        fn()  # warm-up (compilation, allocator)
        times = []
        for _ in range(self.repeats):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return statistics.median(times)


def kernel_cases(n: int, dev: torch.device, timer: Timer) -> list[dict[str, object]]:
    from capmerge import functional as F
    from capmerge.kernels.merge import Term, merge
    from capmerge.merge import compute

    g = torch.Generator(device=dev).manual_seed(0)
    bf = torch.bfloat16
    base = torch.randn(n, generator=g, device=dev).to(bf)
    vecs = [(0.01 * torch.randn(n, generator=g, device=dev)).to(bf) for _ in range(3)]
    out = torch.empty_like(base)
    eb = 2  # bytes per bf16 element
    rows: list[dict[str, object]] = []

    def add(case: str, seconds: float, nbytes: int, note: str = "") -> None:
        rows.append({"case": case, "seconds": seconds, "bytes": nbytes, "notes": note})

    add("copy", timer(lambda: out.copy_(base)), 2 * n * eb)
    # K = 1: θ + α·τ
    add("k1_scale_add", timer(lambda: merge([out], [0.5], base, [Term(vecs[0])])), 3 * n * eb)
    ref = F.merge(base, [vecs[0]], alpha=0.5)
    add("eager_k1_scale_add", timer(lambda: F.merge(base, [vecs[0]], alpha=0.5)), 3 * n * eb)
    same_k1 = torch.equal(out, ref)
    # K = 3 TIES (thresholds found beforehand, as the engine does)
    thr = [F.magnitude_threshold(v, DENSITY) for v in vecs]
    ties = [Term(v, None, 1.0, compute.PRUNE_MAGNITUDE, t) for v, t in zip(vecs, thr, strict=True)]
    add("k3_ties", timer(lambda: merge([out], [1.0], base, ties, sign="total", normalize=True)), 5 * n * eb)

    def eager_ties() -> torch.Tensor:
        pruned = [F.magnitude_prune(v, threshold=t) for v, t in zip(vecs, thr, strict=True)]
        return F.merge(base, pruned, sign="total", normalize=True)

    add("eager_k3_ties", timer(eager_ties), 5 * n * eb)
    same_ties = torch.equal(out, eager_ties())
    # K = 3 DARE (dare_linear: random prune with rescale, plain sum)
    keys = [F.tensor_key(0, "bench", i) for i in range(3)]
    dare = [Term(v, None, 1.0, compute.PRUNE_RANDOM, DENSITY, DENSITY, k) for v, k in zip(vecs, keys, strict=True)]
    add("k3_dare", timer(lambda: merge([out], [1.0], base, dare)), 5 * n * eb)

    def eager_dare() -> torch.Tensor:
        return F.merge(base, [F.random_prune(v, DENSITY, key=k) for v, k in zip(vecs, keys, strict=True)])

    add("eager_k3_dare", timer(eager_dare), 5 * n * eb)
    same_dare = torch.equal(out, eager_dare())
    copy_gbs = rows[0]["bytes"] / rows[0]["seconds"] / 1e9  # type: ignore[operator]
    eager = {r["case"]: r["seconds"] for r in rows if str(r["case"]).startswith("eager_")}
    same = {"k1_scale_add": same_k1, "k3_ties": same_ties, "k3_dare": same_dare}
    for r in rows:
        gbs = r["bytes"] / r["seconds"] / 1e9  # type: ignore[operator]
        r["gb_per_s"] = gbs
        r["of_copy"] = gbs / copy_gbs
        r["floor_seconds"] = r["bytes"] / (copy_gbs * 1e9)  # type: ignore[operator]
        extra = f"{gbs:.0f} GB/s, {100 * gbs / copy_gbs:.0f}% of copy"
        peer = f"eager_{r['case']}"
        if peer in eager:
            extra += f", {eager[peer] / r['seconds']:.1f}x eager"  # type: ignore[operator]
            extra += ", bit-equal to eager" if same[str(r["case"])] else ", DIFFERS from eager"
        r["notes"] = extra
    return rows


def e2e(args: argparse.Namespace) -> list[dict[str, object]]:
    """capmerge apply --device cuda vs cpu on a generated checkpoint; outputs compared tensor by tensor."""
    from safetensors import safe_open

    dirs = ensure_checkpoints(args.work_dir / args.e2e_size, E2E_PRESETS[args.e2e_size])
    exe = str(Path(sys.executable).with_name("capmerge"))
    rows, outs = [], {}
    for dev in ("cpu", "cuda"):
        out = args.work_dir / f"e2e-{dev}"
        cmd = [exe, "apply", str(dirs["P"]), "--add", str(dirs["A"]), "--add", str(dirs["S"]), "--method", "ties",
               "--density", str(DENSITY), "-o", str(out), "--force", "-q", "--device", dev]  # fmt: skip
        times = []
        for _ in range(max(1, min(3, args.repeats))):
            subprocess.run(["sync"], check=False)
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True)
            times.append(time.perf_counter() - t0)
        outs[dev] = out
        rows.append({"case": f"e2e_apply_ties2_{dev}", "seconds": statistics.median(times), "notes": " ".join(cmd)})
    diffs = 0
    for f in sorted(outs["cpu"].glob("*.safetensors")):
        with safe_open(str(f), "pt") as a, safe_open(str(outs["cuda"] / f.name), "pt") as b:
            diffs += sum(not torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())  # noqa: SIM118
    rows[1]["floor_seconds"] = rows[0]["seconds"]
    rows[1]["ratio"] = rows[1]["seconds"] / rows[0]["seconds"]  # type: ignore[operator]
    rows[1]["notes"] = f"vs --device cpu; {diffs} tensors differ from the CPU output"
    return rows


def main() -> None:
    args = parse_args()
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        args.sizes, args.repeats, args.no_e2e, args.no_csv = "4K", 1, True, True
    cuda = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
    if not cuda and not args.smoke:
        sys.exit("error: no CUDA GPU (use --smoke with TRITON_INTERPRET=1 to check the code path)")
    dev = torch.device("cuda" if cuda else "cpu")
    device_name = torch.cuda.get_device_name(dev) if cuda else "triton interpreter (cpu)"
    timer = Timer(args.repeats, cuda)
    rows: list[dict[str, object]] = []
    for size in args.sizes.split(","):
        for r in kernel_cases(SIZES[size], dev, timer):
            rows.append({**r, "size": size, "ratio": r["seconds"] / r["floor_seconds"]})  # type: ignore[operator]
    if not args.no_e2e:
        rows += [{**r, "size": args.e2e_size} for r in e2e(args)]
    print(f"device: {device_name}")
    print(f"{'case':<22}{'size':>6}{'seconds':>12}{'GB/s':>9}{'of copy':>9}  notes")
    for r in rows:
        gbs = f"{r['gb_per_s']:.0f}" if "gb_per_s" in r else ""
        oc = f"{100 * r['of_copy']:.0f}%" if "of_copy" in r else ""  # type: ignore[operator]
        print(f"{r['case']:<22}{r['size']:>6}{r['seconds']:>12.6f}{gbs:>9}{oc:>9}  {r.get('notes', '')}")
    if args.no_csv:
        return
    common = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine(),
        "device": device_name,
        "commit": git_commit(),
    }
    with RESULTS.open("a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        for r in rows:
            w.writerow({**common, **{k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()}})


if __name__ == "__main__":
    main()
