"""Pairing tensor names across checkpoints: ``--rename`` rules, wrapper prefixes, tied weights.

Every command that pairs tensors of several checkpoints (``diff``, ``apply``) calls :func:`normalise` once, before
matching; the checkpoints it returns are renamed *views* (no data read), so the rest of the code pairs names by
plain equality.

1. ``--rename 'REGEX=REPLACEMENT'`` rules (``re.sub``, in order) rename every input.
2. Names of one side with no partner on the other are matched through their wrapper prefixes (``module.`` of DDP,
   ``_orig_mod.`` of ``torch.compile``, ``base_model.model.`` of PEFT, ``model.``) when that pairing is one to one;
   the side with the shorter names gives the names (in ``apply``: always the BASE). Each change is reported.
3. Tied weights (a pickle whose ``lm_head.weight`` shares ``embed_tokens.weight``'s storage): the alias is dropped
   when no other input holds it as a separate tensor, so the tensor is written once; the tie is reported.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence

from capmerge.errors import MismatchError, UsageError
from capmerge.io.checkpoint import Checkpoint, TensorInfo

WRAPPER_PREFIXES = ("module.", "_orig_mod.", "base_model.model.", "model.")
Renames = list[tuple[re.Pattern[str], str]]


def parse_renames(specs: Iterable[str] | str | None) -> Renames:
    """``REGEX=REPLACEMENT`` → (compiled regex, replacement); the first ``=`` splits (``\\=`` keeps one in REGEX)."""
    if specs is None:
        return []
    if isinstance(specs, str):
        specs = [specs]
    rules: Renames = []
    for spec in specs:
        m = re.fullmatch(r"((?:\\.|[^\\=])*)=(.*)", spec, flags=re.DOTALL)
        if m is None or not m.group(1):
            raise UsageError(f"invalid --rename {spec!r} (expected 'REGEX=REPLACEMENT')")
        try:
            pattern = re.compile(m.group(1).replace(r"\=", "="))
            pattern.sub(m.group(2), "")  # validates group references
        except re.error as e:
            raise UsageError(f"invalid --rename {spec!r}: {e}") from None
        rules.append((pattern, m.group(2)))
    return rules


def _rename(ck: Checkpoint, mapping: dict[str, str], what: str) -> Checkpoint:
    """``ck`` with tensor ``n`` renamed to ``mapping.get(n, n)``; refuses two tensors landing on one name."""
    if not mapping:
        return ck
    out: dict[str, TensorInfo] = {}
    origin: dict[str, str] = {}
    for n, info in ck.tensors.items():
        new = mapping.get(n, n)
        if new in out:
            raise MismatchError(f"{what} maps {origin[new]} and {n} to the same name {new}", ck.ref)
        out[new], origin[new] = info, n
    view = ck.renamed(out)
    tied = getattr(ck, "tied", None)
    if tied:
        view.tied = {mapping.get(a, a): mapping.get(t, t) for a, t in tied.items()}  # type: ignore[attr-defined]
    return view


def apply_renames(ck: Checkpoint, rules: Renames) -> Checkpoint:
    if not rules:
        return ck
    mapping = {}
    for n in ck.tensors:
        new = n
        for pattern, repl in rules:
            new = pattern.sub(repl, new)
        if new != n:
            mapping[n] = new
    return _rename(ck, mapping, "--rename")


def strip_wrappers(name: str) -> tuple[str, str]:
    """(name without leading wrapper prefixes, the prefixes removed)."""
    removed = ""
    changed = True
    while changed:
        changed = False
        for p in WRAPPER_PREFIXES:
            if name.startswith(p) and len(name) > len(p):
                name, removed, changed = name[len(p) :], removed + p, True
                break
    return name, removed


def _prefix_map(ref: Iterable[str], other: Iterable[str]) -> dict[str, str]:
    """other name → ref name for names of ``other`` without a partner that pair one to one through prefixes."""
    ref_set, other_l = set(ref), list(other)
    other_set = set(other_l)
    by_canon_r: dict[str, list[str]] = {}
    for n in ref_set - other_set:
        by_canon_r.setdefault(strip_wrappers(n)[0], []).append(n)
    by_canon_o: dict[str, list[str]] = {}
    for n in other_l:
        if n not in ref_set:
            by_canon_o.setdefault(strip_wrappers(n)[0], []).append(n)
    return {os[0]: by_canon_r[c][0] for c, os in by_canon_o.items() if len(os) == 1 and len(by_canon_r.get(c, [])) == 1}


def _describe(mapping: dict[str, str], label_from: str, label_to: str) -> list[str]:
    groups: dict[tuple[str, str], int] = {}
    for src, dst in mapping.items():
        key = (strip_wrappers(src)[1], strip_wrappers(dst)[1])
        groups[key] = groups.get(key, 0) + 1
    return [
        f"names: {label_from} prefix {a or '(none)'!r} matched to {label_to} prefix {b or '(none)'!r} ({k} tensors)"
        for (a, b), k in sorted(groups.items())
    ]


def normalise(
    ref: Checkpoint,
    others: Sequence[Checkpoint],
    *,
    rename: Iterable[str] | str | None = None,
    labels: Sequence[str] | None = None,
    symmetric: bool = False,
) -> tuple[Checkpoint, list[Checkpoint], list[str], dict[str, str]]:
    """Renamed views of ``ref`` and ``others`` whose names pair by equality, the notes to report, and the ties.

    ``labels`` names the inputs in notes (``ref`` first). With ``symmetric`` (diff: two inputs) the side whose
    unmatched names carry the shorter wrapper prefixes gives the names; otherwise ``ref`` always does.
    """
    labels = list(labels) if labels else ["BASE"] + [o.ref for o in others]
    rules = parse_renames(rename)
    ref = apply_renames(ref, rules)
    others = [apply_renames(o, rules) for o in others]
    notes: list[str] = []
    aligned: list[Checkpoint] = []
    for i, o in enumerate(others):
        fwd = _prefix_map(ref.tensors, o.tensors)
        if symmetric and fwd:
            back = _prefix_map(o.tensors, ref.tensors)
            wrapped = sum(len(strip_wrappers(n)[1]) for n in back.values())  # the names each choice gives
            if back and wrapped < sum(len(strip_wrappers(n)[1]) for n in fwd.values()):
                notes += _describe(back, labels[0], labels[i + 1])
                ref = _rename(ref, back, "prefix normalisation")
                aligned.append(o)
                continue
        notes += _describe(fwd, labels[i + 1], labels[0])
        aligned.append(_rename(o, fwd, "prefix normalisation"))
    ref, aligned, tie_notes, ties = _drop_tied([ref, *aligned], labels)
    return ref, aligned, notes + tie_notes, ties


def _drop_tied(
    cks: list[Checkpoint], labels: Sequence[str]
) -> tuple[Checkpoint, list[Checkpoint], list[str], dict[str, str]]:
    """Drop alias names that every input either ties to the same tensor or lacks (written once, reported)."""
    notes: list[str] = []
    ties: dict[str, str] = {}
    for i, ck in enumerate(cks):
        for alias, target in (getattr(ck, "tied", None) or {}).items():
            if alias in ties or alias not in ck.tensors or target not in ck.tensors:
                continue
            separate = [j for j, o in enumerate(cks) if j != i and alias in o.tensors
                        and (getattr(o, "tied", None) or {}).get(alias) != target]  # fmt: skip
            if separate:
                notes.append(f"tied: {alias} shares {target} in {labels[i]} but is a separate tensor in "
                             f"{labels[separate[0]]}; both are kept")  # fmt: skip
                continue
            ties[alias] = target
            notes.append(f"tied: {alias} shares the storage of {target} in {labels[i]}; written once, as {target}")
    if ties:
        cks = [ck.renamed({n: t for n, t in ck.tensors.items() if n not in ties}) for ck in cks]
    return cks[0], cks[1:], notes, ties


def _compile(patterns: Iterable[str] | str | None, what: str) -> list[re.Pattern[str]]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise UsageError(f"invalid {what} regex {p!r}: {e}") from None
    return out


def name_filter(include: Iterable[str] | str | None, exclude: Iterable[str] | str | None) -> Callable[[str], bool]:
    """``re.search`` semantics: a name enters when it matches any include (or there is none) and no exclude."""
    inc, exc = _compile(include, "--include"), _compile(exclude, "--exclude")
    return lambda n: (not inc or any(p.search(n) for p in inc)) and not any(p.search(n) for p in exc)


def name_mismatch(a: list[str], a_label: str, b: list[str], b_label: str) -> str:
    parts = []
    for names, label in ((a, a_label), (b, b_label)):
        if names:
            shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
            parts.append(f"{len(names)} only in {label} ({shown})")
    return "tensor names differ: " + "; ".join(parts)
