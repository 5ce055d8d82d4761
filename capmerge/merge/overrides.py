"""Per-tensor merge parameters: overrides selected by a regex on the tensor name, with per-layer gradients.

An override is a regex filter (``re.search`` on the base tensor name) and merge parameters for the tensors it
matches:

* ``alpha``: the scale α; a list is a gradient, interpolated linearly over the block index like ``--alpha-gradient``
  (``alpha_gradient`` is the same thing spelled out);
* ``weight`` (alias ``weights``): one weight for every vector, or one per vector;
* ``density``: one density for every vector, or one per vector, each in (0, 1];
* ``density_gradient``: one density for every vector, interpolated over the block index;
* ``gamma``: the breadcrumbs outlier fraction, in [0, 1).

**First match per parameter** (as mergekit resolves its ``filter`` lists): for each tensor and each parameter, the
first override in order whose filter matches the tensor *and* that sets the parameter decides it; parameters no
override sets keep the merge's global value. A gradient decides only tensors inside a block (see
:func:`capmerge.merge.masks.layer_index`); for tensors outside any block (embeddings, heads) the search goes on to later
overrides, then the global value.

**Sweeps**: a parameter set by an override is pinned: with ``--alpha 0.2,0.5`` a tensor whose α comes from an
override gets that α in every output of the sweep (the same for an overridden density in a ``{density}`` sweep).

Pure Python (no torch): parsing costs nothing at start-up. Every bad input raises :class:`OverrideError` (a
:class:`~capmerge.errors.UsageError`) naming the override.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from capmerge.errors import UsageError
from capmerge.merge.masks import alpha_for, layer_index

__all__ = ["KEYS", "Override", "OverrideError", "Overrides", "TensorParams", "parse_cli"]

KEYS = ("alpha", "alpha_gradient", "weight", "density", "density_gradient", "gamma")
"""The parameter keys an override may set (``weights`` is accepted for ``weight``)."""
_ALIASES = {"weights": "weight"}
PARAMS = ("alpha", "weight", "density", "gamma")
"""The merge parameters overrides decide, each from the first override that sets it (gradients included)."""


class OverrideError(UsageError):
    """A bad override; ``key`` names the parameter at fault (None: the override as a whole)."""

    def __init__(self, what: str, where: str | None = None, key: str | None = None) -> None:
        super().__init__(what, where)
        self.key = key


def _number(value: Any, key: str, label: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise OverrideError(f"{key}: expected a finite number, got {value!r}", label, key)
    return float(value)


def _numbers(value: Any, key: str, label: str) -> tuple[float, ...]:
    items = list(value) if isinstance(value, list | tuple) else [value]
    if not items:
        raise OverrideError(f"{key}: expected one or more numbers, got an empty list", label, key)
    return tuple(_number(v, key, label) for v in items)


def _densities(values: tuple[float, ...], key: str, label: str) -> tuple[float, ...]:
    for d in values:
        if not 0.0 < d <= 1.0:
            raise OverrideError(f"{key} must be in (0, 1], got {d:g}", label, key)
    return values


@dataclass(frozen=True)
class Override:
    """One override: ``filter`` (a regex searched in tensor names) and its parameters (canonical keys, tuples for
    lists). Build it with :meth:`parse`."""

    filter: str
    pattern: re.Pattern[str]
    params: dict[str, float | tuple[float, ...]]
    label: str

    @classmethod
    def parse(cls, spec: Mapping[str, Any] | tuple[str, Mapping[str, Any]] | str, label: str) -> Override:
        """An override from a mapping ``{"filter": REGEX, "alpha": 0.5, ...}``, a pair ``(REGEX, {...})`` or the
        command-line form ``"REGEX:key=value,key=value"`` (see :func:`parse_cli`).

        Raises:
            OverrideError: On a missing or invalid filter, an unknown key, a value of the wrong type or out of
                range, or both a parameter and its gradient.
        """
        if isinstance(spec, str):
            return parse_cli(spec, label)
        if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[1], Mapping):
            spec = {"filter": spec[0], **spec[1]}
        if not isinstance(spec, Mapping):
            raise OverrideError(f"expected a mapping with filter: and parameters, got {spec!r}", label)
        if "filter" not in spec:
            raise OverrideError("missing filter: (a regex on tensor names)", label)
        filt = spec["filter"]
        if not isinstance(filt, str):
            raise OverrideError(f"filter: expected a regex string, got {filt!r}", label, "filter")
        try:
            pattern = re.compile(filt)
        except re.error as e:
            raise OverrideError(f"filter: invalid regex {filt!r} ({e})", label, "filter") from None
        params: dict[str, float | tuple[float, ...]] = {}
        for raw_key, value in spec.items():
            if raw_key == "filter":
                continue
            key = _ALIASES.get(str(raw_key), str(raw_key))
            if key not in KEYS:
                raise OverrideError(f"unknown key {raw_key!r} (expected filter and {', '.join(KEYS)})", label, raw_key)
            if key == "alpha" and isinstance(value, list | tuple):
                key = "alpha_gradient"  # a list for alpha is a gradient over the block index
            if key in params:
                what = {"weight": "weight and weights both given (the same key)",
                        "alpha_gradient": "alpha is a list (a gradient) and alpha_gradient is given too"}  # fmt: skip
                raise OverrideError(what.get(key, f"{raw_key} given twice"), label, raw_key)
            if key in ("alpha", "gamma"):
                params[key] = _number(value, str(raw_key), label)
            else:
                params[key] = _numbers(value, str(raw_key), label)
                if key.startswith("density"):
                    _densities(params[key], str(raw_key), label)  # type: ignore[arg-type]
        if not params:
            raise OverrideError(f"no parameters to set (give one or more of {', '.join(KEYS)})", label)
        if "alpha" in params and "alpha_gradient" in params:
            raise OverrideError("alpha and alpha_gradient both given (a gradient is an α)", label, "alpha_gradient")
        if "density" in params and "density_gradient" in params:
            raise OverrideError("density and density_gradient both given", label, "density_gradient")
        if "gamma" in params and not 0.0 <= params["gamma"] < 1.0:  # type: ignore[operator]
            raise OverrideError(f"gamma must be in [0, 1), got {params['gamma']:g}", label, "gamma")
        return cls(filt, pattern, params, label)

    def sets(self, param: str) -> bool:
        """Whether this override sets ``param`` (one of :data:`PARAMS`), directly or as a gradient."""
        return param in self.params or f"{param}_gradient" in self.params

    def to_dict(self) -> dict[str, Any]:
        """The override as a plain mapping (what records and listings show)."""
        out: dict[str, Any] = {"filter": self.filter}
        for k, v in self.params.items():
            out[k] = list(v) if isinstance(v, tuple) else v
        return out


def parse_cli(text: str, label: str | None = None) -> Override:
    """Parse ``--override 'REGEX:key=value,key=value'``.

    The filter is everything before the last ``:`` (parameters hold no ``:``, so regexes may: ``(?:q|k)_proj``);
    parameters are separated by ``,``; a list value separates its numbers with ``/``: ``density=0.2/0.5`` (one per
    vector), ``alpha=1.0/0.5/0.0`` (a gradient over the block index). Keys may use ``-`` for ``_``.

    Raises:
        OverrideError: On a missing ``:``, an item without ``=``, a non-number, and everything
            :meth:`Override.parse` rejects.
    """
    label = label or f"--override {text!r}"
    filt, sep, rest = text.rpartition(":")
    if not sep:
        raise OverrideError("expected REGEX:key=value[,key=value...]", label)
    spec: dict[str, Any] = {"filter": filt}
    if not rest.strip():
        raise OverrideError("no parameters after the ':' (e.g. alpha=0.5,density=0.3)", label)
    for item in rest.split(","):
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or not key:
            raise OverrideError(f"invalid parameter {item.strip()!r} (expected key=value)", label)
        if key in spec:
            raise OverrideError(f"{key} given twice", label, key)
        nums: list[float] = []
        for part in value.split("/"):
            try:
                nums.append(float(part))
            except ValueError:
                raise OverrideError(f"{key}: invalid number {part.strip()!r} (lists use /, e.g. 0.2/0.5)", label,
                                    key) from None  # fmt: skip
        spec[key] = nums if "/" in value or key.endswith("_gradient") else nums[0]
    return Override.parse(spec, label)


@dataclass
class TensorParams:
    """The parameters overrides set for one tensor (None: the global value) and which override set each.

    ``alpha`` is also set, without a ``source``, by the merge's own ``--alpha-gradient`` for a tensor inside a block:
    one place decides a tensor's α (override, else the global gradient, else None: the global α)."""

    alpha: float | None = None
    weight: tuple[float, ...] | None = None
    density: tuple[float, ...] | None = None
    gamma: float | None = None
    source: dict[str, int] = field(default_factory=dict)  # parameter -> index of the override that set it
    matched: list[int] = field(default_factory=list)  # every override whose filter matches

    def __bool__(self) -> bool:
        return bool(self.source)

    def per_vector(self, param: str, n: int) -> tuple[float, ...] | None:
        """The ``weight`` or ``density`` of each of ``n`` vectors (None when no override sets it)."""
        v = getattr(self, param)
        if v is None:
            return None
        return v if len(v) > 1 else v * n

    def merge_options(self, opts: Any) -> Any:
        """The merge's :class:`~capmerge.merge.methods.MergeOptions` with this tensor's γ."""
        return opts if self.gamma is None else replace(opts, gamma=self.gamma)


