"""Pairing tensor names across checkpoints: ``--rename`` rules, wrapper prefixes, tied weights.

Every command that pairs tensors of several checkpoints (``diff``, ``apply``) calls :func:`normalise` once, before
matching; the checkpoints it returns are renamed *views* (no data read), so the rest of the code pairs names by
plain equality.

1. ``--rename 'REGEX=REPLACEMENT'`` rules (``re.sub``, in order) rename every input.
2. Names of one side with no partner on the other are matched through their wrapper prefixes (``module.`` of DDP,
   ``_orig_mod.`` of ``torch.compile``, ``base_model.model.`` of PEFT, ``model.``) when that pairing is one to one;
   the side with the shorter names gives the names (in ``apply``: always the BASE). Each change is reported.
3. Tied heads (``tie_word_embeddings``: a model directory whose config ties its head to its input embedding saves
   no ``lm_head.weight``): where another input has the head, the model's embedding stands in for it (a view), as
   transformers reads such a model; reported. Only inputs that are models take part (``models``): a vector that
   lacks the head changes nothing there.
4. Tied weights (a pickle whose ``lm_head.weight`` shares ``embed_tokens.weight``'s storage): the alias is dropped
   when no other input holds it as a separate tensor, so the tensor is written once; the tie is reported.

The same rules pair a vector's names with a live model's parameters (:mod:`capmerge.ortho`): :func:`canonical_name`
removes what wrappers put into parameter names, :func:`pair_names` is step 2 (there with the model's own
base-model prefix, e.g. ``bert.``, added to :data:`WRAPPER_PREFIXES`), :func:`renamer` step 1 for the library.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence

from capmerge.errors import MismatchError, UsageError
from capmerge.io.checkpoint import Checkpoint, TensorInfo, read_json_file

# Prefixes a wrapper puts in front of every parameter name: DDP, torch.compile, PEFT.
MODEL_WRAPPERS = ("module.", "_orig_mod.", "base_model.model.")
# ... and ``model.``, the base model of transformers' causal LMs (``LlamaForCausalLM.model``).
WRAPPER_PREFIXES = (*MODEL_WRAPPERS, "model.")
# Containers that wrappers insert inside names (FSDP1, activation checkpointing, torch.compile of a submodule, PEFT's
# wrapped target layer).
INNER_WRAPPERS = frozenset({"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module", "base_layer"})
# A language model's head and its input embedding (after any prefix), as transformers ties them.
OUTPUT_EMBEDDINGS = ("lm_head.weight", "embed_out.weight")
INPUT_EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight", "shared.weight")
Renames = list[tuple[re.Pattern[str], str]]
Rename = str | Sequence[str] | Mapping[str, str] | Callable[[str], str] | None
"""A library ``rename=``: ``'REGEX=REPLACEMENT'`` rule(s) as ``--rename``, a mapping regex → replacement (applied in
order with ``re.sub``, like transformers' ``key_mapping``), or a callable name → new name."""


def canonical_name(name: str) -> str:
    """A parameter (or tensor) name without the components wrappers add, so that wrapped and plain names compare equal.

    ``module.`` (DDP), ``_orig_mod.`` (torch.compile) and ``base_model.model.`` (PEFT) are stripped from the front,
    ``_orig_mod``, ``_fsdp_wrapped_module``, ``_checkpoint_wrapped_module`` and PEFT's ``base_layer`` anywhere, and
    PEFT's trainable copy ``X.modules_to_save.<adapter>.weight`` stands for ``X.weight``. (``model.`` stays: it is
    a real module of causal LMs; :func:`pair_names` pairs through it.)

    >>> canonical_name("module.base_model.model.encoder.layer.0.attention.self.query.base_layer.weight")
    'encoder.layer.0.attention.self.query.weight'
    """
    parts = name.split(".")
    stripped = True
    while stripped:
        stripped = False
        for lead in MODEL_WRAPPERS:
            n = lead.count(".")
            if len(parts) > n and ".".join(parts[:n]) + "." == lead:
                parts, stripped = parts[n:], True
    parts = [p for p in parts if p not in INNER_WRAPPERS]
    if "modules_to_save" in parts:
        i = parts.index("modules_to_save")
        if i + 2 < len(parts):
            parts = parts[:i] + parts[i + 2 :]
    return ".".join(parts)


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


def renamer(rename: Rename) -> Callable[[str], str] | None:
    """The function a :data:`Rename` stands for (``None`` for ``None`` or an empty one).

    Raises:
        UsageError: An invalid rule or regex, or something that is not a :data:`Rename`.
    """
    if rename is None:
        return None
    if callable(rename):
        return rename
    if isinstance(rename, Mapping):
        rules: Renames = []
        for pattern, repl in rename.items():
            if not isinstance(pattern, str) or not isinstance(repl, str):
                raise UsageError(f"rename= maps regexes to replacements (strings), not {pattern!r}: {repl!r}")
            try:
                compiled = re.compile(pattern)
                compiled.sub(repl, "")  # validates group references
            except re.error as e:
                raise UsageError(f"invalid rename= regex {pattern!r} → {repl!r}: {e}") from None
            rules.append((compiled, repl))
    elif isinstance(rename, str) or (isinstance(rename, Sequence) and all(isinstance(r, str) for r in rename)):
        rules = parse_renames(rename)
    else:
        raise UsageError(
            f"rename= must be 'REGEX=REPLACEMENT' rules, a mapping or a callable, not {type(rename).__name__}"
        )
    return (lambda name: _apply_rules(rules, name)) if rules else None


def _apply_rules(rules: Renames, name: str) -> str:
    for pattern, repl in rules:
        name = pattern.sub(repl, name)
    return name


def rename_names(names: Iterable[str], rename: Rename) -> dict[str, str]:
    """name → renamed name for every name (itself without a rule).

    Raises:
        MismatchError: Two names renamed to one. UsageError: A bad :data:`Rename`, a callable returning a non-string.
    """
    fn = renamer(rename)
    out: dict[str, str] = {}
    origin: dict[str, str] = {}
    for name in names:
        new = name if fn is None else fn(name)
        if not isinstance(new, str) or not new:
            raise UsageError(f"rename= gave {new!r} for {name!r} (it must return a non-empty name)")
        if new in origin:
            raise MismatchError(f"rename= maps {origin[new]} and {name} to the same name {new}")
        out[name], origin[new] = new, name
    return out


def apply_renames(ck: Checkpoint, rules: Renames) -> Checkpoint:
    if not rules:
        return ck
    mapping = {n: new for n in ck.tensors if (new := _apply_rules(rules, n)) != n}
    return _rename(ck, mapping, "--rename")


def strip_wrappers(name: str, prefixes: Sequence[str] = WRAPPER_PREFIXES) -> tuple[str, str]:
    """(name without leading wrapper prefixes, the prefixes removed)."""
    removed = ""
    changed = True
    while changed:
        changed = False
        for p in prefixes:
            if name.startswith(p) and len(name) > len(p):
                name, removed, changed = name[len(p) :], removed + p, True
                break
    return name, removed


def pair_names(
    ref: Iterable[str], other: Iterable[str], *, prefixes: Sequence[str] = WRAPPER_PREFIXES
) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Pair the names of ``other`` that have no equal name in ``ref`` through their wrapper prefixes.

    Two names pair when they are equal once leading ``prefixes`` are stripped (any number, any order) and no other
    unpaired name of either side strips to the same.

    Returns:
        other name → ref name for the pairs, and other name → its candidates in ``ref`` (sorted) where the pairing
        is not one to one (several ref names, or several other names, strip to the same name).
    """
    ref_l, other_l = list(ref), list(other)
    ref_set, other_set = set(ref_l), set(other_l)
    by_canon_r: dict[str, list[str]] = {}
    for n in ref_l:
        if n not in other_set:
            by_canon_r.setdefault(strip_wrappers(n, prefixes)[0], []).append(n)
    by_canon_o: dict[str, list[str]] = {}
    for n in other_l:
        if n not in ref_set:
            by_canon_o.setdefault(strip_wrappers(n, prefixes)[0], []).append(n)
    pairs: dict[str, str] = {}
    ambiguous: dict[str, list[str]] = {}
    for c, os in by_canon_o.items():
        rs = by_canon_r.get(c, [])
        if len(os) == 1 and len(rs) == 1:
            pairs[os[0]] = rs[0]
        elif rs:
            ambiguous.update({o: sorted(rs) for o in os})
    return pairs, ambiguous


def _prefix_map(ref: Iterable[str], other: Iterable[str]) -> dict[str, str]:
    """other name → ref name for names of ``other`` without a partner that pair one to one through prefixes."""
    return pair_names(ref, other)[0]


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
    models: Sequence[bool] | None = None,
) -> tuple[Checkpoint, list[Checkpoint], list[str], dict[str, str]]:
    """Renamed views of ``ref`` and ``others`` whose names pair by equality, the notes to report, and the ties.

    ``labels`` names the inputs in notes (``ref`` first). With ``symmetric`` (diff: two inputs) the side whose
    unmatched names carry the shorter wrapper prefixes gives the names; otherwise ``ref`` always does. ``models``
    (``ref`` first): which inputs are models whose tied head their embedding stands in for (none by default).
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
    if models:
        ref, aligned = _tie_heads([ref, *aligned], labels, models, notes)
    ref, aligned, tie_notes, ties = _drop_tied([ref, *aligned], labels)
    return ref, aligned, notes + tie_notes, ties


def ends_with(name: str, tails: tuple[str, ...]) -> bool:
    """Whether ``name`` is one of ``tails`` or ends with ``.`` and one of them."""
    return any(name == t or name.endswith("." + t) for t in tails)


def tied_embedding(ck: Checkpoint, config: Mapping[str, object] | None) -> str | None:
    """The input embedding that a model without its head ties to it (transformers' ``tie_word_embeddings``: the head
    is the embedding matrix, not saved): its one tensor outside the layers named like an input embedding; None where
    ``config`` (its config.json, or its ``text_config``) unties them or there is no single such tensor."""
    from capmerge.merge.masks import layer_index

    config = config or {}
    text = config.get("text_config")
    if config.get("tie_word_embeddings", text.get("tie_word_embeddings") if isinstance(text, dict) else None) is False:
        return None
    found = [n for n in ck.tensors if layer_index(n) is None and ends_with(n, INPUT_EMBEDDINGS)]
    return found[0] if len(found) == 1 else None


def _tie_heads(cks: list[Checkpoint], labels: Sequence[str], models: Sequence[bool],
               notes: list[str]) -> tuple[Checkpoint, list[Checkpoint]]:  # fmt: skip
    """Step 3 of the module: a model directory (its config.json read) that lacks a head another input has, and ties
    it, gets its embedding under the head's name; each such pairing is noted."""
    from capmerge.merge.masks import layer_index

    owner: dict[str, str] = {}  # head -> the first input that has it of its own
    for label, ck in zip(labels, cks, strict=False):
        for n in ck.tensors:
            if ends_with(n, OUTPUT_EMBEDDINGS) and layer_index(n) is None:
                owner.setdefault(n, label)
    heads = list(owner)
    for i, ck in enumerate(cks):
        wanted = [h for h in heads if h not in ck.tensors]
        config = _model_config(ck) if wanted and i < len(models) and models[i] else None
        embedding = tied_embedding(ck, config) if config is not None else None
        if embedding is None:
            continue
        view = ck.renamed({**ck.tensors, **dict.fromkeys(wanted, ck.tensors[embedding])})
        view.tied = getattr(ck, "tied", None)  # type: ignore[attr-defined]
        view.heads_untied = wanted  # type: ignore[attr-defined]  # the output writes them: its config unties them
        for h in wanted:
            notes.append(f"tied: {labels[i]} ties {h} to {embedding} (tie_word_embeddings), {owner[h]} has its own: "
                         f"{labels[i]}'s {embedding} stands in for it")  # fmt: skip
        cks[i] = view
    return cks[0], cks[1:]


def _model_config(ck: Checkpoint) -> Mapping[str, object] | None:
    """The config.json of a model directory (None where ``ck`` is no directory or has none)."""
    from pathlib import Path

    path = Path(ck.root) / "config.json" if getattr(ck, "root", None) else None
    if path is None or not path.is_file():
        return None
    config = read_json_file(path, "config.json")
    return config if isinstance(config, dict) else {}


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
