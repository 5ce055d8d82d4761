"""Which tensors a merge touches, and with what α: include/exclude regexes, layer ranges, per-layer schedules.

Pure Python (no torch) so that option parsing and ``--dry-run`` listings cost nothing at start-up.

* ``--include`` / ``--exclude`` take regexes matched anywhere in a tensor name (:func:`re.search`).
* ``--layers 0-7,12`` selects transformer blocks by index; :func:`layer_index` finds a tensor's block from its
  name (``model.layers.12.mlp.up_proj.weight`` → 12) or from ``--layer-pattern REGEX`` (first capture group).
* ``--gradient 1.0,0.5,0.0`` spreads α over the blocks like mergekit's gradients (:func:`alpha_for`).
* Sweep outputs name each run with ``{alpha}`` / ``{density}`` placeholders (:func:`expand_template`).

Every bad input raises :class:`capmerge.errors.UsageError`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from capmerge.errors import CheckpointError, UsageError

__all__ = [
    "BLOCK_CONTAINERS",
    "PLACEHOLDERS",
    "PatternLike",
    "TensorMask",
    "alpha_for",
    "check_template",
    "count_layers",
    "expand_template",
    "format_number",
    "layer_index",
    "parse_float_list",
    "parse_layers",
]

BLOCK_CONTAINERS = frozenset({"layers", "h", "blocks", "block", "layer"})
"""Name components whose next component is a block index (Llama/Mistral, GPT-2, ViT/timm, T5, BERT)."""

PLACEHOLDERS = ("alpha", "density")
"""The placeholders an output template may hold."""

# A range like 0-999999999 would build a huge set; no real model has anywhere near this many blocks.
_MAX_BLOCK = 99_999
_LAYER_ITEM = re.compile(r"\s*([0-9]+)\s*(?:-\s*([0-9]+)\s*)?")
_DIGITS = re.compile(r"[0-9]+")
_INDEX_DIGITS = 18  # a block index in a tensor name fits in 64 bits
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")

PatternLike = str | re.Pattern[str]


def parse_float_list(text: str, what: str) -> list[float]:
    """Parse comma-separated numbers such as ``"0.6, 0.4"``.

    Args:
        text: The option value.
        what: The option it came from, as the user typed it (``"--weights"``); error messages name it.

    Returns:
        The numbers, in order.

    Raises:
        UsageError: On an empty item, a non-number, or a NaN/infinite value.
    """
    values: list[float] = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            raise UsageError(f"invalid {what} {text!r} (empty item; expected numbers separated by commas)")
        try:
            value = float(item)
        except ValueError:
            raise UsageError(f"invalid {what} value {item!r} (expected numbers separated by commas)") from None
        if not math.isfinite(value):
            raise UsageError(f"invalid {what} value {item!r} (expected finite numbers)")
        values.append(value)
    return values


def parse_layers(spec: str) -> frozenset[int]:
    """Parse a ``--layers`` value: block indices and inclusive ranges, e.g. ``"0-7,12"``.

    Args:
        spec: The option value; spaces around items and dashes are tolerated.

    Returns:
        The selected block indices.

    Raises:
        UsageError: On bad syntax (``"a"``, ``"1-"``, ``"-1"``, ``"1,,2"``, ``""``), a backwards range
            (``"7-3"``) or an index above 99999.
    """
    layers: set[int] = set()
    for item in spec.split(","):
        m = _LAYER_ITEM.fullmatch(item)
        if m is None:
            raise UsageError(f"invalid --layers {spec!r} (expected block indices and ranges such as 0-7,12)")
        if max(len(g.lstrip("0")) for g in m.groups() if g is not None) > len(str(_MAX_BLOCK)):
            raise UsageError(f"invalid --layers {spec!r} (block indices stop at {_MAX_BLOCK})")
        first = int(m.group(1))
        last = int(m.group(2)) if m.group(2) is not None else first
        if last < first:
            raise UsageError(f"invalid --layers {spec!r} (range {first}-{last} runs backwards)")
        if last > _MAX_BLOCK:
            raise UsageError(f"invalid --layers {spec!r} (block indices stop at {_MAX_BLOCK})")
        layers.update(range(first, last + 1))
    return frozenset(layers)


def _compile(pattern: PatternLike, option: str) -> re.Pattern[str]:
    if isinstance(pattern, re.Pattern):
        return pattern
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise UsageError(f"invalid {option} regex {pattern!r} ({exc})") from None


def _layer_regex(pattern: PatternLike) -> re.Pattern[str]:
    compiled = _compile(pattern, "--layer-pattern")
    if compiled.groups < 1:
        raise UsageError(
            f"--layer-pattern {compiled.pattern!r} has no capture group (put the block index in parentheses,"
            r" e.g. layers\.(\d+)\.)"
        )
    return compiled


def layer_index(name: str, pattern: PatternLike | None = None) -> int | None:
    """The transformer block a tensor belongs to, from its name.

    Without ``pattern``: the first integer component that directly follows a component named ``layers``,
    ``h``, ``blocks``, ``block`` or ``layer`` (``transformer.h.3.attn.c_attn.weight`` → 3). With several
    containers (``model.vision.blocks.3.layers.7.w``) the first one wins (→ 3).

    Args:
        name: A tensor name.
        pattern: A ``--layer-pattern`` regex; when given, ``re.search(pattern, name)`` decides and its first
            capture group is the block index.

    Returns:
        The block index, or ``None`` for tensors outside any block (embeddings, final norm, heads). With a
        pattern, ``None`` also when it does not match or its first group did not take part in the match.

    Raises:
        UsageError: If ``pattern`` is not a valid regex, has no capture group, or captures something that is
            not a non-negative integer (the error names the tensor).
    """
    if pattern is not None:
        regex = _layer_regex(pattern)
        m = regex.search(name)
        if m is None:
            return None
        group = m.group(1)
        if group is None:
            return None
        if not _DIGITS.fullmatch(group):
            raise UsageError(f"--layer-pattern {regex.pattern!r} captured {group!r}, not a block index", name)
        return _block_index(group, name)
    parts = name.split(".")
    for container, index in zip(parts, parts[1:], strict=False):
        if container in BLOCK_CONTAINERS and _DIGITS.fullmatch(index):
            return _block_index(index, name)
    return None


def _block_index(digits: str, name: str) -> int:
    if len(digits.lstrip("0")) > _INDEX_DIGITS:  # int() would refuse past 4300 digits; no model has such blocks
        raise CheckpointError(f"the block index in the tensor name has {len(digits)} digits (at most {_INDEX_DIGITS})",
                              name[:200])  # fmt: skip
    return int(digits)


def count_layers(names: Iterable[str], pattern: PatternLike | None = None) -> int:
    """The number of blocks in a model: 1 + the largest block index among ``names`` (0 if none).

    Args:
        names: Tensor names.
        pattern: A ``--layer-pattern`` regex, as in :func:`layer_index`.

    Returns:
        The block count.
    """
    largest = -1
    for name in names:
        index = layer_index(name, pattern)
        if index is not None and index > largest:
            largest = index
    return largest + 1


def alpha_for(
    name: str,
    alpha: float,
    gradient: Sequence[float] | None,
    n_layers: int,
    pattern: PatternLike | None = None,
) -> float:
    """The α for one tensor under an optional per-layer gradient (mergekit-style).

    A tensor in block ``l`` of a model with ``n_layers`` blocks sits at ``t = l / (n_layers - 1)`` (0 when
    there is one block), i.e. at position ``p = t * (len(gradient) - 1)`` along the gradient, and gets the
    linear interpolation between ``gradient[floor(p)]`` and ``gradient[ceil(p)]``. Gradient ``[1.0, 0.5, 0.0]``
    over 5 blocks gives 1.0, 0.75, 0.5, 0.25, 0.0.

    Args:
        name: The tensor name.
        alpha: The α for tensors outside any block, and for every tensor when ``gradient`` is ``None``.
        gradient: The ``--gradient`` values (one value = a constant α for all blocks), or ``None``.
        n_layers: The model's block count (see :func:`count_layers`).
        pattern: A ``--layer-pattern`` regex, as in :func:`layer_index`.

    Returns:
        The α to apply to this tensor.

    Raises:
        UsageError: If ``gradient`` is empty, or the tensor's block index is not below ``n_layers``.
    """
    if gradient is None:
        return alpha
    if len(gradient) == 0:
        raise UsageError("--gradient is empty (expected one or more numbers separated by commas)")
    index = layer_index(name, pattern)
    if index is None:
        return alpha
    if index >= n_layers:
        raise UsageError(f"tensor is in block {index} but the model has {n_layers} blocks", name)
    steps = len(gradient) - 1
    if n_layers == 1 or steps == 0:
        return float(gradient[0])
    # Integer arithmetic for the position, so that e.g. block 2 of 5 lands exactly on a gradient point.
    lower, remainder = divmod(index * steps, n_layers - 1)
    if remainder == 0:
        return float(gradient[lower])
    frac = remainder / (n_layers - 1)
    a, b = float(gradient[lower]), float(gradient[lower + 1])
    return a + (b - a) * frac


@dataclass(frozen=True)
class TensorMask:
    """Which tensors an operation touches. Build it with :meth:`TensorMask.build`.

    A name is selected when (there is no include pattern or it matches one) and it matches no exclude
    pattern (exclude wins) and (``layers`` is ``None`` or its block index is in ``layers``). With ``layers``
    given, tensors outside any block (embeddings, heads) are not selected.

    Attributes:
        include: Regexes of which a name must match one (``re.search``); empty = all names.
        exclude: Regexes of which a name must match none.
        layers: Selected block indices, or ``None`` for all tensors.
        layer_pattern: The ``--layer-pattern`` regex used to find block indices, or ``None`` for the
            built-in rule of :func:`layer_index`.
    """

    include: tuple[re.Pattern[str], ...] = ()
    exclude: tuple[re.Pattern[str], ...] = ()
    layers: frozenset[int] | None = None
    layer_pattern: re.Pattern[str] | None = None

    @classmethod
    def build(
        cls,
        *,
        include: Iterable[str] | str | None = None,
        exclude: Iterable[str] | str | None = None,
        layers: str | None = None,
        layer_pattern: PatternLike | None = None,
    ) -> TensorMask:
        """Build a mask from command-line option values, validating them all up front.

        Args:
            include: ``--include`` regexes (a single string counts as one regex).
            exclude: ``--exclude`` regexes (a single string counts as one regex).
            layers: The ``--layers`` value, e.g. ``"0-7,12"``, or ``None``.
            layer_pattern: The ``--layer-pattern`` regex, or ``None``.

        Returns:
            The mask.

        Raises:
            UsageError: On an invalid regex (naming the option and the pattern), a bad ``--layers`` value,
                or a ``--layer-pattern`` without a capture group.
        """
        return cls(
            include=_compile_all(include, "--include"),
            exclude=_compile_all(exclude, "--exclude"),
            layers=parse_layers(layers) if layers is not None else None,
            layer_pattern=_layer_regex(layer_pattern) if layer_pattern is not None else None,
        )

    @property
    def is_trivial(self) -> bool:
        """True when the mask selects every tensor (no include, exclude or layers)."""
        return not self.include and not self.exclude and self.layers is None

    def selects(self, name: str) -> bool:
        """Whether the tensor ``name`` is selected.

        Raises:
            UsageError: If ``layer_pattern`` captures a non-integer in this name (only checked with ``layers``).
        """
        if self.include and not any(p.search(name) for p in self.include):
            return False
        if any(p.search(name) for p in self.exclude):
            return False
        return self.layers is None or layer_index(name, self.layer_pattern) in self.layers

    def describe(self, names: Iterable[str]) -> dict[str, Any]:
        """A dry-run listing of what the mask does to ``names``.

        Args:
            names: Tensor names, in checkpoint order.

        Returns:
            ``{"selected": [...], "not_selected": [...], "counts": {"selected": n, "not_selected": m},
            "by_layer": {block index or "other": number of selected tensors}}``; names keep their input order,
            ``by_layer`` lists blocks in ascending order, then ``"other"`` (tensors outside any block).
        """
        selected: list[str] = []
        not_selected: list[str] = []
        per_block: dict[int, int] = {}
        other = 0
        for name in names:
            if not self.selects(name):
                not_selected.append(name)
                continue
            selected.append(name)
            index = layer_index(name, self.layer_pattern)
            if index is None:
                other += 1
            else:
                per_block[index] = per_block.get(index, 0) + 1
        by_layer: dict[int | str, int] = {index: per_block[index] for index in sorted(per_block)}
        if other:
            by_layer["other"] = other
        return {
            "selected": selected,
            "not_selected": not_selected,
            "counts": {"selected": len(selected), "not_selected": len(not_selected)},
            "by_layer": by_layer,
        }


def _compile_all(patterns: Iterable[str] | str | None, option: str) -> tuple[re.Pattern[str], ...]:
    if patterns is None:
        return ()
    if isinstance(patterns, str):
        patterns = [patterns]
    return tuple(_compile(p, option) for p in patterns)


def format_number(value: float) -> str:
    """Format a swept value for a file name: at most 6 significant digits, at least one decimal.

    ``0.5`` → ``"0.5"``, ``1`` → ``"1.0"``, ``0.1 + 0.2`` → ``"0.3"``, ``1e-7`` → ``"1e-07"``.
    """
    text = f"{float(value):.6g}"
    if "." not in text and "e" not in text and text[-1].isdigit():
        text += ".0"
    return text


def expand_template(template: str, **values: float) -> str:
    """Fill an output template such as ``"out/a{alpha}_d{density}"`` with swept values.

    Args:
        template: The output path, holding ``{name}`` placeholders.
        **values: The value of each placeholder, e.g. ``alpha=0.5``; formatted with :func:`format_number`.

    Returns:
        The output path with every placeholder replaced.

    Raises:
        UsageError: If the template holds a placeholder without a value.
    """

    def fill(m: re.Match[str]) -> str:
        key = m.group(1)
        if key not in values:
            raise UsageError(f"the output {template!r} has a {{{key}}} placeholder but no --{key} value")
        return format_number(values[key])

    return _PLACEHOLDER.sub(fill, template)


def check_template(template: str, key: str, values: Sequence[float]) -> None:
    """Check that an output template can name every run of a sweep over ``--{key}``.

    Args:
        template: The output path.
        key: The swept option without dashes, e.g. ``"alpha"``.
        values: The values it takes.

    Raises:
        UsageError: If the template holds an unknown placeholder, if several values are given but the
            template has no ``{key}`` placeholder, or if two values would give the same output name.
    """
    for m in _PLACEHOLDER.finditer(template):
        if m.group(1) not in PLACEHOLDERS:
            known = ", ".join(f"{{{p}}}" for p in PLACEHOLDERS)
            raise UsageError(f"unknown placeholder {m.group(0)} in the output {template!r} (known: {known})")
    if len(values) > 1 and f"{{{key}}}" not in template:
        raise UsageError(f"--{key} lists several values: the output {template!r} needs a {{{key}}} placeholder")
    seen: dict[str, float] = {}
    for value in values:
        label = format_number(value)
        if label in seen:
            if seen[label] == value:
                raise UsageError(f"--{key} lists {label} twice")
            raise UsageError(f"--{key} values {seen[label]!r} and {value!r} give the same output name ({label})")
        seen[label] = value
