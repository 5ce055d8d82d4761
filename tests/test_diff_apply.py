"""diff and apply against independent references (torch / numpy arithmetic, the safetensors reader)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DTYPES, SHAPES, listing, load_any, model_tensors, perturb, save_sharded, save_single
from safetensors import safe_open

import capmerge
from capmerge.merge import compute


def _ref_diff(a: torch.Tensor, b: torch.Tensor, out: torch.dtype) -> torch.Tensor:
    return (a.float() - b.float()).to(out)


def _ref_apply(p: torch.Tensor, vs: list[torch.Tensor], alpha: float, out: torch.dtype) -> torch.Tensor:
    d = torch.zeros(p.shape, dtype=torch.float32)
    for v in vs:
        d = d + v.float()
    return (p.float() + alpha * d).to(out)


def _assert_bits_equal(got: torch.Tensor, ref: torch.Tensor, name: str) -> None:
    assert got.dtype == ref.dtype and got.shape == ref.shape, (name, got.dtype, ref.dtype, got.shape, ref.shape)
    g, r = got.flatten(), ref.flatten()
    same = (g == r) | (torch.isnan(g.float()) & torch.isnan(r.float()))
    if not bool(same.all()):
        i = int((~same).nonzero()[0])
        raise AssertionError(f"{name}: first mismatch at {i}: got {g[i].item()!r}, expected {r[i].item()!r}")


@pytest.fixture(params=[True, False], ids=["native", "torch"])
def kernel_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    if request.param and not compute.native_available():
        pytest.fail("the native kernel was not built (setup.py); it must be in the development install")
    if not request.param:
        monkeypatch.setenv("CAPMERGE_NO_NATIVE", "1")
    return request.param


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_diff_matches_reference(tmp_path: Path, dtype: str, sharded: bool, kernel_path: bool) -> None:
    g = torch.Generator().manual_seed(3)
    base = {f"t{i}": (torch.randn(s, generator=g) * 10).to(DTYPES[dtype]) for i, s in enumerate(SHAPES)}
    aux = {k: (v.float() + torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in base.items()}
    if sharded:
        b, a = save_sharded(tmp_path / "b", base, 3), save_sharded(tmp_path / "a", aux, 2)
    else:
        b, a = save_single(tmp_path / "b.safetensors", base), save_single(tmp_path / "a.safetensors", aux)
    out = tmp_path / "vec.safetensors"
    s = capmerge.diff(b, a, out)
    vec = load_any(out)
    for k in base:
        if base[k].numel() == 0:
            continue  # empty tensors have nothing to differ in: left out like any all-zero difference
        _assert_bits_equal(vec[k], _ref_diff(aux[k], base[k], DTYPES[dtype]), k)
    assert "t4" in s.zero_tensors and "t4" not in vec


@pytest.mark.parametrize("out_dtype", ["float32", "bfloat16", "float16"])
def test_diff_dtype_option_rounds_once(tmp_path: Path, out_dtype: str, kernel_path: bool) -> None:
    rng = np.random.default_rng(0)
    b = rng.standard_normal(5000).astype(np.float32)
    a = b + rng.standard_normal(5000).astype(np.float32) * 1e-3
    save_single(tmp_path / "b.safetensors", {"w": torch.from_numpy(b)})
    save_single(tmp_path / "a.safetensors", {"w": torch.from_numpy(a)})
    capmerge.diff(tmp_path / "b.safetensors", tmp_path / "a.safetensors", tmp_path / "v.safetensors", dtype=out_dtype)
    got = load_any(tmp_path / "v.safetensors")["w"]
    ref32 = a - b  # numpy float32 subtraction: the exact fp32 difference rounded once
    if out_dtype == "float16":
        _assert_bits_equal(got, torch.from_numpy(ref32.astype(np.float16)), "w")
    else:
        _assert_bits_equal(got, torch.from_numpy(ref32).to(DTYPES[out_dtype]), "w")


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("alpha", [1.0, 0.5, -1.3])
def test_apply_matches_reference(tmp_path: Path, dtype: str, alpha: float, kernel_path: bool) -> None:
    g = torch.Generator().manual_seed(5)
    p = {f"t{i}": torch.randn(s, generator=g).to(DTYPES[dtype]) for i, s in enumerate(SHAPES)}
    v1 = {k: (0.1 * torch.randn(t.shape, generator=g)).to(torch.float32) for k, t in p.items()}
    v2 = {k: (0.1 * torch.randn(t.shape, generator=g)).to(torch.bfloat16) for k, t in p.items() if k != "t1"}
    save_sharded(tmp_path / "P", p, 2)
    save_single(tmp_path / "v1.safetensors", v1)
    save_single(tmp_path / "v2.safetensors", v2)
    capmerge.apply(
        tmp_path / "P", [tmp_path / "v1.safetensors", tmp_path / "v2.safetensors"], tmp_path / "O", alpha=alpha
    )
    out = load_any(tmp_path / "O")
    for k in p:
        vs = [v1[k]] + ([v2[k]] if k in v2 else [])
        _assert_bits_equal(out[k], _ref_apply(p[k], vs, alpha, DTYPES[dtype]), k)


def test_apply_numpy_reference_fp16(tmp_path: Path, kernel_path: bool) -> None:
    rng = np.random.default_rng(1)
    p = rng.standard_normal(10001).astype(np.float16)
    v = (rng.standard_normal(10001) * 0.01).astype(np.float32)
    save_single(tmp_path / "p.safetensors", {"w": torch.from_numpy(p)})
    save_single(tmp_path / "v.safetensors", {"w": torch.from_numpy(v)})
    capmerge.apply(tmp_path / "p.safetensors", tmp_path / "v.safetensors", tmp_path / "o.safetensors", alpha=0.7)
    ref = (p.astype(np.float32) + np.float32(0.7) * v).astype(np.float16)
    _assert_bits_equal(load_any(tmp_path / "o.safetensors")["w"], torch.from_numpy(ref), "w")


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_round_trip_float32_vector(ckpts: dict[str, Path], dtype: str) -> None:
    """apply(S, diff(S, A, float32), α=1) == A within one ulp of A's dtype."""
    tmp = ckpts["tmp"]
    s = perturb(model_tensors(0, DTYPES[dtype]), 1)
    a = perturb(s, 2)
    save_single(tmp / "s.safetensors", s)
    save_single(tmp / "a.safetensors", a)
    capmerge.diff(tmp / "s.safetensors", tmp / "a.safetensors", tmp / "v.safetensors", dtype="float32")
    capmerge.apply(tmp / "s.safetensors", tmp / "v.safetensors", tmp / "r.safetensors")
    r = load_any(tmp / "r.safetensors")
    for k, t in a.items():
        assert r[k].dtype == t.dtype
        if not t.is_floating_point():
            assert torch.equal(r[k], t)
            continue
        # For bf16/fp16 inputs the fp32 difference is exact, so the round trip is exact;
        # for fp32 inputs a - s is rounded once and s + (a - s) is within one ulp of a.
        ulp = torch.finfo(t.dtype).eps * t.float().abs().clamp_min(torch.finfo(t.dtype).tiny)
        err = (r[k].float() - t.float()).abs()
        assert bool((err <= ulp).all()), (k, float(err.max()))
        if t.dtype != torch.float32:
            assert torch.equal(r[k], t), k


