"""The model card ``capmerge push`` uploads: YAML front matter + what the vector is, where it came from, its size,
per-layer statistics and how to apply it. Built with ``huggingface_hub.ModelCard`` / ``ModelCardData``."""

from __future__ import annotations

import json
import shlex
from typing import Any

from capmerge.io.checkpoint import Checkpoint

TOP_LAYERS = 40  # rows of the per-layer table (largest share first); the rest are summed in one row


def _hub_id(ref: str | None) -> str | None:
    """``org/name`` when a checkpoint reference names a Hub repo (``hf://org/name[@rev][/sub]`` or ``org/name``)."""
    if not ref:
        return None
    from capmerge.io.hub import parse_ref

    try:
        if ref.startswith("hf://"):
            h = parse_ref(ref)
        else:
            from capmerge.io.hub import _BARE

            m = _BARE.fullmatch(ref)
            h = parse_ref("hf://" + ref) if m else None
    except Exception:
        return None
    return h.repo_id if h else None


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError


def model_card(ck: Checkpoint, repo_id: str, *, recommended_alpha: float | None = None) -> str:
    """The README.md text for ``ck`` pushed to ``repo_id`` (reads the tensors once for the per-layer table)."""
    from huggingface_hub import ModelCard, ModelCardData

    from capmerge.analysis.stats import inspect

    meta = dict(ck.metadata)
    kind = meta.get("capmerge.kind") or ("merged" if "capmerge.merge" in meta else "checkpoint")
    is_vector = kind == "capability-vector" or getattr(ck, "kind", "dense") != "dense"
    card_data = ModelCardData(**_card_data(meta, is_vector, recommended_alpha))
    result = inspect([ck], by="layer")
    lines = [f"# {repo_id.split('/')[-1]}", ""]
    lines += _intro(meta, is_vector) + _size_and_layers(ck, result) + _usage(repo_id, is_vector, recommended_alpha)
    card = ModelCard.from_template(card_data, template_str="---\n{{ card_data }}\n---\n\n{{ body }}\n",
                                   body="\n".join(lines))  # fmt: skip
    return str(card)


def _card_data(meta: dict[str, str], is_vector: bool, recommended_alpha: float | None) -> dict[str, Any]:
    """The YAML front matter: library, tags, the Hub ids of the base models (and the relation for a merge)."""
    refs = [meta.get("capmerge.base"), meta.get("capmerge.aux")]
    if "capmerge.merge" in meta:  # a merged model: its base and the vectors merged into it
        try:
            rec = json.loads(meta["capmerge.merge"])
            refs = [rec["base"]["ref"], *(v.get("ref") for v in rec.get("vectors", []))]
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            refs = []
    bases = list(dict.fromkeys(b for b in map(_hub_id, refs) if b))
    data: dict[str, Any] = {"library_name": "capmerge"}
    if is_vector:
        data["tags"] = ["capmerge", "capability-vector"]
    else:
        data["tags"] = ["capmerge", "merge"]
    if bases:
        data["base_model"] = bases if len(bases) > 1 else bases[0]
        if not is_vector:
            data["base_model_relation"] = "merge"
    if recommended_alpha is not None:
        data["recommended_alpha"] = recommended_alpha
    return data


def _intro(meta: dict[str, str], is_vector: bool) -> list[str]:
    """What the repo holds, how it was made and the provenance keys of its header."""
    lines: list[str] = []
    if is_vector:
        lines += [
            "A **capability vector** made with [capmerge](https://github.com/capmerge/capmerge): the weight "
            "difference τ = θ_aux − θ_sft between a finetune trained with an auxiliary objective (AUX) and the plain "
            "finetune (SFT / BASE) of the same model. Added to another model of the same architecture, "
            "θ = θ_pre + α·τ, it carries the capability over without retraining.",
            "",
        ]
    else:
        lines += ["A model merged by weight arithmetic with [capmerge](https://github.com/capmerge/capmerge).", ""]
    command = meta.get("capmerge.command")
    if not command and meta.get("capmerge.base") and meta.get("capmerge.aux"):
        command = shlex.join(["capmerge", "diff", meta["capmerge.base"], meta["capmerge.aux"]])
    if command:
        lines += ["## How it was made", "", "```bash", command, "```", ""]
    prov = [(k, meta[k]) for k in sorted(meta) if k.startswith("capmerge.") and k != "capmerge.command"]
    if prov:
        lines += ["## Provenance (header metadata)", "", "| key | value |", "|---|---|"]
        lines += [f"| `{k}` | `{_cell(v)}` |" for k, v in prov if len(v) <= 200]
        lines += [""]
    return lines


def _size_and_layers(ck: Checkpoint, result: dict[str, Any]) -> list[str]:
    """Sizes, dtypes, fingerprint and the layers that hold most of ‖τ‖²."""
    vec = result["vectors"][0]
    layers = sorted(vec["layers"], key=lambda r: -r["share"])
    rows = layers[:TOP_LAYERS]
    dtypes = ", ".join(f"{d} ({v['tensors']} tensors)" for d, v in result["inputs"][0]["dtypes"].items())
    params = result["inputs"][0]["params"]
    lines = [
        "## Size",
        "",
        f"{len(ck.tensors)} tensors, {params:,} parameters, {_size(ck.nbytes)} of tensor data; dtypes: {dtypes}; "
        f"fingerprint `{ck.fingerprint()}`; ‖τ‖₂ = {vec['total']['l2']:.6g}.",
        "",
        "## Per-layer statistics",
        "",
        "| layer | tensors | params | norm | share of ‖τ‖² |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [f"| {r['name']} | {r['tensors']} | {r['numel']:,} | {r['l2']:.6g} | {r['share']:.4f} |" for r in rows]
    if len(layers) > len(rows):
        rest = layers[len(rows) :]
        share = sum(r["share"] for r in rest)
        lines += [f"| … {len(rest)} more | {sum(r['tensors'] for r in rest)} | {sum(r['numel'] for r in rest):,} "
                  f"| | {share:.4f} |"]  # fmt: skip
    return lines + [""]


def _usage(repo_id: str, is_vector: bool, recommended_alpha: float | None) -> list[str]:
    """How to apply the vector (or pull the model)."""
    lines: list[str] = []
    if is_vector:
        alpha = recommended_alpha if recommended_alpha is not None else 0.5
        lines += [
            "## How to apply it",
            "",
            "```bash",
            "pip install capmerge",
            f"capmerge apply <pretrained> hf://{repo_id} -o merged/ --alpha {alpha:g}",
            "```",
            "",
        ]
        if recommended_alpha is not None:
            lines += [f"Recommended α: **{recommended_alpha:g}**.", ""]
        else:
            lines += ["No recommended α was given; sweep a few values (`--alpha 0.3,0.5,0.8 -o 'out-{alpha}'`).", ""]
    else:
        lines += ["## How to use it", "", "```bash", f"capmerge pull {repo_id} -o model/", "```", ""]
    return lines


def _cell(v: str) -> str:
    return v.replace("|", "\\|").replace("`", "'").replace("\n", " ")
