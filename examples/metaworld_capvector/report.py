"""The report: results table (markdown + CSV), success-curve PNG and per-tensor cosine PNG from ``results.json``."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

LABELS = {
    "pre": "θ_pre, SFT",
    "pre+aux": "θ_pre, SFT + aux",
    "meta": "θ_meta, SFT",
    "meta+ortho": "θ_meta, SFT + ortho",
    "rand": "θ_pre + α·random, SFT",
    "task": "θ_pre + α·τ_task, SFT",
}


def success_table(res: dict[str, Any]) -> dict[str, dict[int, list[float]]]:
    """variant → step → per-seed success % over all held-out tasks and episodes."""
    cfg = res["config"]
    n = len(cfg["heldout_tasks"]) * cfg["eval_episodes"]
    table: dict[str, dict[int, list[float]]] = {}
    for d in sorted(res["downstream"], key=lambda d: d["seed"]):
        for step, per_task in d["successes"].items():
            table.setdefault(d["variant"], {}).setdefault(int(step), []).append(100 * sum(per_task.values()) / n)
    return table


def _ms(xs: list[float]) -> str:
    return f"{np.mean(xs):.1f} ± {np.std(xs):.1f}" if len(xs) > 1 else f"{xs[0]:.1f}"


def _join(xs: Any, fmt: str = ".2f") -> str:
    return ", ".join(format(x, fmt) for x in xs)


def write_tables(res: dict[str, Any], out: Path) -> str:
    """``results.md`` and ``results.csv``; returns the markdown."""
    cfg, table = res["config"], success_table(res)
    steps = sorted({s for v in table.values() for s in v})
    rows = [["variant", *[f"step {s}" for s in steps]], ["---"] * (len(steps) + 1)]
    for v, lab in LABELS.items():
        if v in table:
            rows.append([lab, *[_ms(table[v][s]) if s in table[v] else "–" for s in steps]])
    md = "\n".join("| " + " | ".join(r) + " |" for r in rows)
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["variant", "step", "mean_success_pct", "std_success_pct", "seeds", "per_seed_pct"])
        for v in LABELS:
            for s in sorted(table.get(v, {})):
                xs = table[v][s]
                w.writerow([v, s, f"{np.mean(xs):.2f}", f"{np.std(xs):.2f}", len(xs), " ".join(f"{x:.1f}" for x in xs)])
    if len(table.get("pre", {}).get(steps[-1], [])) > 1:  # paired by seed: every variant shares that seed's θ_pre
        drows = [["difference to θ_pre, SFT (points)", *[f"step {s}" for s in steps]], ["---"] * (len(steps) + 1)]
        for v, lab in LABELS.items():
            if v != "pre" and v in table:
                cells = []
                for s in steps:
                    d = np.array(table[v].get(s, [np.nan])) - np.array(table["pre"][s])
                    cells.append(f"{d.mean():+.1f} ± {d.std():.1f}")
                drows.append([lab, *cells])
        md += "\n\nPaired by seed (mean ± std over seeds of the per-seed difference):\n\n"
        md += "\n".join("| " + " | ".join(r) + " |" for r in drows)
    ups = res["upstream"]
    cos = [u["cos_total"] for u in ups]
    null = res.get("null") or []
    cost = res.get("cost") or []
    n_small = len(cfg["small_tasks"]) * cfg["eval_episodes"]
    lines = [
        f"Success rate (%) on {len(cfg['heldout_tasks'])} held-out Meta-World tasks × {cfg['eval_episodes']} episodes "
        f"(fixed reset seeds), after k steps of finetuning on {cfg['demos_held']} demos per task; mean ± std over "
        f"{len(ups)} seed{'s' if len(ups) > 1 else ''}.",
        "",
        md,
        "",
        f"- cos(τ_cap, τ_task) over all shared weights: {', '.join(f'{c:+.3f}' for c in cos)} (per seed); "
        f"‖τ_cap‖/‖τ_task‖ = {_join(u['norm_ratio_total'] for u in ups)}",
    ]
    if null:
        lines.append(
            f"- baseline: cos(θ_sft' − θ_sft, τ_task) for a second plain SFT run (another batch order): "
            f"{_join((n['cos_total'] for n in null), '+.3f')}; norm ratio {_join(n['norm_ratio_total'] for n in null)}"
        )
    if cost:
        lines.append(
            f"- cost per training step (steps interleaved, 1 thread, {cost[0]['rounds']} rounds per seed; plain SFT "
            f"step {1000 * np.mean([c['plain_step_s'] for c in cost]):.1f} ms): future-state aux "
            f"×{np.mean([c['aux_ratio'] for c in cost]):.2f} (median of paired ratios "
            f"×{np.mean([c['aux_paired'] for c in cost]):.2f}), orthogonality loss "
            f"×{np.mean([c['ortho_ratio'] for c in cost]):.2f} (×{np.mean([c['ortho_paired'] for c in cost]):.2f})"
        )
    if all("small_successes" in u["sft"] for u in ups):
        sft = [100 * sum(u["sft"]["small_successes"].values()) / n_small for u in ups]
        aux = [100 * sum(u["aux"]["small_successes"].values()) / n_small for u in ups]
        lines.append(
            f"- on the small set itself (before subtraction): θ_sft {_ms(sft)} %, θ_aux {_ms(aux)} % success; "
            f"final BC loss θ_sft {np.mean([u['sft']['bc_last'] for u in ups]):.4f}, "
            f"θ_aux {np.mean([u['aux']['bc_last'] for u in ups]):.4f}"
        )
    sweep = {a: np.mean([u["alpha_sweep"][a]["bc_small"] for u in ups]) for a in ups[0]["alpha_sweep"]}
    lines.append(
        "- α sweep (one `capmerge.apply` pass), BC loss of θ_pre + α·τ on the small set: "
        + ", ".join(f"α={a}: {v:.4f}" for a, v in sweep.items())
        + f"; downstream uses α = {cfg['alpha']:g} (fixed in advance)"
    )
    ortho = [d["ortho_cos_end"] for d in res["downstream"] if "ortho_cos_end" in d]
    if ortho:
        lines.append(f"- cos(Δ, τ) at the end of θ_meta + ortho finetuning: {', '.join(f'{c:+.3f}' for c in ortho)}")
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    return text


def plot_success(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    cfg, table = res["config"], success_table(res)
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    styles = {"pre": "-", "pre+aux": "--", "meta": "-", "meta+ortho": "--", "rand": ":", "task": ":"}
    colors = {"pre": "C0", "pre+aux": "C0", "meta": "C3", "meta+ortho": "C3", "rand": "C7", "task": "C2"}
    for i, (v, lab) in enumerate(LABELS.items()):
        if v not in table:
            continue
        steps = sorted(table[v])
        m = [np.mean(table[v][s]) for s in steps]
        sd = [np.std(table[v][s]) for s in steps]
        x = np.array(steps) + (i - 2.5) * max(steps) * 0.004  # a small dodge so error bars do not overlap
        ax.errorbar(x, m, yerr=sd, label=lab, ls=styles[v], color=colors[v], marker="o", capsize=3, lw=1.6)
    ax.set_xlabel("finetuning steps on the held-out tasks")
    ax.set_ylabel("success rate (%)")
    ax.set_ylim(0, 100)
    ax.set_xticks(sorted({s for v in table.values() for s in v}))
    ax.grid(alpha=0.3)
    ax.set_title(
        f"Meta-World, {len(cfg['heldout_tasks'])} held-out tasks × {cfg['eval_episodes']} episodes, "
        f"mean ± std over {len(res['upstream'])} seed{'s' if len(res['upstream']) > 1 else ''}",
        fontsize=10,
    )
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_cosines(
    res: dict[str, Any], path: Path, *, order: tuple[str, ...] = ("state_enc", "lang_proj", "blocks", "action_head")
) -> None:
    """Per-tensor cos(τ_cap, τ_task) (and the two-SFT-runs baseline), tensors sorted by the name prefixes ``order``
    (input to output)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    ups = res["upstream"]
    names = [n for n in ups[0]["cos_tensors"] if all(u["cos_tensors"].get(n) is not None for u in ups)]
    names.sort(key=lambda n: (next((i for i, p in enumerate(order) if n.startswith(p)), len(order)), n))
    null = res.get("null") or []
    series = [("cos(τ_cap, τ_task),  τ_cap = θ_aux − θ_sft", ups, "C3")]
    if null:
        series.append(("baseline: cos(θ_sft' − θ_sft, τ_task), a second plain SFT run", null, "C7"))
    names = [n for n in names if all(x["cos_tensors"].get(n) is not None for _, xs, _ in series for x in xs)]
    fig, ax = plt.subplots(figsize=(7.5, 0.34 * len(names) + 1.9), dpi=120)
    y = np.arange(len(names))
    h = 0.8 / len(series)
    for i, (lab, xs, color) in enumerate(series):
        vals = np.array([[x["cos_tensors"][n] for n in names] for x in xs])
        tot = np.mean([x["cos_total"] for x in xs])
        ax.barh(y + (i - (len(series) - 1) / 2) * h, vals.mean(0), height=h, xerr=vals.std(0) if len(xs) > 1 else None,
                color=color, alpha=0.85, capsize=2, label=f"{lab}  (all weights {tot:+.2f})")  # fmt: skip
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlim(-1, 1)
    ax.set_xlabel("cosine with the task vector τ_task = θ_sft − θ_pre")
    ax.set_title(
        "Per-tensor cosine of the capability vector with the task vector"
        + (f" (mean ± std over {len(ups)} seeds)" if len(ups) > 1 else ""),
        fontsize=9,
    )
    ax.legend(fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.04), ncol=1, frameon=False)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(res: dict[str, Any], out: Path) -> str:
    """Every report file under ``out`` (``results.json`` is written by the caller); returns the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    text = write_tables(res, out)
    plot_success(res, out / "success_curve.png")
    plot_cosines(res, out / "cosine_layers.png")
    return text


def load_results(out: Path) -> dict[str, Any]:
    return json.loads((out / "results.json").read_text())
