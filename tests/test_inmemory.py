"""In-memory helpers: load_vector, apply_to_state_dict, apply_to_model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import save_single

import capmerge
from capmerge.errors import MismatchError


@pytest.fixture
def vec_file(tmp_path: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    return save_single(
        tmp_path / "v.safetensors",
        {"0.weight": torch.randn(3, 4, generator=g), "0.bias": torch.randn(3, generator=g).bfloat16()},
    )


def test_load_vector_eager_and_lazy(vec_file: Path) -> None:
    v = capmerge.load_vector(vec_file)
    assert set(v) == {"0.weight", "0.bias"} and v["0.bias"].dtype == torch.bfloat16
    lazy = capmerge.load_vector(vec_file, lazy=True)
    assert len(lazy) == 2 and lazy.shape("0.weight") == (3, 4)
    assert torch.equal(lazy["0.weight"], v["0.weight"])


def test_apply_to_model_matches_reference(vec_file: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3)).to(torch.bfloat16)
    before = {k: t.clone() for k, t in model.state_dict().items()}
    v = capmerge.load_vector(vec_file)
    done = capmerge.apply_to_model(model, vec_file, alpha=0.5)
    assert sorted(done) == ["0.bias", "0.weight"]
    for k, t in model.state_dict().items():
        ref = (before[k].float() + 0.5 * v[k].float()).to(torch.bfloat16)
        assert torch.equal(t, ref), k


def test_apply_to_state_dict_checks_first(vec_file: Path) -> None:
    sd = {"0.weight": torch.zeros(3, 4), "0.bias": torch.zeros(2)}
    with pytest.raises(MismatchError, match="shape mismatch"):
        capmerge.apply_to_state_dict(sd, vec_file)
    assert torch.equal(sd["0.weight"], torch.zeros(3, 4))  # nothing changed
    with pytest.raises(MismatchError, match="not in the state dict"):
        capmerge.apply_to_state_dict({"0.weight": torch.zeros(3, 4)}, vec_file)
    done = capmerge.apply_to_state_dict({"0.weight": torch.zeros(3, 4)}, vec_file, allow_missing=True)
    assert done == ["0.weight"]


def test_tied_weights_updated_once() -> None:
    w = torch.zeros(2, 2)
    sd = {"embed.weight": w, "lm_head.weight": w}
    capmerge.apply_to_state_dict(sd, {"embed.weight": torch.ones(2, 2), "lm_head.weight": torch.ones(2, 2)})
    assert torch.equal(w, torch.ones(2, 2))


def test_apply_to_state_dict_with_methods_matches_the_streaming_engine(tmp_path: Path) -> None:
    """The in-memory path and `capmerge apply` give the same bits for every option set."""
    g = torch.Generator().manual_seed(3)
    names = ["layers.0.w", "layers.1.w", "head.w"]
    base = {n: torch.randn(50, 9, generator=g).bfloat16() for n in names}
    vecs = [{n: 0.1 * torch.randn(50, 9, generator=g) for n in names} for _ in range(2)]
    save_single(tmp_path / "p.safetensors", base)
    for i, v in enumerate(vecs):
        save_single(tmp_path / f"v{i}.safetensors", v)
    cases = [
        {"method": "ties", "density": 0.3, "weights": [0.7, 0.4]},
        {"method": "dare_ties", "density": [0.2, 0.6], "seed": 4},
        {"method": "breadcrumbs_ties", "density": 0.5, "gamma": 0.05},
        {"layers": "1", "alpha": 0.5},
        {"alpha": 0.3, "alpha_gradient": [1.0, 0.0]},
    ]
    for i, opts in enumerate(cases):
        out = tmp_path / f"o{i}.safetensors"
        capmerge.apply(tmp_path / "p.safetensors", [tmp_path / "v0.safetensors", tmp_path / "v1.safetensors"], out,
                       **opts)  # fmt: skip
        sd = {n: t.clone() for n, t in base.items()}
        capmerge.apply_to_state_dict(sd, [tmp_path / "v0.safetensors", vecs[1]], **opts)
        ref = capmerge.load_vector(out)
        for n in names:
            assert torch.equal(sd[n].view(torch.int16), ref[n].view(torch.int16)), (opts, n)


def test_merge_state_dicts_promotes_dtypes_and_refuses_a_zero_weight_sum() -> None:
    """merge_state_dicts writes each tensor in the dtype its inputs promote to (as capmerge merge and mergekit:
    float32 for bf16 with float32), and multislerp's weights summing to 0 are a ValueError naming the tensor (it was
    a ZeroDivisionError)."""
    import torch

    from capmerge.inmemory import merge_state_dicts

    g = torch.Generator().manual_seed(2)
    a, b = {"w": torch.randn(64, generator=g).bfloat16()}, {"w": torch.randn(64, generator=g)}
    got = merge_state_dicts([a, b], method="linear", model_parameters=[{"weight": 0.5}, {"weight": 0.5}])
    assert got["w"].dtype == torch.float32
    assert torch.equal(got["w"], a["w"].float() * 0.5 + b["w"] * 0.5)
    with pytest.raises(ValueError, match="tensor w: the weights sum to 0, and normalize_weights divides by their sum"):
        merge_state_dicts([a, b], method="multislerp", model_parameters=[{"weight": 1.0}, {"weight": -1.0}])
