"""Weighted TIES worked out by hand: the sign is elected on the weighted values Σ w_i·τ̃_i, and the agreeing entries
are averaged with their weights, δ = Σ w_i·m_i·τ̃_i / Σ w_i·m_i (docs/methods.md).

Three vectors of four elements with weights 0.5, 1 and 2, through ``capmerge apply --method ties`` on real
safetensors files, read back with the ``safetensors`` library. The expected values are written out below, element by
element; each case is chosen so that unit weights would elect the other sign (the weights are seen), and every value
is exact in float32 except the thirds, which are compared with float32's rounding of the exact fraction.
"""

from __future__ import annotations

from fractions import Fraction as F
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_any, save_single, tree_digest
from typer.testing import CliRunner

from capmerge.cli import app

runner = CliRunner()

BASE = [10.0, 20.0, 30.0, 40.0]
TAU1 = [3.0, -1.0, 2.0, -4.0]  # weight 0.5
TAU2 = [-2.0, 3.0, -0.5, 1.0]  # weight 1
TAU3 = [-1.0, 1.5, -1.25, -0.25]  # weight 2

# density 1 (nothing pruned):
#  e0: S = 0.5·3 + 1·(−2) + 2·(−1) = −2.5 → −;  agree τ2, τ3:  δ = (−2 − 2) / (1 + 2)        = −4/3
#      (unit weights: 3 − 2 − 1 = 0 → +, which would give 3)
#  e1: S = −0.5 + 3 + 3 = 5.5 → +;            agree τ2, τ3:  δ = (3 + 3) / 3                = 2
#  e2: S = 1 − 0.5 − 2.5 = −2 → −;            agree τ2, τ3:  δ = (−0.5 − 2.5) / 3           = −1
#      (unit weights: 2 − 0.5 − 1.25 = 0.25 → +, which would give 2)
#  e3: S = −2 + 1 − 0.5 = −1.5 → −;           agree τ1, τ3:  δ = (0.5·(−4) + 2·(−0.25)) / 2.5 = −1
DELTA_DENSE = [F(-4, 3), F(2), F(-1), F(-1)]

# density 0.5: k = max(1, ⌊0.5·4 + ½⌋) = 2 largest |τ_i| kept per vector
#  τ̃1 = [3, 0, 0, −4]   (|τ1| = 3, 1, 2, 4)
#  τ̃2 = [−2, 3, 0, 0]   (|τ2| = 2, 3, 0.5, 1)
#  τ̃3 = [0, 1.5, −1.25, 0]   (|τ3| = 1, 1.5, 1.25, 0.25)
#  e0: S = 1.5 − 2 = −0.5 → −;   agree τ2:      δ = −2 / 1     = −2   (unit weights: 3 − 2 = 1 → +, giving 3)
#  e1: S = 3 + 3 = 6 → +;        agree τ2, τ3:  δ = 6 / 3      = 2
#  e2: S = 2·(−1.25) → −;        agree τ3:      δ = −2.5 / 2   = −1.25
#  e3: S = 0.5·(−4) → −;         agree τ1:      δ = −2 / 0.5   = −4
DELTA_HALF = [F(-2), F(2), F(-5, 4), F(-4)]


def _f32(values: list[F]) -> np.ndarray:
    return np.array([float(v) for v in values], dtype=np.float64).astype(np.float32)


@pytest.mark.parametrize(("density", "delta"), [(None, DELTA_DENSE), ("1", DELTA_DENSE), ("0.5", DELTA_HALF)])
@pytest.mark.parametrize("alpha", ["1", "0.5"])
def test_weighted_ties_by_hand(tmp_path: Path, density: str | None, delta: list[F], alpha: str) -> None:
    names = ("v.flat", "v.square")  # the same values as a [4] and a [2, 2] tensor: pruning is per tensor
    base = save_single(tmp_path / "base.safetensors",
                       {"v.flat": torch.tensor(BASE), "v.square": torch.tensor(BASE).reshape(2, 2)})  # fmt: skip
    vecs = [
        save_single(tmp_path / f"t{i}.safetensors", {"v.flat": torch.tensor(t), "v.square": torch.tensor(t).view(2, 2)})
        for i, t in enumerate((TAU1, TAU2, TAU3), 1)
    ]
    before = tree_digest(tmp_path)
    out = tmp_path / "out" / "out.safetensors"
    args = ["apply", str(base), *map(str, vecs), "-o", str(out), "--method", "ties", "--weights", "0.5,1,2"]
    args += ["--alpha", alpha] + (["--density", density] if density else [])
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.stderr
    assert {k: v for k, v in tree_digest(tmp_path).items() if "/out/" not in k} == before  # inputs untouched
    got = load_any(out)
    a = F(alpha)
    want = _f32([F(b) + a * d for b, d in zip(map(F, BASE), delta, strict=True)])
    for name in names:
        g = got[name].reshape(-1).numpy()
        assert got[name].dtype == torch.float32
        # α·δ and the sum are float32 operations: within one rounding of the exact value at these magnitudes
        assert np.allclose(g, want, rtol=0, atol=4e-6), (name, g.tolist(), want.tolist())


def test_unit_weights_elect_the_other_sign(tmp_path: Path) -> None:
    """The same vectors without --weights (unit weights): e0 and e2 flip to +, as the comments above say, so the
    weighted test cannot pass by ignoring the weights."""
    base = save_single(tmp_path / "base.safetensors", {"v": torch.tensor(BASE)})
    vecs = [
        save_single(tmp_path / f"t{i}.safetensors", {"v": torch.tensor(t)}) for i, t in enumerate((TAU1, TAU2, TAU3))
    ]
    out = tmp_path / "out.safetensors"
    r = runner.invoke(app, ["apply", str(base), *map(str, vecs), "-o", str(out), "--method", "ties"])
    assert r.exit_code == 0, r.stderr
    # e0: S = 0 → + (ties go to +): only τ1 agrees → 3; e1: + → (3 + 1.5)/2 = 2.25; e2: + → τ1 → 2;
    # e3: S = −4 + 1 − 0.25 → −: τ1, τ3 → (−4 − 0.25)/2 = −2.125
    want = np.array([13.0, 22.25, 32.0, 37.875], dtype=np.float32)
    assert np.array_equal(load_any(out)["v"].numpy(), want), load_any(out)["v"].tolist()