class Overrides:
    """An ordered list of overrides and the merge's own ``--alpha-gradient``; :meth:`resolve` gives a tensor's
    parameters (first match per parameter, then the gradient for α)."""

    def __init__(self, items: Sequence[Override] = (), alpha_gradient: Sequence[float] | None = None) -> None:
        if alpha_gradient is not None and len(alpha_gradient) == 0:
            raise UsageError("--gradient is empty (expected one or more numbers separated by commas)")
        self.items = tuple(items)
        self.alpha_gradient = None if alpha_gradient is None else [float(a) for a in alpha_gradient]
        self.needs_layers = alpha_gradient is not None or any(k.endswith("_gradient") for o in items for k in o.params)

    def __bool__(self) -> bool:
        return bool(self.items)

    def __len__(self) -> int:
        return len(self.items)

    @classmethod
    def build(
        cls, spec: Any, *, n_vectors: int | None = None, alpha_gradient: Sequence[float] | None = None
    ) -> Overrides:
        """Overrides from ``None``, an :class:`Overrides`, or a sequence whose items are command-line strings,
        mappings or ``(regex, mapping)`` pairs. With ``n_vectors``, per-vector lists must have 1 or that many values;
        ``alpha_gradient`` is the merge's ``--alpha-gradient`` (the α of block tensors no override sets).
        """
        if spec is None or isinstance(spec, Overrides):
            out = cls(spec.items if spec is not None else (), alpha_gradient)
        else:
            if isinstance(spec, str | Mapping):
                spec = [spec]
            items = []
            for i, s in enumerate(spec):
                label = f"--override {s!r}" if isinstance(s, str) else f"override {i + 1}"
                if not isinstance(s, str) and isinstance(s, Mapping) and isinstance(s.get("filter"), str):
                    label += f" (filter {s['filter']!r})"
                items.append(Override.parse(s, label))
            out = cls(items, alpha_gradient)
        if n_vectors is not None:
            out.check_vectors(n_vectors)
        return out

    def check_vectors(self, n_vectors: int) -> None:
        """Per-vector ``weight`` / ``density`` lists hold 1 or ``n_vectors`` values."""
        for o in self.items:
            for key in ("weight", "density"):
                v = o.params.get(key)
                if isinstance(v, tuple) and len(v) not in (1, n_vectors):
                    raise OverrideError(f"{key} has {len(v)} values for {n_vectors} vectors", o.label, key)

    def resolve(self, name: str, *, n_layers: int = 0, layer_pattern: str | None = None) -> TensorParams:
        """The parameters of tensor ``name``: for each parameter, the first matching override that sets it
        (a gradient only for tensors inside a block; ``n_layers`` as :func:`capmerge.merge.masks.count_layers`), and
        for α no override sets, the ``alpha_gradient`` value at the tensor's block."""
        out = TensorParams()
        out.matched = [i for i, o in enumerate(self.items) if o.pattern.search(name)]
        in_block = self.needs_layers and layer_index(name, layer_pattern) is not None
        for param in PARAMS:
            for i in out.matched:
                o = self.items[i]
                grad = o.params.get(f"{param}_gradient")
                if grad is not None:
                    if not in_block:
                        continue  # outside any block: a gradient does not decide
                    value: Any = alpha_for(name, math.nan, grad, n_layers, layer_pattern)  # type: ignore[arg-type]
                    value = value if param == "alpha" else (value,)  # density_gradient: one density for all
                elif param in o.params:
                    value = o.params[param]
                else:
                    continue
                setattr(out, param, value)
                out.source[param] = i
                break
        if out.alpha is None and self.alpha_gradient is not None and in_block:
            out.alpha = alpha_for(name, math.nan, self.alpha_gradient, n_layers, layer_pattern)
        return out

    def unused(self, resolved: Iterable[TensorParams]) -> list[str]:
        """Warnings for overrides that decided nothing on any of the ``resolved`` (merged) tensors."""
        matched: set[int] = set()
        used: set[int] = set()
        for p in resolved:
            matched.update(p.matched)
            used.update(p.source.values())
        out = []
        for i, o in enumerate(self.items):
            if i in used:
                continue
            if i not in matched:
                out.append(f"{o.label} matches no merged tensor; it has no effect")
            else:
                out.append(f"{o.label} has no effect: earlier overrides set its parameters on every tensor it matches"
                           " (or its gradient matches only tensors outside blocks)")  # fmt: skip
        return out

    def to_list(self) -> list[dict[str, Any]]:
        """The overrides as plain mappings, in order."""
        return [o.to_dict() for o in self.items]


