"""The model-centric methods on small cases worked out by hand (the expected values are written out), their parameter
checks (``ModelMethod.resolve``) and :func:`capmerge.merge_state_dicts`' input checks."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

import capmerge
from capmerge.errors import MismatchError, UsageError
from capmerge.merge.methods.models import TensorInputs
from capmerge.merge.methods.registry import MODEL_METHODS, get_model_method

R = math.sqrt(0.5)


def merge1(method: str, models: list[list], base: list | None = None, *, mp: list[dict] | None = None,
           **params: object) -> torch.Tensor:  # fmt: skip
    """The method's fn on one tensor given as nested lists."""
    m = get_model_method(method)
    gp, mps = m.resolve(params, mp if mp is not None else [{}] * len(models))
    x = TensorInputs("t", [torch.tensor(v) for v in models], mps, gp, None if base is None else torch.tensor(base))
    return m.fn(x)


def close(got: torch.Tensor, want: list, tol: float = 1e-6) -> None:
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float32), rtol=0, atol=tol)


@pytest.mark.parametrize(("t", "want"), [(0.0, [1, 0]), (1.0, [0, 1]), (0.5, [R, R]), (1 / 3, [math.sqrt(3) / 2, 0.5])])
def test_slerp_of_orthogonal_unit_vectors(t: float, want: list) -> None:
    close(merge1("slerp", [[0.0, 1.0]], [1.0, 0.0], t=t), want)


def test_slerp_colinear_and_antipodal_fall_back_to_lerp() -> None:
    close(merge1("slerp", [[2.0, 4.0]], [1.0, 2.0], t=0.25), [1.25, 2.5], 0)  # (1 − t)·v + t·2v
    close(merge1("slerp", [[-1.0, -2.0]], [1.0, 2.0], t=0.25), [0.5, 1.0], 0)  # antipodal: 0.75·v − 0.25·v
    assert merge1("slerp", [[]], [], t=0.5).shape == (0,)


