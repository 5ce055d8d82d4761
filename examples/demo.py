"""CapVector end to end on a real checkpoint (all-MiniLM-L6-v2, 22M parameters), on the CPU in well under a minute.

1. Copy the bundled checkpoint into ``OUT/pretrained`` (the pretrained model P).
2. Finetune it twice with a few real gradient steps on a tiny paraphrase task (see ``make_finetune.py``):
   ``OUT/sft`` (plain contrastive objective) and ``OUT/aux`` (the same plus masked-token reconstruction).
3. Run the real CLI:  ``capmerge diff OUT/sft OUT/aux -o OUT/capvector.safetensors``  (τ = θ_aux − θ_sft)
   and  ``capmerge apply OUT/pretrained OUT/capvector.safetensors -o OUT/meta --alpha A``  (θ_meta = θ_P + α·τ).
4. Load ``OUT/meta`` with transformers, check it against an independent torch computation of θ_P + α·τ, and show
   what moved: masked-token reconstruction (the auxiliary capability) and sentence similarities.

Run:  .venv/bin/python examples/demo.py [--out demo-output] [--steps 20] [--alpha 1.0] [--quiet]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from make_finetune import HELDOUT_PAIRS, bundled_model_dir, embed, finetune, load, masked_token_eval, set_offline

if TYPE_CHECKING:
    import torch

# Sentences whose embeddings are compared across models: the held-out paraphrase pairs.
_ANCHORS = [a for a, _ in HELDOUT_PAIRS]
_PARAPHRASES = [b for _, b in HELDOUT_PAIRS]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options of the demo."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("demo-output"), help="work directory (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=20, help="gradient steps per finetune (default: %(default)s)")
    parser.add_argument(
        "--alpha", type=float, default=1.0, help="scale of the capability vector (default: %(default)s)"
    )
    parser.add_argument("--quiet", action="store_true", help="print only the final checks and table")
    return parser.parse_args(argv)


def capmerge_command() -> list[str]:
    """The ``capmerge`` executable of this interpreter's environment (falls back to the one on PATH)."""
    exe = Path(sys.executable).parent / "capmerge"
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("capmerge")
    if found:
        return [found]
    raise SystemExit(f"error: the capmerge CLI is not installed next to {sys.executable} (run `make venv`)")


def run_cli(args: list[str], *, quiet: bool) -> None:
    """Run ``capmerge ARGS`` as a subprocess; echo the command and its stderr summary; exit on failure."""
    command = capmerge_command() + args
    shown = "capmerge " + " ".join(args)
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        print(f"$ {shown}\n{proc.stderr.rstrip()}", file=sys.stderr)
        raise SystemExit(f"error: `{shown}` exited with {proc.returncode}")
    if not quiet:
        print(f"$ {shown}   ({seconds:.1f} s)")
        for line in (proc.stderr + proc.stdout).strip().splitlines():
            print(f"    {line}")


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file or of a directory of safetensors shards, read with safetensors itself."""
    from safetensors.torch import load_file

    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    if not files:
        raise SystemExit(f"error: no safetensors weights in {path}")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors.update(load_file(str(file)))
    return tensors


def ulps(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest distance between ``actual`` and ``expected`` in units of the last place of ``expected`` (floats)."""
    import torch

    expected = expected.to(actual.dtype)
    if actual.numel() == 0:
        return 0.0
    spacing = torch.nextafter(expected.abs(), torch.tensor(float("inf"), dtype=expected.dtype)) - expected.abs()
    return float(((actual - expected).abs().double() / spacing.double()).max())