def test_round_trip_bf16_vector_documented_bound(tmp_path: Path) -> None:
    """With a bf16 vector τ itself is rounded: the error is bounded by half an ulp of |τ| plus one of the result."""
    g = torch.Generator().manual_seed(9)
    s = {"w": torch.randn(20000, generator=g).bfloat16()}
    a = {"w": (s["w"].float() + 0.05 * torch.randn(20000, generator=g)).bfloat16()}
    save_single(tmp_path / "s.safetensors", s)
    save_single(tmp_path / "a.safetensors", a)
    capmerge.diff(tmp_path / "s.safetensors", tmp_path / "a.safetensors", tmp_path / "v.safetensors")
    capmerge.apply(tmp_path / "s.safetensors", tmp_path / "v.safetensors", tmp_path / "r.safetensors")
    r, t = load_any(tmp_path / "r.safetensors")["w"].float(), a["w"].float()
    tau = (t - s["w"].float()).abs()
    eps = torch.finfo(torch.bfloat16).eps
    bound = eps / 2 * tau + eps * t.abs()
    assert bool(((r - t).abs() <= bound).all())
    assert float((r != t).float().mean()) < 0.2  # most elements still round-trip exactly


def test_diff_leaves_out_zero_and_non_float(ckpts: dict[str, Path]) -> None:
    tmp = ckpts["tmp"]
    s = capmerge.diff(ckpts["S"], ckpts["A"], tmp / "v.safetensors")
    assert set(s.zero_tensors) == {"vision.frozen.weight", "layers.1.empty"}
    assert s.skipped == {"position_ids": "non-floating (I64)"}
    with safe_open(str(tmp / "v.safetensors"), "pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert "vision.frozen.weight" not in keys and "position_ids" not in keys
    assert meta["format"] == "pt" and meta["capmerge.kind"] == "capability-vector"
    assert meta["capmerge.zero_tensors"] == "2" and meta["capmerge.version"] == capmerge.__version__
    assert meta["capmerge.base"] == str(ckpts["S"]) and meta["capmerge.aux"] == str(ckpts["A"])
    assert meta["capmerge.base_fingerprint"].startswith("sha256:")
    assert meta["capmerge.base_fingerprint"] != meta["capmerge.aux_fingerprint"]
    assert not s.warnings
    # the same checkpoint twice (arguments mixed up): an empty vector, said in a warning
    same = capmerge.diff(ckpts["S"], ckpts["S"], tmp / "same.safetensors")
    assert same.tensors_changed == 0 and len(same.zero_tensors) > 0
    assert same.warnings == [f"AUX equals BASE in every tensor compared: the vector is empty ({ckpts['S']}, "
                             f"{ckpts['S']})"]  # fmt: skip
    with safe_open(str(tmp / "same.safetensors"), "pt") as f:
        assert not list(f.keys())


def test_zero_prefix_blocks_are_written_when_tensor_is_nonzero(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tensor whose first blocks are all zero but not the last must be stored in full."""
    from capmerge.merge import engine

    monkeypatch.setattr(engine, "BLOCK_ELEMS", 1000)
    b = torch.zeros(5500)
    a = b.clone()
    a[5200] = 1.0
    a2 = torch.zeros(3000)
    save_single(tmp_path / "b.safetensors", {"x": b, "y": torch.zeros(3000), "z": torch.ones(10)})
    save_single(tmp_path / "a.safetensors", {"x": a, "y": a2, "z": torch.full((10,), 3.0)})
    s = capmerge.diff(tmp_path / "b.safetensors", tmp_path / "a.safetensors", tmp_path / "v.safetensors")
    v = load_any(tmp_path / "v.safetensors")
    assert s.zero_tensors == ["y"]
    assert torch.equal(v["x"], a) and torch.equal(v["z"], torch.full((10,), 2.0))


def test_include_exclude(ckpts: dict[str, Path]) -> None:
    tmp = ckpts["tmp"]
    capmerge.diff(ckpts["S"], ckpts["A"], tmp / "v.safetensors", include=[r"^layers\."], exclude=[r"\.bias$"])
    keys = set(load_any(tmp / "v.safetensors"))
    assert keys == {"layers.0.attn.weight", "layers.0.mlp.weight", "layers.1.attn.weight", "layers.1.scale",
                    "layers.1.one", "layers.1.seven"}  # fmt: skip


def test_sharded_diff_output(ckpts: dict[str, Path]) -> None:
    tmp = ckpts["tmp"]
    s = capmerge.diff(ckpts["S"], ckpts["A"], tmp / "vdir", shard_size="1KB", dtype="float32")
    files = listing(tmp / "vdir")
    index = json.loads((tmp / "vdir" / "capvector.safetensors.index.json").read_text())
    shards = sorted(f for f in files if f.endswith(".safetensors"))
    n = len(shards)
    assert n > 2 and shards[0] == f"capvector-00001-of-{n:05d}.safetensors"
    assert set(index["weight_map"].values()) == set(shards)
    vec = load_any(tmp / "vdir")
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in vec.values())
    for shard in shards:  # each shard respects the limit unless it holds a single larger tensor
        t = load_any(tmp / "vdir" / shard)
        size = sum(x.numel() * x.element_size() for x in t.values())
        assert size <= 1000 or len(t) == 1
    assert s.files[-1] == "capvector.safetensors.index.json"
    # the directory is a checkpoint capmerge (and the round trip) can read back
    capmerge.apply(ckpts["S"], tmp / "vdir", tmp / "r.safetensors")
    a = load_any(ckpts["A"])
    r = load_any(tmp / "r.safetensors")
    assert all(torch.equal(r[k], a[k]) for k in a)


def test_small_diff_into_directory_is_one_file(ckpts: dict[str, Path]) -> None:
    tmp = ckpts["tmp"]
    capmerge.diff(ckpts["S"], ckpts["A"], tmp / "vdir")
    assert listing(tmp / "vdir") == {"capvector.safetensors"}


def test_apply_mirrors_sharded_base(ckpts: dict[str, Path]) -> None:
    tmp = ckpts["tmp"]
    capmerge.diff(ckpts["S"], ckpts["A"], tmp / "v.safetensors")
    s = capmerge.apply(ckpts["P"], [tmp / "v.safetensors"], tmp / "M", alpha=0.5)
    base_files = listing(ckpts["P"])
    out_files = listing(tmp / "M")
    assert out_files == base_files | {"capmerge.json"}
    assert (tmp / "M" / "sub" / "extra.txt").read_text() == "x"
    bi = json.loads((ckpts["P"] / "model.safetensors.index.json").read_text())
    oi = json.loads((tmp / "M" / "model.safetensors.index.json").read_text())
    assert oi["weight_map"] == bi["weight_map"]
    out = load_any(tmp / "M")
    assert oi["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in out.values())
    p, v = load_any(ckpts["P"]), load_any(tmp / "v.safetensors")
    for k in p:
        if k in v:
            _assert_bits_equal(out[k], _ref_apply(p[k], [v[k]], 0.5, p[k].dtype), k)
        else:  # untouched: copied bit for bit
            assert out[k].view(torch.uint8).equal(p[k].view(torch.uint8)) if out[k].numel() else True, k
    rec = json.loads((tmp / "M" / "capmerge.json").read_text())
    assert rec["alpha"] == 0.5 and rec["vectors"][0]["ref"] == str(tmp / "v.safetensors")
    assert rec["base"]["fingerprint"].startswith("sha256:")
    assert s.tensors_unchanged == len(p) - len(v)


def test_apply_dtype_option(ckpts: dict[str, Path]) -> None:
    tmp = ckpts["tmp"]
    capmerge.diff(ckpts["S"], ckpts["A"], tmp / "v.safetensors")
    capmerge.apply(ckpts["P"], tmp / "v.safetensors", tmp / "o.safetensors", dtype="float32", alpha=2.0)
    o, p, v = load_any(tmp / "o.safetensors"), load_any(ckpts["P"]), load_any(tmp / "v.safetensors")
    for k in p:
        if p[k].is_floating_point():
            ref = _ref_apply(p[k], [v[k]] if k in v else [], 2.0, torch.float32) if k in v else p[k].float()
            _assert_bits_equal(o[k], ref, k)
        else:
            assert o[k].dtype == p[k].dtype


def test_allow_missing(ckpts: dict[str, Path]) -> None:
    tmp = ckpts["tmp"]
    s_t = load_any(ckpts["S"])
    a_t = load_any(ckpts["A"])
    a_t["new.head"] = torch.ones(3)
    del a_t["layers.1.seven"]
    save_single(tmp / "A2.safetensors", a_t)
    s = capmerge.diff(ckpts["S"], tmp / "A2.safetensors", tmp / "v.safetensors", allow_missing=True)
    assert s.skipped["new.head"] == "only in AUX" and s.skipped["layers.1.seven"] == "only in BASE"
    v = load_any(tmp / "v.safetensors")
    assert "new.head" not in v and torch.equal(v["layers.0.attn.bias"], _ref_diff(a_t["layers.0.attn.bias"],
                                                                                   s_t["layers.0.attn.bias"],
                                                                                   torch.bfloat16))  # fmt: skip
    save_single(tmp / "v2.safetensors", {"new.head": torch.ones(3), "layers.0.attn.bias": torch.ones(16)})
    s2 = capmerge.apply(ckpts["S"], tmp / "v2.safetensors", tmp / "o.safetensors", allow_missing=True)
    assert "new.head" in s2.skipped
    o = load_any(tmp / "o.safetensors")
    assert "new.head" not in o


def test_fp16_overflow_allowed(tmp_path: Path) -> None:
    save_single(tmp_path / "b.safetensors", {"w": torch.tensor([60000.0, 1.0], dtype=torch.float16)})
    save_single(tmp_path / "a.safetensors", {"w": torch.tensor([-60000.0, 2.0], dtype=torch.float16)})
    capmerge.diff(tmp_path / "b.safetensors", tmp_path / "a.safetensors", tmp_path / "v.safetensors",
                  allow_nonfinite=True)  # fmt: skip
    v = load_any(tmp_path / "v.safetensors")["w"]
    assert torch.isinf(v[0]) and v[0] < 0 and v[1] == 1.0


def test_nonfinite_inputs_pass_through(tmp_path: Path) -> None:
    """NaN/Inf already present in an input is not an error (e.g. masks stored as -inf)."""
    save_single(tmp_path / "b.safetensors", {"m": torch.tensor([float("-inf"), 0.0]), "w": torch.ones(2)})
    save_single(tmp_path / "v.safetensors", {"m": torch.tensor([1.0, 1.0]), "w": torch.full((2,), 0.25)})
    capmerge.apply(tmp_path / "b.safetensors", tmp_path / "v.safetensors", tmp_path / "o.safetensors")
    o = load_any(tmp_path / "o.safetensors")
    assert torch.isinf(o["m"][0]) and o["m"][1] == 1.0


def test_integer_buffer_on_one_side_is_reported_not_an_error(ckpts: dict[str, Path]) -> None:
    """A position_ids buffer that newer transformers no longer saves must not block a diff."""
    tmp = ckpts["tmp"]
    a = load_any(ckpts["A"])
    del a["position_ids"]
    save_single(tmp / "a2.safetensors", a)
    s = capmerge.diff(ckpts["S"], tmp / "a2.safetensors", tmp / "v.safetensors")
    assert s.skipped == {"position_ids": "non-floating (I64), only in BASE"}
    assert "position_ids" not in load_any(tmp / "v.safetensors")


def _llama(d: Path, tied: bool, seed: int, head_from: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """A tiny Llama saved by transformers: tied (no lm_head.weight saved, as Llama 3.2 1B or Qwen2's small models) or
    with a head of its own; ``head_from``: its weights start from these (each moved a little). Returns its tensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=40, tie_word_embeddings=tied)  # fmt: skip
    model = LlamaForCausalLM(config)
    if head_from is not None:
        start = {**head_from, "lm_head.weight": head_from["model.embed_tokens.weight"]}
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(start[n] + 0.01 * torch.randn_like(p))
    model.save_pretrained(d)
    return load_any(d)


def test_tied_and_untied_heads_pair_in_diff_and_apply(tmp_path: Path, capsys) -> None:
    """A model whose config ties its head to its embeddings saves no lm_head.weight; transformers reads the embedding
    there. diff of it and a finetune with a head of its own: τ_head = head − embedding, either way round; apply of a
    vector with a head to a tied model: head = embedding + α·τ_head, written beside the embeddings, config untied
    (transformers loads that head). A vector without a head leaves an untied model's head as it is."""
    import json

    from transformers import AutoModelForCausalLM

    from capmerge.cli.app import main

    t = _llama(tmp_path / "T", True, 0)
    u = _llama(tmp_path / "U", False, 1, head_from=t)
    _llama(tmp_path / "T2", True, 2, head_from=t)
    head, embed = "lm_head.weight", "model.embed_tokens.weight"
    assert head not in t and head in u
    assert (
        main(["diff", str(tmp_path / "T"), str(tmp_path / "U"), "-o", str(tmp_path / "v"), "--dtype", "float32"]) == 0
    )
    assert "tied: BASE ties lm_head.weight to model.embed_tokens.weight" in capsys.readouterr().err
    v = load_any(tmp_path / "v")
    assert torch.equal(v[head], u[head] - t[embed]) and torch.equal(v[embed], u[embed] - t[embed])
    assert (
        main(["diff", str(tmp_path / "U"), str(tmp_path / "T"), "-o", str(tmp_path / "w"), "--dtype", "float32"]) == 0
    )
    assert torch.equal(load_any(tmp_path / "w")[head], t[embed] - u[head])

    assert main(["apply", str(tmp_path / "T"), str(tmp_path / "v"), "--alpha", "0.5", "-o", str(tmp_path / "o")]) == 0
    o = load_any(tmp_path / "o")
    assert torch.equal(o[head], t[embed] + 0.5 * v[head]) and torch.equal(o[embed], t[embed] + 0.5 * v[embed])
    assert json.loads((tmp_path / "o" / "config.json").read_text())["tie_word_embeddings"] is False
    assert json.loads((tmp_path / "T" / "config.json").read_text())["tie_word_embeddings"] is True  # input untouched
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "o")
    assert torch.equal(model.lm_head.weight, o[head]) and torch.equal(model.model.embed_tokens.weight, o[embed])

    # a vector of two tied models has no head: an untied model's head is not changed, its config not touched
    assert main(["diff", str(tmp_path / "T"), str(tmp_path / "T2"), "-o", str(tmp_path / "tv")]) == 0
    assert head not in load_any(tmp_path / "tv")
    assert main(["apply", str(tmp_path / "U"), str(tmp_path / "tv"), "-o", str(tmp_path / "uo")]) == 0
    uo = load_any(tmp_path / "uo")
    assert torch.equal(uo[head], u[head]) and not torch.equal(uo[embed], u[embed])
    assert (tmp_path / "uo" / "config.json").read_text() == (tmp_path / "U" / "config.json").read_text()


def test_a_missing_head_of_an_untied_model_stays_a_mismatch(tmp_path: Path, capsys) -> None:
    """Without the tie (config tie_word_embeddings false) a model lacking lm_head.weight lacks a tensor: named."""
    import json

    from test_merge_cli import fails

    t = _llama(tmp_path / "T", True, 0)
    _llama(tmp_path / "U", False, 1, head_from=t)
    cfg = json.loads((tmp_path / "T" / "config.json").read_text())
    (tmp_path / "T" / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": False}))
    capsys.readouterr()
    fails(["diff", tmp_path / "T", tmp_path / "U", "-o", tmp_path / "v"], tmp_path, capsys,
          "1 only in AUX (lm_head.weight)", "--allow-missing")  # fmt: skip


def test_a_tied_model_with_an_unreadable_config_is_one_error(tmp_path: Path, capsys) -> None:
    """The config.json that says whether a head is tied must be JSON: one error line naming it, exit 2, nothing
    written, the inputs untouched."""
    from test_merge_cli import fails

    t = _llama(tmp_path / "T", True, 0)
    _llama(tmp_path / "U", False, 1, head_from=t)
    (tmp_path / "T" / "config.json").write_text("{not json")
    capsys.readouterr()
    fails(["diff", tmp_path / "T", tmp_path / "U", "-o", tmp_path / "v"], tmp_path, capsys, "config.json",
          str(tmp_path / "T" / "config.json"))  # fmt: skip