def test_nuslerp_weights_flatten_rows_and_columns() -> None:
    v0, v1 = [[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [1.0, 0.0]]
    eq = [{"weight": 1.0}, {"weight": 1.0}]
    # rows (last dimension): row 0 orthogonal → (a + b)·sin 45°/sin 90°; row 1 colinear → lerp
    close(merge1("nuslerp", [v0, v1], mp=eq, nuslerp_flatten=False), [[R, R], [1.0, 0.0]])
    # columns (nuslerp_row_wise): col 0 = (1, 1) vs (0, 1) at 45°: (a + b)/(2·cos 22.5°); col 1 = 0 vs (1, 0): the
    # zero vector's unit is 0, cos = 0, (a + b)/(2·cos 45°)
    c = 2 * math.cos(math.pi / 8)
    close(merge1("nuslerp", [v0, v1], mp=eq, nuslerp_flatten=False, nuslerp_row_wise=True),
          [[1 / c, 1 / math.sqrt(2)], [2 / c, 0.0]])  # fmt: skip
    # flattened (the default): (1, 0, 1, 0) vs (0, 1, 1, 0) at 60°: (a + b)·sin 30°/sin 60°
    k = 0.5 / math.sin(math.pi / 3)
    close(merge1("nuslerp", [v0, v1], mp=eq), [[k, k], [2 * k, 0.0]])
    # t = w₂/(w₁ + w₂) = 0.75; with a base the task vectors are interpolated and the base added back
    close(merge1("nuslerp", [[1.0, 0.0], [0.0, 1.0]], mp=[{"weight": 1.0}, {"weight": 3.0}]),
          [math.cos(3 * math.pi / 8), math.sin(3 * math.pi / 8)])  # fmt: skip
    close(merge1("nuslerp", [[11.0, 10.0], [10.0, 11.0]], [10.0, 10.0], mp=eq), [10 + R, 10 + R], 2e-6)
    # weights summing to 0: t = ½
    close(merge1("nuslerp", [[1.0, 0.0], [0.0, 1.0]], mp=[{"weight": 1.0}, {"weight": -1.0}]), [R, R])


def test_multislerp_and_karcher_of_orthogonal_unit_vectors() -> None:
    eq = [{"weight": 1.0}, {"weight": 1.0}]
    close(merge1("multislerp", [[1.0, 0.0], [0.0, 1.0]], mp=eq), [R, R])
    close(merge1("karcher", [[1.0, 0.0], [0.0, 1.0]]), [R, R])
    close(merge1("karcher", [[2.0, 0.0], [0.0, 2.0], [0.0, 0.0]]), [2 / 3 * math.sqrt(2), 2 / 3 * math.sqrt(2)])
    close(merge1("karcher", [[0.0, 0.0], [0.0, 0.0]]), [0.0, 0.0], 0)
    close(merge1("multislerp", [[3.0, 4.0]], mp=[{"weight": 0.2}]), [3.0, 4.0], 0)  # one model: itself
    # antipodal with balancing weights: two models fall back to w₁·v₁ + w₂·v₂, more are an error
    close(merge1("multislerp", [[1.0, 2.0], [-1.0, -2.0]], mp=eq), [0.0, 0.0], 0)
    with pytest.raises(ValueError, match="weighted mean of the unit vectors is zero"):
        merge1("multislerp", [[1.0, 0.0], [-1.0, 0.0], [0.0, 0.0]], mp=eq + [{"weight": 1.0}])


def test_model_stock_by_angle() -> None:
    base = [1.0, 1.0]
    close(merge1("model_stock", [[2.0, 1.0], [1.0, 2.0]], base), base, 0)  # τ ⟂: cos 0 → t = 0 → the base
    close(merge1("model_stock", [[2.0, 3.0], [2.0, 3.0]], base), [2.0, 3.0])  # τ equal: t = 2·1/(1 + 1) = 1
    close(merge1("model_stock", [[2.0, 3.0], [0.0, -1.0]], base), base, 0)  # opposite: 1 + cos = 0, singular → base
    # cos 60° between τ₁ = (1, 0), τ₂ = (½, √3/2): t = 2·½/(1 + ½) = ⅔ of the way to the average
    t, avg = 2 / 3, [1 + 0.75, 1 + math.sqrt(3) / 4]
    close(merge1("model_stock", [[2.0, 1.0], [1.5, 1 + math.sqrt(3) / 2]], base),
          [t * a + (1 - t) * 1.0 for a in avg])  # fmt: skip
    # filter_wise: each row its own angle
    got = merge1("model_stock", [[[2.0, 1.0], [2.0, 3.0]], [[1.0, 2.0], [2.0, 3.0]]], [[1.0, 1.0], [1.0, 1.0]],
                 filter_wise=True)  # fmt: skip
    close(got, [[1.0, 1.0], [2.0, 3.0]])


def test_sce_by_hand() -> None:
    # τ₁ = (1, −2), τ₂ = (3, 1): energies mean(τ²) = 2.5, 5 → c = ⅓, ⅔; Σ τ = (4, −1) elects (+, −);
    # e0: both agree → (⅓·1 + ⅔·3)/1 = 7/3; e1: only τ₁ → ⅓·(−2)/⅓ = −2
    close(merge1("sce", [[1.0, -2.0], [3.0, 1.0]], [0.0, 0.0]), [7 / 3, -2.0])
    # select_topk ½: variances of the entries (1, 2.25) → only e1 kept; energies 2, 0.5 → c = 0.8, 0.2; Σ = −1 → −
    close(merge1("sce", [[1.0, -2.0], [3.0, 1.0]], [0.0, 0.0], select_topk=0.5), [0.0, -2.0])


def test_nearswap_by_hand() -> None:
    # w = clamp(t/|a − b|, 0, 1) with t = 0.05: 1 (diff 0.01), ½ (0.1), 0.05 (1), 1 (0, clamped to 1e-6)
    close(merge1("nearswap", [[0.01, 0.1, 1.0, 5.0]], [0.0, 0.0, 0.0, 5.0], t=0.05), [0.01, 0.05, 0.05, 5.0])


def test_ties_weighted_and_negative_weights_by_hand() -> None:
    # tests/test_weighted_ties.py's dense case through the model method: the same δ
    base = [10.0, 20.0, 30.0, 40.0]
    models = [[b + t for b, t in zip(base, tau, strict=True)] for tau in
              ([3.0, -1.0, 2.0, -4.0], [-2.0, 3.0, -0.5, 1.0], [-1.0, 1.5, -1.25, -0.25])]  # fmt: skip
    mp = [{"weight": 0.5}, {"weight": 1.0}, {"weight": 2.0}]
    delta = [Fraction(-4, 3), Fraction(2), Fraction(-1), Fraction(-1)]
    close(merge1("ties", models, base, mp=mp), [b + float(d) for b, d in zip(base, delta, strict=True)], 4e-6)
    # a negative weight: agreement is judged on w·τ (mergekit): w·τ = −1 and −0.5 both agree with the elected −;
    # their weights sum to 0, which divides by 1: δ = −1.5
    close(merge1("ties", [[1.0], [-0.5]], [0.0], mp=[{"weight": -1.0}, {"weight": 1.0}]), [-1.5], 0)


def test_passthrough_and_linear() -> None:
    x = [[1.5, -2.0, float("inf")]]
    got = merge1("passthrough", x)
    assert torch.equal(got, torch.tensor(x[0]))
    close(merge1("passthrough", [[1.0, -2.0]], mp=[{"scale": 0.5}]), [0.5, -1.0], 0)
    close(merge1("linear", [[1.0, 2.0], [3.0, 6.0]], mp=[{"weight": 1.0}, {"weight": 3.0}]), [2.5, 5.0], 0)
    with pytest.raises(ValueError, match="weights sum to 0"):
        merge1("linear", [[1.0], [3.0]], mp=[{"weight": 1.0}, {"weight": -1.0}])


def test_resolve_checks_parameters_and_model_counts() -> None:
    m = get_model_method("ties")
    gp, mp = m.resolve({"lambda": 0.5}, [{"weight": 1.0}])
    assert gp == {"normalize": True, "rescale": False, "lambda": 0.5, "int8_mask": False}
    assert mp == [{"weight": 1.0, "density": 1.0}]
    with pytest.raises(UsageError, match=r"merge method ties: unknown parameter t \(known: normalize"):
        m.resolve({"t": 0.5}, [{"weight": 1.0}])
    with pytest.raises(UsageError, match="merge method ties: model parameter weight is required"):
        m.resolve({}, [{"density": 0.5}])
    with pytest.raises(UsageError, match="merge method slerp: parameter t is required"):
        get_model_method("slerp").resolve({}, [{}])
    with pytest.raises(UsageError, match="slerp takes exactly 1 model besides the base, got 2"):
        get_model_method("slerp").resolve({"t": 0.5}, [{}, {}])
    with pytest.raises(UsageError, match="model_stock takes at least 2 models"):
        get_model_method("model_stock").resolve({}, [{}])
    with pytest.raises(UsageError, match="unknown merge method 'tie'"):
        get_model_method("tie")
    for m in MODEL_METHODS.values():  # every method documents itself and declares a known base policy
        assert m.summary and m.base in ("required", "optional", "unused"), m.name


def test_merge_state_dicts_checks_its_inputs() -> None:
    a = {"w": torch.ones(2, 2), "ids": torch.arange(3)}
    b = {"w": torch.zeros(2, 2), "ids": torch.arange(3) + 5}
    out = capmerge.merge_state_dicts([a, b], method="linear", model_parameters={"weight": 1.0}, dtype=torch.bfloat16)
    assert out["w"].dtype == torch.bfloat16 and torch.equal(out["w"].float(), torch.full((2, 2), 0.5))
    assert torch.equal(out["ids"], a["ids"]), "integer buffers are copied from the first model (or the base)"
    with pytest.raises(UsageError, match="merge method ties needs a base model"):
        capmerge.merge_state_dicts([a], method="ties", model_parameters=[{"weight": 1.0}])
    with pytest.raises(UsageError, match="merge method linear takes no base model"):
        capmerge.merge_state_dicts([a], base=b, model_parameters=[{"weight": 1.0}])
    with pytest.raises(UsageError, match="1 model parameter mappings for 2 models"):
        capmerge.merge_state_dicts([a, b], model_parameters=[{"weight": 1.0}])
    with pytest.raises(UsageError, match="sce: parameter select_topk must be a finite number, got nan"):
        capmerge.merge_state_dicts([a, b], base=b, method="sce", parameters={"select_topk": float("nan")})
    with pytest.raises(UsageError, match=r"model parameter weight must be a finite number, got \[0.5, inf\]"):
        capmerge.merge_state_dicts([a, b], model_parameters={"weight": [0.5, float("inf")]})
    # a model without the integer buffer (position_ids, which newer transformers do not save): the first model's
    out = capmerge.merge_state_dicts([a, {"w": b["w"]}], model_parameters={"weight": 1.0})
    assert torch.equal(out["ids"], a["ids"]) and torch.equal(out["w"], torch.full((2, 2), 0.5))
    with pytest.raises(MismatchError, match=r"model 2 holds other floating tensors than the reference \(v\)"):
        capmerge.merge_state_dicts([a, {**b, "v": torch.ones(2)}], model_parameters={"weight": 1.0})
    with pytest.raises(MismatchError, match=r"model 2: shape \[3\] vs \[2, 2\]"):
        capmerge.merge_state_dicts([a, {**b, "w": torch.zeros(3)}], model_parameters={"weight": 1.0})
