"""Per-tensor parameters of a model merge, resolved the way mergekit defines them.

A *setting* is what a configuration gives for one parameter:

* a scalar (number, bool or string): that value everywhere;
* a list of numbers: a *gradient* over the layer index. A tensor of layer ``i`` in a stack of ``L`` layers sits at
  ``t = i / (L − 1)`` (``t = 1`` when ``L = 1``), i.e. at ``t·(n − 1)`` along the list's ``n`` points, and gets the
  linear interpolation between the two points around it. Tensors outside the layers (embeddings, final norm,
  ``lm_head``) sit at ``t = 0``: they get the list's first value (what mergekit 0.1.5 does);
* a list of :class:`Cond` (``{filter: ..., value: ...}`` entries): the first entry whose filter matches the tensor
  name decides (its value may be a gradient); an entry without filter (or ``filter: "*"``) matches every tensor.
  mergekit filters match by substring; ``capmerge merge --override`` filters are regexes (``re.search``).

:func:`resolve` walks *scopes* from the most to the least specific (a model's own ``parameters``, then the slice's,
then the global ones): the first scope whose setting gives a value decides; else the method's default from the
registry. Pure Python: no torch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Cond", "check_setting", "gradient_value", "kind_of", "layer_t", "resolve"]


@dataclass(frozen=True)
class Cond:
    """One ``{filter, value}`` entry; ``regex``: the filter is a regex (``--override``), else a substring."""

    value: Any
    filter: str | None = None
    regex: bool = False

    def matches(self, name: str) -> bool:
        if self.filter is None or self.filter == "*":
            return True
        if self.regex:
            return re.search(self.filter, name) is not None
        return self.filter in name


def kind_of(default: Any) -> type:
    """The type of a parameter, from its default in the registry (``None``, a required parameter: float)."""
    if isinstance(default, bool):
        return bool
    if default is None or isinstance(default, float):
        return float
    return int if isinstance(default, int) else type(default)


def _scalar(value: Any, kind: type, key: str) -> Any:
    """``value`` checked against ``kind``; raises ValueError with a message naming ``key``."""
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key}: expected true or false, got {value!r}")
        return value
    if kind in (int, float):
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"{key}: expected a number, got {value!r}")
        return int(value) if kind is int and value == int(value) else value
    if not isinstance(value, str):
        raise ValueError(f"{key}: expected a string, got {value!r}")
    return value


def _plain(value: Any, kind: type, key: str) -> Any:
    if isinstance(value, list | tuple):
        if not value:
            raise ValueError(f"{key}: an empty list (a gradient needs one or more numbers)")
        if kind not in (int, float):
            raise ValueError(f"{key}: a list (a gradient over the layers) is only for numbers")
        return [_scalar(v, kind, key) for v in value]
    return _scalar(value, kind, key)


def check_setting(value: Any, kind: type, key: str) -> Any:
    """A setting from a configuration, checked: a scalar, a gradient, or a list of :class:`Cond` / mappings
    ``{filter, value}`` (mappings become :class:`Cond`). Raises ValueError naming ``key`` (and the entry)."""
    if isinstance(value, Cond):
        return [Cond(_plain(value.value, kind, key), value.filter, value.regex)]
    if isinstance(value, Mapping):
        value = [value]
    if isinstance(value, list | tuple) and any(isinstance(v, Mapping | Cond) for v in value):
        out = []
        for i, entry in enumerate(value):
            where = f"{key}[{i}]"
            if isinstance(entry, Cond):
                out.append(Cond(_plain(entry.value, kind, where), entry.filter, entry.regex))
                continue
            if not isinstance(entry, Mapping):
                raise ValueError(f"{where}: expected {{filter: ..., value: ...}}, got {entry!r}")
            unknown = [k for k in entry if k not in ("filter", "value")]
            if unknown:
                raise ValueError(f"{where}: unknown key {unknown[0]!r} (expected filter and value)")
            if "value" not in entry:
                raise ValueError(f"{where}: missing value:")
            filt = entry.get("filter")
            if filt is not None and not isinstance(filt, str):
                raise ValueError(f"{where}: filter must be a string, got {filt!r}")
            out.append(Cond(_plain(entry["value"], kind, where), filt))
        return out
    return _plain(value, kind, key)


def gradient_value(values: Sequence[float], t: float) -> float:
    """The value at ``t`` ∈ [0, 1] along ``values``: linear interpolation between neighbouring points."""
    if len(values) == 1:
        return values[0]
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * values[i0] + frac * values[i1]


def evaluate(setting: Any, name: str, t: float, kind: type = float) -> Any:
    """The value of a checked setting for tensor ``name`` at ``t`` (None: no filter entry matches)."""
    if isinstance(setting, list) and setting and isinstance(setting[0], Cond):
        for c in setting:
            if c.matches(name):
                return evaluate(c.value, name, t, kind)
        return None
    if isinstance(setting, list):
        value = gradient_value(setting, t)
        return int(value) if kind is int and value == int(value) else value
    return setting


def resolve(key: str, scopes: Sequence[Mapping[str, Any] | None], name: str, t: float, default: Any,
            kind: type = float) -> Any:  # fmt: skip
    """The value of parameter ``key`` for tensor ``name`` at ``t``: the first scope that gives one, else ``default``
    (None: a required parameter that no scope gives; the caller reports it)."""
    for scope in scopes:
        if scope is not None and key in scope:
            value = evaluate(scope[key], name, t, kind)
            if value is not None:
                return value
    return default


def layer_t(index: int | None, n_layers: int) -> float:
    """mergekit's ``t`` of a tensor: ``index / (n_layers − 1)`` inside the layers (1 for a single layer), 0 outside."""
    if index is None:
        return 0.0
    return index / (n_layers - 1) if n_layers > 1 else 1.0


def check_param(method: Any, key: str, where: str | None = None) -> None:
    """Refuse a parameter the model method does not take (UsageError naming the ones it does)."""
    from capmerge.errors import UsageError

    known = {**method.params, **method.model_params}
    if key not in known:
        raise UsageError(f"{method.name} has no parameter {key!r} (it takes: {', '.join(known) or 'none'})", where)


def per_model(
    key: str, vals: list[Any], models: Sequence[str], base: str | None, where: str | None = None
) -> list[Any]:
    """A per-model parameter's values, one per model: one value for all, or one each (else a UsageError, which
    says so when the base is among ``models`` and the values are one short)."""
    from capmerge.errors import UsageError

    n = len(models)
    if len(vals) not in (1, n):
        hint = (f" ({base} is the base: the base model is not merged as one of MODELS, leave it out of them)"
                if base is not None and base in models and len(vals) == n - 1 else "")  # fmt: skip
        raise UsageError(f"{key} has {len(vals)} values for {n} models{hint}", where)
    return vals * n if len(vals) == 1 else list(vals)
