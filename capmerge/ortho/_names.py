"""Pairing a checkpoint's tensor names (a vector, a reference) with a live model's parameters.

The rules are those of the checkpoint readers (:mod:`capmerge.io.names`): ``rename=`` first, then equal names, then
names equal up to wrapper prefixes (``module.``, ``_orig_mod.``, ``base_model.model.``, ``model.``) — here with the
model's own base-model prefixes added (``bert.`` of ``BertForSequenceClassification``, ``transformer.`` of
``GPT2LMHeadModel``: what transformers strips or adds when it loads a base checkpoint into a head model). A name that
could be two parameters is an error, never a guess. Errors suggest a ``rename=`` rule where one would pair the names.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from torch import nn

from capmerge.errors import MismatchError
from capmerge.io.names import WRAPPER_PREFIXES, Rename, canonical_name, pair_names, rename_names

__all__ = ["Attached", "attach", "model_prefixes", "raise_ambiguous", "raise_unmatched"]

_SHOWN = 10


def _shown(names: Sequence[str]) -> str:
    return ", ".join(names[:_SHOWN]) + (f", ... ({len(names) - _SHOWN} more)" if len(names) > _SHOWN else "")


def model_prefixes(model: nn.Module) -> tuple[str, ...]:
    """:data:`~capmerge.io.names.WRAPPER_PREFIXES` and the ``base_model_prefix`` of every transformers model inside
    ``model`` (``"bert."`` ...), in that order."""
    found = list(WRAPPER_PREFIXES)
    for module in model.modules():
        prefix = getattr(module, "base_model_prefix", None)
        if isinstance(prefix, str) and prefix and f"{prefix}." not in found:
            found.append(f"{prefix}.")
    return tuple(found)


@dataclass
class Attached:
    """The outcome of pairing one checkpoint's names with a model's parameter keys (canonical parameter names).

    ``names``: model key → the checkpoint's original tensor name; ``source``: model key → the checkpoint's canonical
    name (what masks and messages use); ``unmatched``: canonical names with no key; ``ambiguous``: canonical name →
    the keys it could be; ``plain``: canonical name → original name, for every selected tensor.
    """

    names: dict[str, str] = field(default_factory=dict)
    source: dict[str, str] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)
    ambiguous: dict[str, list[str]] = field(default_factory=dict)
    plain: dict[str, str] = field(default_factory=dict)


def attach(names: Iterable[str], keys: Sequence[str], *, prefixes: Sequence[str], rename: Rename,
           select: Callable[[str], bool] | None = None, what: str = "vector") -> Attached:  # fmt: skip
    """Pair tensor names with the model's keys: ``rename=``, then canonical names (:func:`canonical_name`) that are
    equal, then :func:`~capmerge.io.names.pair_names` with ``prefixes``. Only names whose canonical form ``select``
    accepts (the masks) take part.

    Raises:
        MismatchError: Two names that stand for one parameter (after ``rename=``).
        UsageError: A bad ``rename=``.
    """
    out = Attached()
    chosen = [n for n in names if select is None or select(canonical_name(n))]
    renamed = rename_names(chosen, rename)
    by_canon: dict[str, str] = {}  # canonical renamed name → original
    for original, new in renamed.items():
        canon = canonical_name(new)
        if canon in by_canon:
            raise MismatchError(f"the {what} names {by_canon[canon]!r} and {original!r} stand for one parameter")
        by_canon[canon] = original
        out.plain[canonical_name(original)] = original
    source = {orig: canonical_name(orig) for orig in renamed}
    key_set = set(keys)
    rest = [c for c in by_canon if c not in key_set]
    pairs, ambiguous = pair_names(keys, rest, prefixes=prefixes)
    for canon, original in by_canon.items():
        key = canon if canon in key_set else pairs.get(canon)
        if key is not None:
            out.names[key] = original
            out.source[key] = source[original]
        elif canon in ambiguous:
            out.ambiguous[source[original]] = ambiguous[canon]
        else:
            out.unmatched.append(source[original])
    return out


def _prefix_rule(prefix: str, to_rename: Sequence[str], others: Iterable[str]) -> dict[str, str] | None:
    """A ``rename=`` mapping that puts ``prefix`` in front of ``to_rename`` and leaves ``others`` alone."""
    others = list(others)
    if not others:
        return {"^": prefix}
    heads = sorted({n.split(".")[0] for n in to_rename})
    if any(n.split(".")[0] in heads for n in others):
        return None
    return {f"^(?=(?:{'|'.join(re.escape(h) for h in heads)})(?:\\.|$))": prefix}


def _suggest(unmatched: Sequence[str], keys: Iterable[str], others: Iterable[str]) -> tuple[list[str], str]:
    """(the prefixes that would pair the most unmatched names, a ``rename=`` hint for the first of them or '')."""
    wanted = set(unmatched)
    counts: Counter[str] = Counter()
    for key in keys:
        parts = key.split(".")
        for i in range(1, len(parts)):
            if ".".join(parts[i:]) in wanted:
                counts[".".join(parts[:i]) + "."] += 1
    if not counts:
        return [], ""
    best = max(counts.values())
    tops = sorted(p for p, c in counts.items() if c == best)
    if best < len(wanted):
        return tops, ""
    rule = _prefix_rule(tops[0], unmatched, others)
    return tops, f"rename={rule!r}" if rule else ""


def raise_unmatched(missing: Sequence[str], paired: Sequence[str], keys: Sequence[str], *, plain: bool,
                    partial_ok: bool) -> None:  # fmt: skip
    """Raise the error for the selected names ``missing`` that match no parameter (unless ``partial_ok`` and some
    names, ``paired``, did match). ``plain``: the names are as in the file (no ``rename=``, no wrappers), so a
    ``rename=`` rule can be suggested. Each hint in these messages works when followed (tests/test_ortho_names.py
    follows every one).
    """
    if not missing or (paired and partial_ok):
        return
    tops, rule = _suggest(missing, keys, paired) if plain else ([], "")
    if paired:
        hint = "pass ignore_unmatched=True to skip them, or rename= to map their names to the model's"
        if rule:
            hint += f" (e.g. {rule})"
        raise MismatchError(
            f"{len(missing)} vector tensors match no parameter of the model: {_shown(missing)} ({hint})"
        )
    where = f" (vector: {_shown(missing[:3])}; model: {_shown(list(keys)[:3])})"
    if rule and len(tops) > 1:
        hint = f"the vector fits under several submodules ({', '.join(tops)}): choose one with rename=, e.g. {rule}"
    elif rule:
        hint = f"pass {rule} to map the vector's names to the model's"
    else:
        hint = "pass rename= (regex → replacement mapping, or a callable) to map the vector's names to the model's"
    raise MismatchError(f"none of the {len(missing)} vector tensors matches a parameter of the model{where}: {hint}")


def raise_ambiguous(att: Attached, selected: Sequence[str], *, renamed: bool) -> None:
    """Raise the error for names of ``selected`` that could be several parameters."""
    amb = [n for n in selected if n in att.ambiguous]
    if not amb:
        return
    first = amb[0]
    cands = att.ambiguous[first]
    if len(cands) == 1:  # several vector tensors, one parameter
        same = [n for n in amb if att.ambiguous[n] == cands]
        raise MismatchError(
            f"the vector tensors {', '.join(same)} all pair with the model's parameter {cands[0]}: keep one "
            "(exclude= the others)"
        )
    rule = None
    plain = all(att.plain.get(n) == n for n in amb) and not renamed
    prefixes = [k[: -len(first)] for k in cands if k.endswith("." + first)]
    for prefix in prefixes if plain else []:
        if all(prefix + n in set(att.ambiguous[n]) for n in amb):
            rule = _prefix_rule(prefix, amb, [n for n in selected if n not in set(amb)])
            break
    hint = f"choose with rename=, e.g. rename={rule!r}" if rule else "choose with rename="
    more = f" ({len(amb) - 1} more such tensors)" if len(amb) > 1 else ""
    raise MismatchError(
        f"vector tensor {first} could be any of the model's parameters {', '.join(cands)}{more}: {hint}"
    )