MERGEKIT_PARAMS = {"alpha": "alpha", "weights": "weight", "density": "density", "gamma": "gamma"}
"""Recipe ``apply`` keys that also take mergekit-style lists, and the override key each becomes."""


def is_filter_list(value: Any) -> bool:
    """Whether a recipe value is a mergekit-style list ``[{filter: REGEX, value: V}, ..., {value: DEFAULT}]``."""
    return isinstance(value, list) and any(isinstance(x, Mapping) for x in value)


def from_filter_list(key: str, value: Sequence[Any]) -> tuple[list[tuple[int, dict[str, Any]]], Any]:
    """Split a mergekit-style list for the recipe key ``key`` into overrides and the default value.

    Each ``{filter: REGEX, value: V}`` becomes the override ``{filter: REGEX, <key>: V}``, returned with its index in
    the list; a last entry without ``filter`` is the default (the step's own value; ``None`` when there is none).

    Raises:
        OverrideError: ``where`` = ``"[i]"`` (and ``key`` the entry's key at fault) for a malformed entry.
    """
    target = MERGEKIT_PARAMS[key]
    overrides: list[tuple[int, dict[str, Any]]] = []
    default = None
    for i, entry in enumerate(value):
        where = f"[{i}]"
        if not isinstance(entry, Mapping):
            raise OverrideError(f"expected {{filter: REGEX, value: ...}} entries, got {entry!r}", where)
        for k in entry:
            if k not in ("filter", "value"):
                raise OverrideError(f"unknown key {k!r} in a filter list (expected filter and value)", where, k)
        if "value" not in entry:
            raise OverrideError("missing value:", where)
        if "filter" not in entry:
            if i != len(value) - 1:
                raise OverrideError("only the last entry may omit filter: (it is the default)", where)
            default = entry["value"]
            continue
        overrides.append((i, {"filter": entry["filter"], target: entry["value"]}))
    return overrides, default
