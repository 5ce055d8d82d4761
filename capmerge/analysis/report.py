"""Showing :func:`capmerge.inspect` results: a rich table on the terminal and a PNG (matplotlib, optional extra)."""

from __future__ import annotations

import os
import sys
from typing import Any

from capmerge.errors import UsageError

PLOT_HINT = "--plot needs matplotlib, which is not installed (pip install 'capmerge[plot]')"


def require_matplotlib() -> None:
    """Fail early — before any data is read — when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError(PLOT_HINT) from None


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def human_count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def _num(x: float | None, fmt: str = ".4g") -> str:
    return "–" if x is None else format(x, fmt)


def _energy(sp: dict[str, Any]) -> str:
    """The top-k energy cell of a spectrum (none for a tensor holding NaN/Inf)."""
    return "– (NaN/Inf)" if sp["energy_top_k"] is None else f"{sp['energy_top_k']:.1%} (k={sp['k']})"


def _shorten_hash(v: str) -> str:
    return v[:23] + "…" if v.startswith("sha256:") and len(v) > 24 else v


META_SHOWN = 96  # longer header values (JSON tables) are summarised on the terminal; --json has them in full


def meta_value(v: str) -> str:
    """A header metadata value as the terminal shows it: short values as they are, long ones summarised."""
    v = _shorten_hash(v)
    if len(v) <= META_SHOWN:
        return v
    import json

    try:
        parsed = json.loads(v)
    except (ValueError, RecursionError):
        parsed = None
    if isinstance(parsed, dict | list):
        what = "object" if isinstance(parsed, dict) else "list"
        return f"<JSON {what}, {len(parsed)} entries, {human_bytes(len(v))}; see --json>"
    return v[: META_SHOWN - 1] + "…"


def compression_line(c: dict[str, Any]) -> str:
    """One line for :func:`capmerge.compression_info`: kind, ranks / nnz, size ratio, error, cosine."""
    parts = [c["kind"] + (f" int{c['bits']}" if c.get("bits") else "")]
    if c.get("ranks"):
        r = c["ranks"]
        parts.append(
            f"rank {r['min']}" if r["min"] == r["max"] else f"ranks {r['min']}–{r['max']} (median {r['median']})"
        )
    if c["counts"].get("sparse"):
        parts.append(f"{human_count(c['nnz'])} entries kept")
    n = sum(c["counts"].values())
    parts.append(f"{n - c['counts'].get('dense', 0)} of {n} tensors compressed")
    line = ", ".join(parts) + (f"; {human_bytes(c['bytes_before'])} dense -> {human_bytes(c['bytes_after'])} stored "
                               f"(ratio {c['ratio']:.3g})")  # fmt: skip
    if c.get("rel_error") is not None:
        line += f"; rel error {c['rel_error']:.4g}, cosine {c['cosine']:.6f}"
    elif c.get("exact"):
        line += "; exact (LoRA factors)"
    else:
        line += "; error not recorded"
    return line


def _compressed_cells(r: dict[str, Any]) -> list[str]:
    c = r.get("compression")
    if c is None:
        return ["", "", ""]
    how = c["storage"] + (f" int{c['bits']}" if c.get("bits") else "")
    size = str(c["rank"]) if "rank" in c else human_count(c["nnz"]) if "nnz" in c else "–"
    return [how, size, _num(c.get("rel_error"), ".3g")]


def _layer_sort_key(name: str) -> tuple[int, int | str]:
    return (0, int(name)) if name.isdigit() else (1, name)


def _rows(section: dict[str, Any], by: str, top: int) -> tuple[list[dict[str, Any]], str]:
    rows = section["tensors" if by == "tensor" else "layers" if by == "layer" else "modules"]
    if top and len(rows) > top:
        key = "l2" if "l2" in rows[0] else "norm_a"
        shown = sorted(rows, key=lambda r: -(r.get(key) or 0.0))[:top]
        return shown, f"top {top} of {len(rows)} {by}s by norm"
    return rows, f"{len(rows)} {by}s"


def print_report(result: dict[str, Any], *, top: int = 20, file: Any = None) -> None:
    """Print headers, per-group statistics and comparisons as rich tables (on stdout unless ``file``)."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    out = file if file is not None else sys.stdout
    # Not a terminal (a pipe, a log): wide enough that the columns keep their headers.
    # markup off: paths, tensor names and labels print verbatim ("run[/x]/v.safetensors" is not a closing tag)
    console = Console(file=out, highlight=False, markup=False, width=None if out.isatty() else 160)
    by = result.get("by", "layer")
    for inp in result["inputs"]:
        dtypes = ", ".join(f"{k} ×{v['tensors']}" for k, v in inp["dtypes"].items())
        storage = {"lowrank": "low-rank", "dense": ""}.get(inp.get("storage", "dense"), inp.get("storage"))
        kind = inp["kind"] + (f" ({storage})" if storage else "")
        console.print(Text.assemble((inp["ref"], "bold"), f"  kind: {kind}"))
        console.print(
            f"  {inp['tensors']} tensors, {human_count(inp['params'])} parameters, "
            f"{human_bytes(inp['size_on_disk'])} on disk in {len(inp['files'])} file(s); dtypes: {dtypes}"
        )
        if inp.get("compression"):
            console.print(f"  compression: {compression_line(inp['compression'])}")
        for k, v in inp["metadata"].items():
            if k.startswith("capmerge.") and k not in ("capmerge.merge", "capmerge.kind"):
                console.print(f"  {k}: {meta_value(v)}")
        console.print(f"  fingerprint: {_shorten_hash(inp['fingerprint'])}")
    for vec in result.get("vectors", []):
        rows, caption = _rows(vec, by, top)
        title = vec["label"]
        if vec.get("dense_view_of"):
            title += f" — statistics of the dense view τ̂ ({vec['dense_view_of']}), rebuilt one tensor at a time"
        t = Table(title=title, caption=caption, title_justify="left")
        for col in (by, "tensors", "params", "L2", "share", "mean |x|", "zeros", "max |x|"):
            t.add_column(col, justify="left" if col == by else "right")
        stored = by == "tensor" and any(r.get("compression") for r in rows)
        if stored:
            for col in ("stored", "rank/nnz", "rel error"):
                t.add_column(col, justify="right")
        spectrum = by == "tensor" and any("spectrum" in r for r in rows)
        if spectrum:
            for col in ("stable rank", "rank90", "top-k energy"):
                t.add_column(col, justify="right")
        for r in rows:
            cells = [str(r["name"]), str(r.get("tensors", 1)), human_count(r["numel"]), _num(r["l2"]),
                     f"{r['share']:.1%}", _num(r["mean_abs"]), f"{r['zero_frac']:.1%}", _num(r["max_abs"])]  # fmt: skip
            if spectrum:
                sp = r.get("spectrum")
                cells += ["–", "–", "–"] if sp is None else [
                    _num(sp["stable_rank"], ".3g"), "–" if sp["rank90"] is None else str(sp["rank90"]),
                    _energy(sp)]  # fmt: skip
            if stored:
                cells += _compressed_cells(r)
            t.add_row(*cells)
        tot = vec["total"]
        t.add_section()
        t.add_row("total", str(tot["tensors"]), human_count(tot["numel"]), _num(tot["l2"]), "100%",
                  _num(tot["mean_abs"]), f"{tot['zero_frac']:.1%}", _num(tot["max_abs"]),
                  *(["", "", ""] if spectrum else []), *(["", "", ""] if stored else []))  # fmt: skip
        console.print(t)
        if tot["nonfinite"]:
            console.print(f"warning: {tot['nonfinite']} NaN/Inf values", style="red")
        if vec["skipped"]:
            console.print(f"  skipped {len(vec['skipped'])} tensor(s): " + ", ".join(list(vec["skipped"])[:5]))
    for comp in result.get("comparisons", []):
        rows, caption = _rows(comp, by, top)
        t = Table(title=f"a = {comp['a']}\nb = {comp['b']}", caption=caption, title_justify="left")
        for col in (by, "cos(a, b)", "‖a‖", "‖b‖", "‖a‖/‖b‖"):
            t.add_column(col, justify="left" if col == by else "right")
        for r in [*rows, None]:
            if r is None:
                t.add_section()
                r = {"name": "total", **comp["total"]}
            t.add_row(str(r["name"]), _num(r["cos"], "+.4f"), _num(r["norm_a"]), _num(r["norm_b"]),
                      _num(r["ratio"], ".3f"))  # fmt: skip
        console.print(t)
        for key, side in (("only_in_a", "a"), ("only_in_b", "b")):
            if comp[key]:
                console.print(f"  {len(comp[key])} tensor(s) only in {side} (counted as zero in the other)")


