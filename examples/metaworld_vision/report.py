"""Statistics and report files of the vision experiment: ``results.json``, ``results.md``, ``results.csv``, PNGs."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

from examples.metaworld_capvector.report import plot_cosines

from .stats import binomial, paired, recovery_ratio

LABELS = {
    "pre": "θ_pre → SFT",
    "pre+aux": "θ_pre → SFT + aux (upper bound)",
    "meta": "θ_meta → SFT",
    "meta+ortho": "θ_meta → SFT + ortho",
    "rand": "θ_pre + α·random → SFT",
    "aux": "θ_aux → SFT",
}
# (a, b): the paired difference a − b per seed. The first two are the protocol's; the rest are context.
COMPARISONS = [
    ("meta+ortho", "pre"),
    ("meta+ortho", "rand"),
    ("pre+aux", "pre"),
    ("meta", "pre"),
    ("meta+ortho", "meta"),
    ("aux", "pre"),
    ("rand", "pre"),
]
COSINE_ORDER = ("conv", "visual", "state_enc", "lang_proj", "blocks", "action_head")  # input to output


def per_seed(runs: list[dict[str, Any]], seeds: list[int]) -> dict[str, list[float]]:
    """variant → success % per seed (in the order of ``seeds``)."""
    rate = {(d["seed"], d["variant"]): d["success_pct"] for d in runs}
    variants = list(dict.fromkeys(d["variant"] for d in runs))
    return {v: [rate[(s, v)] for s in seeds] for v in variants}


def statistics(res: dict[str, Any]) -> dict[str, Any]:
    """``variants``, ``paired`` and ``recovery`` from the test runs (empty when the gate failed)."""
    seeds, test = res["seeds"], res.get("test") or []
    out: dict[str, Any] = {"variants": {}, "paired": {}, "recovery": {}}
    if not test:
        return out
    table = per_seed(test, seeds)
    for v, xs in table.items():
        runs = [d for d in test if d["variant"] == v]
        succ, eps = (
            sum(sum(d["successes"].values()) for d in runs),
            sum(d["episodes"] * len(d["successes"]) for d in runs),
        )
        out["variants"][v] = {"mean_pct": float(np.mean(xs)), "sd_pct": float(np.std(xs, ddof=1)) if len(xs) > 1 else
                              float("nan"), "per_seed_pct": xs, "successes": succ, "episodes": eps,
                              **binomial(succ, eps)}  # fmt: skip
    for a, b in COMPARISONS:
        if a in table and b in table:
            out["paired"][f"{a} - {b}"] = paired(table[a], table[b])
    m = {v: out["variants"][v]["mean_pct"] for v in out["variants"]}
    for v in ("meta", "meta+ortho", "aux"):
        if {v, "pre", "pre+aux"} <= set(m):
            out["recovery"][v] = recovery_ratio(m[v], m["pre"], m["pre+aux"])
    return out


def _f(x: float, fmt: str = ".1f") -> str:
    return "–" if x is None or (isinstance(x, float) and np.isnan(x)) else format(x, fmt)


def write_tables(res: dict[str, Any], out: Path) -> str:
    """``results.md`` and ``results.csv``; returns the markdown."""
    cfg, gate, seeds = res["config"], res["gate"], res["seeds"]
    calib = res["calibration"]
    n = len(seeds)
    lines = [
        f"# Vision CapVector experiment ({cfg['name']} mode), {res.get('date', '')}",
        "",
        f"{n} seeds ({', '.join(map(str, seeds))}), everything retrained per seed. Tasks: {cfg['n_pre']} pretraining, "
        f"{cfg['n_small']} small-set, {cfg['n_val']} validation ({', '.join(cfg['val_tasks'])}), {cfg['n_test']} test "
        f"({', '.join(cfg['test_tasks'])}). Finetuning on {cfg['demos_held']} demos per task for "
        f"{cfg['down_steps']} steps; success over {cfg['val_episodes']} (validation) / {cfg['test_episodes']} (test) "
        f"episodes per task with fixed reset seeds, horizon {cfg['horizon']}.",
        "",
        f"Auxiliary weight {calib['aux_weight']:g} ({calib['source']}"
        + (f"; median ‖∇BC‖/‖∇aux‖ {calib['ratio_median']:.3f}" if "ratio_median" in calib else "")
        + "). At the end of the small-set aux runs ‖∇(w·aux)‖/‖∇BC‖ = "
        + ", ".join(_f(u["aux"].get("grad_ratio_end", float("nan")), ".2f") for u in res["upstream"])
        + ".",
        "",
        "## Gate (validation)",
        "",
        f"θ_pre → SFT {gate['sft_validation_pct']:.1f} %, θ_pre → SFT + aux {gate['aux_validation_pct']:.1f} %: "
        f"difference {gate['aux_minus_sft_validation_points']:+.1f} points (95 % CI {_f(gate['ci95_low'], '+.1f')} to "
        f"{_f(gate['ci95_high'], '+.1f')}; per seed {', '.join(f'{d:+.1f}' for d in gate['per_seed'])}), threshold "
        f"{gate['threshold']:+g}: **{'passed' if gate['passed'] else 'failed'}**.",
    ]
    if not gate["passed"]:
        lines += ["", "The gate failed: the auxiliary objective does not help enough on the validation tasks for the "
                  "method to be testable in this setting, so no test task was evaluated."]  # fmt: skip
    if "alpha_choice" in res:
        ch = res["alpha_choice"]
        lines += ["", "α chosen on validation (θ_meta → SFT + ortho): "
                  + ", ".join(f"α={a}: {v:.1f} %" for a, v in ch["validation_pct"].items())
                  + f" → α = {ch['alpha']:g}."]  # fmt: skip
    st = res.get("stats") or {}
    if st.get("variants"):
        lines += ["", "## Test", "", "| variant | success % (mean ± SD over seeds) | pooled binomial SE | per seed |",
                  "| --- | --- | --- | --- |"]  # fmt: skip
        for v, lab in LABELS.items():
            if v in st["variants"]:
                x = st["variants"][v]
                lines.append(f"| {lab} | {x['mean_pct']:.1f} ± {_f(x['sd_pct'])} | {x['binomial_se_pct']:.1f} | "
                             f"{' '.join(f'{p:.0f}' for p in x['per_seed_pct'])} |")  # fmt: skip
        lines += ["", f"Paired by seed (n = {n}): mean difference in points, 95 % t-interval, exact Wilcoxon "
                  "signed-rank p (two-sided).", "", "| comparison | mean | 95 % CI | Wilcoxon p |",
                  "| --- | --- | --- | --- |"]  # fmt: skip
        for key, p in st["paired"].items():
            a, b = key.split(" - ")
            lines.append(f"| {LABELS[a]} − {LABELS[b]} | {p['mean']:+.1f} | {_f(p['ci95_low'], '+.1f')} to "
                         f"{_f(p['ci95_high'], '+.1f')} | {p['wilcoxon_p']:.3f} |")  # fmt: skip
        if st["recovery"]:
            lines += ["", "Recovery ratio (variant − θ_pre → SFT) / (θ_pre → SFT + aux − θ_pre → SFT) on test means: "
                      + ", ".join(f"{LABELS[v]} {_f(r, '.2f')}" for v, r in st["recovery"].items())]  # fmt: skip
        moved = [
            (d["variant"], d["delta_along_tau"], d["delta_cos_tau"]) for d in res["test"] if "delta_along_tau" in d
        ]
        for v in ("meta", "meta+ortho"):
            xs = [(a, c) for w, a, c in moved if w == v]
            if xs:
                lines.append(f"- {LABELS[v]}: finetuning moved θ along τ by ⟨Δ, τ⟩/‖τ‖² = "
                             f"{np.mean([a for a, _ in xs]):+.3f} (cos(Δ, τ) {np.mean([c for _, c in xs]):+.3f}), "
                             "mean over seeds")  # fmt: skip
    ups = res["upstream"]
    lines += ["", "## Small set and the capability vector", "",
              f"- final BC loss θ_sft {np.mean([u['sft']['bc_last'] for u in ups]):.4f}, θ_aux "
              f"{np.mean([u['aux']['bc_last'] for u in ups]):.4f}; final aux loss (normalised positions) "
              f"{np.mean([u['aux']['aux_last'] for u in ups]):.4f}",
              f"- cos(τ, τ_task) over all shared weights: {', '.join(format(u['cos_total'], '+.3f') for u in ups)}; "
              f"‖τ‖/‖τ_task‖ {', '.join(format(u['norm_ratio_total'], '.2f') for u in ups)}"]  # fmt: skip
    if res.get("null"):
        lines.append("- baseline, a second plain SFT run (another batch order): cos(θ_sft' − θ_sft, τ_task) "
                     + ", ".join(f"{x['cos_total']:+.3f}" for x in res["null"]))  # fmt: skip
    secs = res.get("job_seconds")
    if secs:
        lines.append(f"- compute: {secs['train'] / 60:.0f} min of training and {secs['eval'] / 60:.0f} min of "
                     f"simulated evaluation (summed over jobs); last invocation {res['seconds']['total'] / 60:.0f} min "
                     f"with {res['seconds']['workers']} workers")  # fmt: skip
        if "cpu" in res["seconds"]:
            lines[-1] += f", {res['seconds']['cpu'] / 60:.0f} min of CPU"
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["split", "variant", "alpha", "seed", "success_pct", "episodes_per_task", "successes_per_task"])
        for d in (res.get("validation") or []) + (res.get("test") or []):
            w.writerow([d["split"], d["variant"], f"{d['alpha']:g}", d["seed"], f"{d['success_pct']:.2f}",
                        d["episodes"], " ".join(f"{t}={k}" for t, k in d["successes"].items())])  # fmt: skip
    return text


def plot_success(res: dict[str, Any], path: Path) -> None:
    """Per-variant success (bars: mean, dots: seeds) on test, or on validation when the gate failed."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    seeds = res["seeds"]
    if res.get("test"):
        groups = {LABELS[v]: xs for v, xs in per_seed(res["test"], seeds).items()}
        title = f"test tasks, α = {res['alpha_choice']['alpha']:g}"
    else:
        val = res["validation"]
        groups = {LABELS[v]: xs for v, xs in per_seed([d for d in val if d["variant"] in ("pre", "pre+aux")],
                                                     seeds).items()}  # fmt: skip
        for a in res["config"]["alphas"]:
            runs = [d for d in val if d["variant"] == "meta+ortho" and d["alpha"] == a]
            groups[f"θ_meta(α={a:g}) → SFT + ortho"] = [d["success_pct"] for d in sorted(runs, key=lambda d: d["seed"])]
        title = "validation tasks (gate failed: no test evaluation)"
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    for i, xs in enumerate(groups.values()):
        ax.bar(i, np.mean(xs), color=f"C{i}", alpha=0.6)
        ax.scatter(np.full(len(xs), i) + np.linspace(-0.2, 0.2, len(xs)), xs, color="k", s=10, zorder=3)
    ax.set_xticks(range(len(groups)), list(groups), rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("success rate (%)")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(f"Meta-World from pixels, {title}; bars: mean over {len(seeds)} seeds, dots: seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_paired(res: dict[str, Any], path: Path) -> None:
    """The paired differences with their 95 % t-intervals."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    pairs = res["stats"]["paired"]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(pairs) + 1.5), dpi=120)
    for i, p in enumerate(pairs.values()):
        ax.errorbar(p["mean"], i, xerr=[[p["mean"] - p["ci95_low"]], [p["ci95_high"] - p["mean"]]], fmt="o",
                    color="C3" if i < 2 else "C0", capsize=3)  # fmt: skip
        ax.scatter(p["per_seed"], np.full(len(p["per_seed"]), i + 0.2), s=6, color="k", alpha=0.5)
    ax.set_yticks(range(len(pairs)), [" − ".join(LABELS[v] for v in k.split(" - ")) for k in pairs], fontsize=7)
    ax.invert_yaxis()
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlabel("paired difference in test success (points); 95 % t-interval over seeds, dots: seeds")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def job_seconds(res: dict[str, Any]) -> dict[str, float]:
    """Training and evaluation seconds summed over every job of the run (they survive resumes)."""
    runs = (res.get("validation") or []) + (res.get("test") or [])
    train = sum(p["seconds"] for p in res["pretrain"]) + sum(runs_["train_s"] for runs_ in runs)
    train += sum(u[k]["seconds"] for u in res["upstream"] for k in ("sft", "aux", "sft-b") if k in u)
    return {"train": train, "eval": sum(d["eval_s"] for d in runs)}


def finite(obj: Any) -> Any:
    """``obj`` with every NaN replaced by None (strict JSON)."""
    if isinstance(obj, float):
        return None if np.isnan(obj) else obj
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def write_report(res: dict[str, Any], out: Path) -> str:
    """Adds the statistics to ``res`` and writes every report file under ``out``; returns the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    res["stats"] = statistics(res)
    res["paired"] = {k: {m: p[m] for m in ("mean", "ci95_low", "ci95_high", "wilcoxon_p")}
                     for k, p in res["stats"]["paired"].items()}  # fmt: skip
    res["job_seconds"] = job_seconds(res)
    (out / "results.json").write_text(json.dumps(finite(res), indent=1, allow_nan=False))
    text = write_tables(res, out)
    plot_success(res, out / "success.png")
    if res["paired"]:
        plot_paired(res, out / "paired.png")
    plot_cosines(res, out / "cosine_layers.png", order=COSINE_ORDER)
    return text


def load_results(out: Path) -> dict[str, Any]:
    return json.loads((out / "results.json").read_text())
