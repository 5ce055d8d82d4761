"""Downstream finetuning with and without the orthogonality loss, on the real all-MiniLM-L6-v2 checkpoint (CPU, ~1 min).

1. A capability vector τ from two short finetunes of the bundled checkpoint (the CapVector recipe, in memory):
   τ = θ_aux − θ_sft, where "aux" adds masked-token reconstruction to the paraphrase objective of "sft"
   (helpers from ``make_finetune.py``).
2. θ_meta = θ_pre + α·τ (``capmerge.apply_to_model``).
3. Downstream SFT from θ_meta (the paraphrase objective, new batch order) three times: plain, with
   ``OrthogonalityLoss`` (cosine2), and with the hard ``project_updates`` — printing how cos(Δ, τ) evolves,
   Δ = θ − θ_meta, and at the end the masked-token loss (the capability τ carries) on held-out text.

Run:  .venv/bin/python examples/ortho_finetune.py [--steps 30] [--weight 0.1] [--lr 1e-4]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from make_finetune import (
    TRAIN_PAIRS,
    bundled_model_dir,
    contrastive_loss,
    load,
    masked_token_eval,
    masked_token_loss,
    torch_threads,
)

from capmerge import apply_to_model
from capmerge.ortho import OrthogonalityLoss, project_updates


def batches(steps: int, size: int, seed: int) -> list[list[tuple[str, str]]]:
    """``steps`` batches of paraphrase pairs in a seeded order."""
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    out = []
    for _ in range(steps):
        if len(order) < size:
            order += torch.randperm(len(TRAIN_PAIRS), generator=gen).tolist()
        out.append([TRAIN_PAIRS[i] for i in order[:size]])
        del order[:size]
    return out


def finetune(model, tokenizer, pairs_list, *, aux: bool, lr: float, reg=None, hook_into=None, report=None):
    """AdamW over the batches; the loss is contrastive (+ masked-token if ``aux``, + ``reg()`` if given).

    ``report`` (an OrthogonalityLoss used only to measure) is read every 5 steps; returns the rows printed."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    handle = hook_into(model, opt) if hook_into else None
    mask_gen = torch.Generator().manual_seed(1)
    rows = []
    for step, pairs in enumerate(pairs_list, 1):
        loss = contrastive_loss(model, tokenizer, pairs)
        task = float(loss.detach())
        if aux:
            loss = loss + masked_token_loss(model, tokenizer, [s for p in pairs for s in p], mask_gen)[0]
        term = 0.0
        if reg is not None:
            value = reg()
            term = float(value.detach())
            loss = loss + value
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if report is not None and (step % 5 == 0 or step == 1):
            rows.append((step, task, report.report(per_tensor=False)["cos"], term))
    if handle is not None:
        handle.remove()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="downstream steps (default: %(default)s)")
    parser.add_argument("--weight", type=float, default=0.1, help="λ of the cosine2 loss (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=1e-4, help="downstream AdamW learning rate (default: %(default)s)")
    parser.add_argument("--alpha", type=float, default=1.0, help="θ_meta = θ_pre + α·τ (default: %(default)s)")
    args = parser.parse_args()
    start = time.perf_counter()
    with torch_threads(1):
        torch.manual_seed(0)
        pretrained, tokenizer = load(bundled_model_dir())
        # 1. τ = θ_aux − θ_sft: the same 8 batches, with and without the auxiliary objective (dropout off)
        cap_batches = batches(8, 8, seed=0)
        runs = {}
        for aux in (False, True):
            model = copy.deepcopy(pretrained)
            finetune(model, tokenizer, cap_batches, aux=aux, lr=1e-4)
            runs[aux] = {n: p.detach().clone() for n, p in model.named_parameters()}
        tau = {n: runs[True][n] - runs[False][n] for n in runs[True] if (runs[True][n] != runs[False][n]).any()}
        print(
            f"capability vector: {len(tau)} tensors, ‖τ‖ = {sum(float(t.norm()) ** 2 for t in tau.values()) ** 0.5:.4f}"
        )
        # 2. θ_meta
        meta = copy.deepcopy(pretrained)
        apply_to_model(meta, tau, alpha=args.alpha)
        # 3. downstream SFT three ways, on batches the vector never saw
        down = batches(args.steps, 8, seed=42)
        results = {}
        setups = {
            "plain": {},
            f"cosine2 λ={args.weight:g}": {"loss": True},
            "project_updates": {"hook_into": lambda m, opt: project_updates(m, tau, opt)},
        }
        for name, setup in setups.items():
            model = copy.deepcopy(meta)
            monitor = OrthogonalityLoss(model, tau, weight=0.0)  # measures cos(Δ, τ) from θ_meta; adds nothing
            reg = OrthogonalityLoss(model, tau, mode="cosine2", weight=args.weight) if setup.get("loss") else None
            rows = finetune(model, tokenizer, down, aux=False, lr=args.lr, reg=reg, hook_into=setup.get("hook_into"),
                            report=monitor)  # fmt: skip
            per_tensor = [v["cos"] for v in monitor.report()["tensors"].values()]
            rms = (sum(c * c for c in per_tensor) / len(per_tensor)) ** 0.5  # what cosine2 minimises, per tensor
            results[name] = (rows, masked_token_eval(model.eval(), tokenizer)[0], rms)
    names = list(results)
    print(f"\ndownstream SFT from θ_meta: cos(Δ, τ) over all {len(tau)} tensors (task loss in brackets)")
    print(f"{'step':>5}  " + "  ".join(f"{n:>24}" for n in names))
    for i, (step, *_) in enumerate(results[names[0]][0]):
        cells = [f"{results[n][0][i][2]:+.2e} ({results[n][0][i][1]:.4f})" for n in names]
        print(f"{step:>5}  " + "  ".join(f"{c:>24}" for c in cells))
    print("per-tensor RMS cos(Δ_l, τ_l) at the end: " + ", ".join(f"{n} {results[n][2]:.2e}" for n in names))
    step, task, _, term = results[names[1]][0][-1]
    print(
        f"{names[1]} at step {step}: regulariser λ·mean_l cos²(Δ_l, τ_l) = {term:.4f} next to a task loss of {task:.4f}"
    )
    before = masked_token_eval(meta.eval(), tokenizer)[0]
    print(f"\nmasked-token loss on held-out text (the capability τ carries): θ_meta {before:.4f}, after SFT: "
          + ", ".join(f"{n} {results[n][1]:.4f}" for n in names))  # fmt: skip
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