def _short(ref: str) -> str:
    """A path's last component (two when the file name is a generic one such as model.safetensors)."""
    parts = ref.rstrip("/").removesuffix(".safetensors").split("/")
    generic = parts[-1].startswith(("model", "capvector", "adapter_model", "pytorch_model"))
    return "/".join(parts[-2:]) if len(parts) > 1 and generic else parts[-1]


def _vlabel(v: dict[str, Any]) -> str:
    """A short legend label: ``capability = A − S`` or the path's last component."""
    if v.get("formula"):
        kind = v["label"].split(" (")[0]
        return f"{kind} = {_short(v['formula']['plus'])} − {_short(v['formula']['minus'])}"
    return _short(v["label"])


def plot(result: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Write a PNG: per-layer L2 norm bars of every vector and, with a comparison, the per-layer cosine curve."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    vectors = result.get("vectors")
    if not vectors:
        raise UsageError("nothing to plot (--headers-only reads no tensor data)")
    comps = result.get("comparisons", [])
    # Per layer when the model has blocks; per module otherwise (e.g. a vector of a model without layers).
    group = "layers" if any(r["name"] != "other" for r in vectors[0]["layers"]) else "modules"
    names: list[str] = []
    for v in vectors:
        for r in v[group]:
            if r["name"] not in names:
                names.append(r["name"])
    if group == "layers":
        names.sort(key=_layer_sort_key)
    import numpy as np

    x = np.arange(len(names))
    n_rows = 2 if comps else 1
    width = max(7.0, min(20.0, 0.28 * len(names) + 3))
    fig, axes = plt.subplots(n_rows, 1, figsize=(width, 3.6 * n_rows + 0.8), sharex=True, squeeze=False)
    ax = axes[0][0]
    bw = 0.8 / len(vectors)
    for i, v in enumerate(vectors):
        by_name = {r["name"]: r["l2"] for r in v[group]}
        ax.bar(x - 0.4 + bw * (i + 0.5), [by_name.get(n, 0.0) for n in names], bw, label=_vlabel(v))
    ax.set_ylabel("L2 norm")
    ax.set_title("per-layer norm" if group == "layers" else "per-module norm", fontsize=10)
    ax.legend(fontsize=8, loc="best")
    ax.grid(axis="y", alpha=0.3)
    if comps:
        ax2 = axes[1][0]
        for c in comps:
            by_name = {r["name"]: r["cos"] for r in c[group]}
            ys = np.array([np.nan if by_name.get(n) is None else by_name[n] for n in names], dtype=float)
            total = c["total"]["cos"]
            label = "cos(a, b)" + (f", total {total:+.3f}" if total is not None else "")
            # The curve joins blocks only; tensors outside blocks ('other') get a marker of their own.
            blocks = np.array([n.isdigit() for n in names]) if group == "layers" else np.ones(len(names), bool)
            line = ax2.plot(x[blocks], ys[blocks], marker="o", ms=4, label=label)[0]
            if (~blocks).any():
                ax2.plot(x[~blocks], ys[~blocks], marker="s", ms=6, ls="none", color=line.get_color())
        ax2.axhline(0.0, color="gray", lw=0.8)
        ax2.set_ylabel("cosine similarity")
        lo = min([-0.1] + [r["cos"] for c in comps for r in c[group] if r["cos"] is not None])
        hi = max([0.1] + [r["cos"] for c in comps for r in c[group] if r["cos"] is not None])
        pad = 0.1 * (hi - lo)
        ax2.set_ylim(max(-1.05, lo - pad), min(1.05, hi + pad))
        labels = {v["label"]: _vlabel(v) for v in vectors}
        c0 = comps[0]
        ax2.set_title(f"per-layer cosine: a = {labels[c0['a']]}, b = {labels[c0['b']]}", fontsize=9)
        ax2.legend(fontsize=8, loc="best")
        ax2.grid(alpha=0.3)
    bottom = axes[-1][0]
    bottom.set_xticks(x)
    bottom.set_xticklabels(names, rotation=90 if group == "modules" or len(names) > 40 else 0, fontsize=8)
    bottom.set_xlabel("layer (block index; 'other' = embeddings, norms, heads)" if group == "layers" else "module")
    title = "capmerge inspect: " + "  vs  ".join(_vlabel(v) for v in vectors)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    from capmerge.io.writer import replace_atomically

    try:
        fmt = os.path.splitext(os.fspath(path))[1][1:].lower() or "png"  # the temporary name has no extension
        replace_atomically(path, lambda tmp: fig.savefig(tmp, dpi=110, format=fmt))
    finally:
        plt.close(fig)
