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

# Tolerance of θ_meta vs the exact θ_P + α·τ, in ulps of the largest term: float32 math rounds up to three times.
_META_ULPS = 2

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
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    return args


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


def ulps(actual: torch.Tensor, exact: torch.Tensor, scale: torch.Tensor | None = None) -> float:
    """Largest distance of ``actual`` from an exact (float64) reference in ulps (units in the last place).

    The ulp is that of ``scale`` (default: the reference itself), taken in ``actual``'s dtype. A correctly rounded
    result is within 0.5 ulp of itself; a sum of rounded terms is within 1 ulp of its largest term.
    """
    import torch

    if actual.numel() == 0:
        return 0.0
    magnitude = (exact if scale is None else scale).to(actual.dtype).abs()
    spacing = torch.nextafter(magnitude, torch.full_like(magnitude, float("inf"))) - magnitude
    return float(((actual.double() - exact.double()).abs() / spacing.double()).max())


def check_vector(vector_path: Path, sft_dir: Path, aux_dir: Path) -> tuple[dict[str, torch.Tensor], bool, list[str]]:
    """Read the capability vector, compare it with θ_aux − θ_sft computed by torch, and describe it.

    Tensors the vector leaves out must be equal in both finetunes (capmerge drops all-zero differences).
    """
    from safetensors import safe_open

    tau = read_weights(vector_path)
    sft, aux = read_weights(sft_dir), read_weights(aux_dir)
    with safe_open(str(vector_path), "pt") as f:
        metadata = f.metadata() or {}
    problems = [f"{k} is not in the finetunes" for k in sorted(set(tau) - set(sft))]
    left_out = sorted(set(sft) - set(tau))
    problems += [f"{k} is left out of τ but differs between sft and aux" for k in left_out if not aux[k].equal(sft[k])]
    err, worst_ulp, norms = 0.0, 0.0, {}
    for name in sorted(set(tau) & set(sft)):
        exact = aux[name].double() - sft[name].double()
        err = max(err, float((tau[name].double() - exact).abs().max()))
        worst_ulp = max(worst_ulp, ulps(tau[name], exact))
        norms[name] = float(tau[name].double().norm())
    if worst_ulp > 1:
        problems.append(f"τ is {worst_ulp:.2g} ulp from the exact θ_aux − θ_sft")
    norm = sum(n**2 for n in norms.values()) ** 0.5
    numel = sum(t.numel() for t in tau.values())
    top = sorted(norms, key=norms.__getitem__, reverse=True)[:3]
    lines = [
        f"capability vector  {vector_path}: {len(tau)} tensors, {numel / 1e6:.1f} M values, "
        f"{vector_path.stat().st_size / 2**20:.1f} MiB, dtypes {sorted({str(t.dtype) for t in tau.values()})}",
        f"  ‖τ‖₂ = {norm:.4f}; largest: " + ", ".join(f"{k} ({norms[k]:.3f})" for k in top),
        f"  left out (equal in sft and aux): {left_out}",
        f"  max |τ − (θ_aux − θ_sft)| = {err:.3g}, {worst_ulp:.2g} ulp   (independent torch computation)",
    ]
    if metadata:
        shown = ", ".join(f"{k}={v if len(v) <= 24 else v[:21] + '...'}" for k, v in sorted(metadata.items()))
        lines.append(f"  header metadata: {shown}")
    lines += [f"  PROBLEM: {p}" for p in problems]
    return tau, not problems, lines


def check_meta(
    pretrained_dir: Path, tau: dict[str, torch.Tensor], meta_dir: Path, alpha: float
) -> tuple[bool, list[str]]:
    """Compare θ_meta with θ_P + α·τ computed independently by torch (in float64); tensors not in τ must equal θ_P."""
    pre, meta = read_weights(pretrained_dir), read_weights(meta_dir)
    worst_abs, worst_ulp, worst_name = 0.0, 0.0, ""
    problems: list[str] = []
    if set(meta) != set(pre):
        problems.append(
            f"tensor names differ from P: missing {sorted(set(pre) - set(meta))}, extra {sorted(set(meta) - set(pre))}"
        )
    for name in sorted(set(pre) & set(meta)):
        expected = pre[name].double() + alpha * tau[name].double() if name in tau else pre[name]
        actual = meta[name]
        if actual.shape != pre[name].shape or actual.dtype != pre[name].dtype:
            problems.append(f"{name}: {actual.dtype}{list(actual.shape)} != {pre[name].dtype}{list(expected.shape)}")
            continue
        if not actual.is_floating_point():
            if not (actual == expected).all():
                problems.append(f"{name}: integer tensor changed")
            continue
        diff = float((actual.double() - expected.double()).abs().max()) if actual.numel() else 0.0
        if diff > worst_abs:
            worst_abs, worst_name = diff, name
        # Ulps of the largest term: where θ_P ≈ −α·τ, float32 math that rounds α, α·τ and the sum (three roundings,
        # each fine on its own) is legitimately many ulps of the tiny result away from the exact value.
        scale = None
        if name in tau:
            scale = pre[name].double().abs().maximum((alpha * tau[name].double()).abs()).maximum(expected.abs())
        worst_ulp = max(worst_ulp, ulps(actual, expected, scale))
    passthrough = sorted(set(pre) - set(tau))
    lines = [
        f"meta model  {meta_dir}: {len(meta)} tensors ({len(passthrough)} not in τ, kept from P: {passthrough})",
        f"  max |θ_meta − (θ_P + α·τ)| = {worst_abs:.3g} ({worst_name or '-'}), "
        f"{worst_ulp:.2g} ulp of the largest term   (α = {alpha}, independent torch computation)",
    ]
    ok = not problems and worst_ulp <= _META_ULPS
    lines += [f"  PROBLEM: {p}" for p in problems]
    if worst_ulp > _META_ULPS:
        lines.append(f"  PROBLEM: more than {_META_ULPS} ulp from the exact θ_P + α·τ")
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
        "  (meta was never trained: it gets the masked-token skill only through τ = θ_aux − θ_sft)",
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
    tau, vector_ok, lines = check_vector(vector, finetunes["sft"], finetunes["aux"])
    meta_ok, meta_lines = check_meta(pretrained, tau, meta, args.alpha)
    ok = vector_ok and meta_ok
    print("\n".join(["", *lines, *meta_lines]))
    labels = {"P": pretrained, "sft": finetunes["sft"], "aux": finetunes["aux"], f"meta (α={args.alpha:g})": meta}
    print("\n".join(["", *compare_models(labels)]))
    timings["checks"] = time.perf_counter() - start

    say("\ntimings: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
    print(
        f"\nOK: τ = θ_aux − θ_sft and θ_meta = θ_P + α·τ within float32 rounding ({_META_ULPS} ulp)"
        if ok
        else "\nFAILED: see PROBLEM lines above"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