def check_vector(vector_path: Path, sft_dir: Path, aux_dir: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Read the capability vector, compare it with θ_aux − θ_sft computed by torch, and describe it."""
    import torch
    from safetensors import safe_open

    tau = read_weights(vector_path)
    sft, aux = read_weights(sft_dir), read_weights(aux_dir)
    with safe_open(str(vector_path), "pt") as f:
        metadata = f.metadata() or {}
    err = max((tau[k].double() - (aux[k].double() - sft[k].double())).abs().max().item() for k in tau)
    norm = torch.sqrt(sum((t.double() ** 2).sum() for t in tau.values())).item()
    numel = sum(t.numel() for t in tau.values())
    zero = [k for k, t in tau.items() if t.numel() and not t.any()]
    lines = [
        f"capability vector  {vector_path}: {len(tau)} tensors, {numel / 1e6:.1f} M values, "
        f"{vector_path.stat().st_size / 2**20:.1f} MiB, dtypes {sorted({str(t.dtype) for t in tau.values()})}",
        f"  ‖τ‖₂ = {norm:.4f}; all-zero tensors: {len(zero)} {zero if zero else ''}",
        f"  max |τ − (θ_aux − θ_sft)| = {err:.3g}   (torch, in float64)",
        f"  names match the finetunes: {set(tau) == set(sft) == set(aux)}",
    ]
    if metadata:
        shown = ", ".join(f"{k}={v[:60]}" for k, v in sorted(metadata.items()))
        lines.append(f"  header metadata: {shown}")
    top = sorted(tau, key=lambda k: -float(tau[k].double().norm()))[:3]
    lines.append("  largest tensors of τ: " + ", ".join(f"{k} ({float(tau[k].double().norm()):.3f})" for k in top))
    return tau, lines


def check_meta(
    pretrained_dir: Path, tau: dict[str, torch.Tensor], meta_dir: Path, alpha: float
) -> tuple[bool, list[str]]:
    """Compare θ_meta with θ_P + α·τ computed independently by torch (fp32); tensors not in τ must equal θ_P."""
    pre, meta = read_weights(pretrained_dir), read_weights(meta_dir)
    worst_abs, worst_ulp, worst_name = 0.0, 0.0, ""
    problems: list[str] = []
    if set(meta) != set(pre):
        problems.append(
            f"tensor names differ from P: missing {sorted(set(pre) - set(meta))}, extra {sorted(set(meta) - set(pre))}"
        )
    for name in sorted(set(pre) & set(meta)):
        expected = pre[name] + alpha * tau[name] if name in tau else pre[name]
        actual = meta[name]
        if actual.shape != expected.shape or actual.dtype != pre[name].dtype:
            problems.append(f"{name}: {actual.dtype}{list(actual.shape)} != {pre[name].dtype}{list(expected.shape)}")
            continue
        if not actual.is_floating_point():
            if not (actual == expected).all():
                problems.append(f"{name}: integer tensor changed")
            continue
        diff = float((actual.double() - expected.double()).abs().max()) if actual.numel() else 0.0
        if diff > worst_abs:
            worst_abs, worst_name = diff, name
        worst_ulp = max(worst_ulp, ulps(actual, expected))
    passthrough = sorted(set(pre) - set(tau))
    lines = [
        f"meta model  {meta_dir}: {len(meta)} tensors ({len(passthrough)} not in τ, kept from P: {passthrough})",
        f"  max |θ_meta − (θ_P + α·τ)| = {worst_abs:.3g} ({worst_name or '-'}), {worst_ulp:.0f} ulp   (α = {alpha})",
    ]
    ok = not problems and worst_ulp <= 1
    lines += [f"  PROBLEM: {p}" for p in problems]
    if worst_ulp > 1:
        lines.append("  PROBLEM: more than 1 ulp from the fp32 reference")
    return ok, lines


def compare_models(models: dict[str, Path]) -> list[str]:
    """Masked-token reconstruction and sentence similarities of each model, as a small table."""
    import torch.nn.functional as F

    rows, pair_cos = [], {}
    for label, model_dir in models.items():
        model, tokenizer = load(model_dir)
        loss, acc = masked_token_eval(model, tokenizer)
        anchors, paraphrases = embed(model, tokenizer, _ANCHORS), embed(model, tokenizer, _PARAPHRASES)
        positive = F.cosine_similarity(anchors, paraphrases)
        negative = F.cosine_similarity(anchors, paraphrases.roll(1, 0))
        pair_cos[label] = positive.tolist()
        rows.append(f"  {label:<14} {loss:>10.3f} {acc:>8.0%} {positive.mean():>14.3f} {negative.mean():>13.3f}")
    lines = [
        "held-out sentences       masked-token      paraphrase    unrelated",
        f"  {'model':<14} {'loss':>10} {'top-1':>8} {'cosine':>14} {'cosine':>13}",
        *rows,
        "paraphrase pairs (cosine " + " → ".join(models) + "):",
    ]
    for i, (a, b) in enumerate(HELDOUT_PAIRS):
        values = " → ".join(f"{pair_cos[label][i]:.3f}" for label in models)
        lines.append(f"  {values}   {a!r} ~ {b!r}")
    return lines


def main(argv: list[str] | None = None) -> int:
    """Run the demo; return 0 when θ_meta matches the independent computation."""
    args = parse_args(argv)
    set_offline()
    out: Path = args.out
    say = (lambda *a: None) if args.quiet else print
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    start = time.perf_counter()
    pretrained = out / "pretrained"
    if pretrained.exists():
        shutil.rmtree(pretrained)
    shutil.copytree(bundled_model_dir(), pretrained)
    timings["copy"] = time.perf_counter() - start
    say(f"pretrained P  {pretrained}  (copy of {bundled_model_dir()})")

    finetunes: dict[str, Path] = {}
    for objective in ("sft", "aux"):
        result = finetune(pretrained, out / objective, objective=objective, steps=args.steps)
        finetunes[objective] = result.output_dir
        timings[objective] = result.seconds
        extra = (
            f", masked-token loss {result.aux_losses[0]:.2f} → {result.aux_losses[-1]:.2f}" if result.aux_losses else ""
        )
        say(
            f"finetune {objective:<4} {result.output_dir}: {result.steps} steps in {result.seconds:.1f} s, "
            f"contrastive loss {result.losses[0]:.4f} → {result.losses[-1]:.4f}{extra}"
        )

    vector, meta = out / "capvector.safetensors", out / "meta"
    quiet_flag = ["--quiet"] if args.quiet else []
    start = time.perf_counter()
    run_cli(
        ["diff", str(finetunes["sft"]), str(finetunes["aux"]), "-o", str(vector), "--force", *quiet_flag],
        quiet=args.quiet,
    )
    timings["capmerge diff"] = time.perf_counter() - start
    start = time.perf_counter()
    run_cli(
        ["apply", str(pretrained), str(vector), "-o", str(meta), "--alpha", repr(args.alpha), "--force", *quiet_flag],
        quiet=args.quiet,
    )
    timings["capmerge apply"] = time.perf_counter() - start

    start = time.perf_counter()
    tau, lines = check_vector(vector, finetunes["sft"], finetunes["aux"])
    ok, meta_lines = check_meta(pretrained, tau, meta, args.alpha)
    print("\n".join(["", *lines, *meta_lines]))
    labels = {"P": pretrained, "sft": finetunes["sft"], "aux": finetunes["aux"], f"meta (α={args.alpha:g})": meta}
    print("\n".join(["", *compare_models(labels)]))
    timings["checks"] = time.perf_counter() - start

    say("\ntimings: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
    print("\nOK: θ_meta = θ_P + α·τ within 1 ulp" if ok else "\nFAILED: θ_meta does not match θ_P + α·τ")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
