"""capmerge.ortho: the orthogonality loss against direct float64 computations from materialised tensors, gradients
against gradcheck, LoRA against materialised B·A, wrapper names, errors, and the behaviour of the hard/soft modes."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from capmerge.errors import CapmergeError, MismatchError, UsageError
from capmerge.ortho import (
    OrthogonalityLoss,
    canonical_name,
    orthogonality_penalty,
    project_gradients,
    project_updates,
)

MODES = ["cosine2", "projection2", "abs"]


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.attn = nn.Linear(width, width)
        self.mlp = nn.Linear(width, 7)
        self.out = nn.Linear(7, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.out(torch.tanh(self.mlp(torch.tanh(self.attn(x)))))


class Tiny(nn.Module):
    """Transformer-like names (layers.<i>.*), odd shapes: (1,), (7,), (4097,)."""

    def __init__(self, width: int = 6, seed: int = 0, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(11, width)
        self.layers = nn.ModuleList([Block(width) for _ in range(2)])
        self.head = nn.Linear(width, 1)
        self.big = nn.Parameter(torch.randn(4097) * 0.1)
        self.to(dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.layers:
            x = block(x)
        return self.head(x).squeeze(-1).mean(-1) + self.big[:3].sum()


def vector_for(model: nn.Module, seed: int = 1, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=g).to(dtype or p.dtype) for n, p in model.named_parameters()}


def perturb(model: nn.Module, scale: float = 0.01, seed: int = 2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_((torch.randn(p.shape, generator=g) * scale).to(p.dtype))


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def direct(params, ref, taus, *, mode, reduction="mean", basis="sum", eps=1e-3, names=None):
    """Independent float64 reference: flatten, materialise Δ, dot products; QR (not Gram–Schmidt) for the basis;
    cosine2's ε_l = eps·‖θ_ref,l‖ (with ε = 1e-12 below it)."""
    taus = taus if isinstance(taus, list) else [taus]
    terms = []
    for name in names or params:
        present = [t[name].double().reshape(-1) for t in taus if name in t]
        if not present:
            continue
        d = (params[name].double() - ref[name].double()).reshape(-1)
        if basis == "orthonormal":
            q, _ = torch.linalg.qr(torch.stack(present, dim=1))
            units = list(q.T)
        else:
            units = [t / t.norm() for t in present]
        p = torch.stack([torch.dot(d, u) for u in units])
        if mode == "cosine2":
            terms.append(float((p**2).sum() / (d @ d + (eps * ref[name].double().norm()) ** 2 + 1e-24)))
        elif mode == "projection2":
            terms.append(float((p**2).sum()))
        else:
            terms.append(float((p**2).sum().sqrt()) if basis == "orthonormal" else float(p.abs().sum()))
    return sum(terms) / (len(terms) if reduction == "mean" else 1)


def close(a, b: float, rtol: float, atol: float = 0.0) -> None:
    a = float(a.detach()) if isinstance(a, torch.Tensor) else a
    assert abs(a - b) <= atol + rtol * abs(b), f"got {a!r}, expected {b!r} (diff {a - b:.3e})"


# ---------------------------------------------------------------------------------------------------------- values
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("mode", MODES)
def test_value_matches_direct_computation(mode: str, reduction: str) -> None:
    model = Tiny()
    tau = vector_for(model)
    ref = snapshot(model)
    reg = OrthogonalityLoss(model, tau, mode=mode, reduction=reduction, weight=0.5)
    assert reg.names == list(tau)
    perturb(model)
    value = reg()
    assert value.dtype == torch.float32 and value.dim() == 0 and value.requires_grad
    expected = 0.5 * direct(snapshot(model), ref, tau, mode=mode, reduction=reduction)
    close((value), expected, rtol=2e-5, atol=1e-9)
    # the functional form agrees too
    deltas = {n: p - ref[n] for n, p in model.named_parameters()}
    close(0.5 * orthogonality_penalty(deltas, tau, mode=mode, reduction=reduction, references=ref), expected, rtol=2e-5)


class Pair(nn.Module):
    """Two 2-vectors a, b; θ_ref = 0, θ = (1, 0) and (1, 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.zeros(2))
        self.b = nn.Parameter(torch.zeros(2))


@pytest.mark.parametrize(
    ("mode", "reduction", "expected"),
    [
        # cos²: a: Δ=(1,0) vs τ1=(1,0): 1, vs τ2=(1,1): 1/2; b: Δ=(1,1) vs (0,1): 1/2, vs (1,0): 1/2.
        # Per tensor the vectors add: a 3/2, b 1; the mean over the 2 tensors is 5/4 (not 5/8 over 4 pairs).
        ("cosine2", None, 0.2 * 5 / 4),
        ("cosine2", "sum", 0.2 * 5 / 2),
        # ⟨Δ, τ̂⟩²: a: 1 and 1/2; b: ⟨(1,1),(0,1)⟩² = 1 and ⟨(1,1),(1,0)⟩² = 1 → (3/2 + 2) / 2
        ("projection2", None, 0.2 * 7 / 4),
        # |⟨Δ, τ̂⟩|: a: 1 + 1/√2; b: 1 + 1 → mean
        ("abs", None, 0.2 * (1 + 2**-0.5 + 2) / 2),
    ],
)
def test_default_reduction_is_the_mean_over_tensors_with_two_vectors(mode, reduction, expected) -> None:
    model = Pair()
    taus = [{"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([0.0, 1.0])},
            {"a": torch.tensor([1.0, 1.0]), "b": torch.tensor([1.0, 0.0])}]  # fmt: skip
    options = {} if reduction is None else {"reduction": reduction}
    reg = OrthogonalityLoss(model, taus, mode=mode, weight=0.2, **options)
    with torch.no_grad():
        model.a.copy_(torch.tensor([1.0, 0.0]))
        model.b.copy_(torch.tensor([1.0, 1.0]))
    close(reg(), expected, rtol=1e-6)
    deltas = {"a": model.a.detach(), "b": model.b.detach()}
    zero = {n: torch.zeros(2) for n in deltas}  # θ_ref = 0: ε_l is the floor 1e-12
    close(0.2 * orthogonality_penalty(deltas, taus, mode=mode, references=zero, **options), expected, rtol=1e-6)


@pytest.mark.parametrize("n", [100, 1000])
def test_weight_means_the_same_for_100_and_1000_tensors(n: int) -> None:
    model = nn.ParameterList([nn.Parameter(torch.zeros(2)) for _ in range(n)])
    tau = {str(i): torch.tensor([1.0, 1.0]) for i in range(n)}
    reg = OrthogonalityLoss(model, tau, weight=0.1)
    total = OrthogonalityLoss(model, tau, weight=0.1, reduction="sum")
    with torch.no_grad():
        for p in model:
            p.copy_(torch.tensor([1.0, 0.0]))  # cos²(Δ, τ) = 1/2 in every tensor
    close(reg(), 0.1 * 0.5, rtol=1e-6)
    close(total(), 0.1 * 0.5 * n, rtol=1e-6)


@pytest.mark.parametrize("keep", [True, False])
def test_projection_modes_with_and_without_reference_copy(keep: bool) -> None:
    model = Tiny()
    tau = vector_for(model)
    ref = snapshot(model)
    reg = OrthogonalityLoss(model, tau, mode="projection2", keep_reference=keep)
    assert any(n.startswith("_r") for n in reg._store) == keep
    perturb(model, scale=0.05)
    close((reg()), direct(snapshot(model), ref, tau, mode="projection2"), rtol=1e-4)
    report = reg.report()
    assert (report["cos"] is None) == (not keep) and (report["delta_norm"] is None) == (not keep)


@pytest.mark.parametrize("basis", ["sum", "orthonormal"])
@pytest.mark.parametrize("mode", MODES)
def test_several_vectors(mode: str, basis: str) -> None:
    model = Tiny()
    taus = [vector_for(model, seed=1), vector_for(model, seed=5)]
    del taus[1]["head.bias"]  # a vector may cover fewer tensors
    ref = snapshot(model)
    reg = OrthogonalityLoss(model, taus, mode=mode, basis=basis)
    perturb(model)
    close((reg()), direct(snapshot(model), ref, taus, mode=mode, basis=basis), rtol=5e-5)


def test_abs_with_an_orthonormal_basis_is_the_norm_of_the_projection() -> None:
    """Δ = (3, 4, 12), τ1 = (1, 0, 0), τ2 = (1, 1, 0): the basis spans the first two axes, so ‖P·Δ‖ = ‖(3, 4)‖ = 5
    (by hand), for the module and for the functional form."""
    model = nn.ParameterList([nn.Parameter(torch.zeros(3))])
    taus = [{"0": torch.tensor([1.0, 0.0, 0.0])}, {"0": torch.tensor([1.0, 1.0, 0.0])}]
    reg = OrthogonalityLoss(model, taus, mode="abs", basis="orthonormal", weight=1.0)
    with torch.no_grad():
        model[0].copy_(torch.tensor([3.0, 4.0, 12.0]))
    close(reg(), 5.0, rtol=1e-6)
    close(orthogonality_penalty({"0": model[0].detach()}, taus, mode="abs", basis="orthonormal"), 5.0, rtol=1e-6)


def test_a_tensor_read_in_two_cpu_chunks() -> None:
    """1.5 M elements: ‖Δ‖² is summed over two 2^20-element chunks on the CPU. Δ = 1 everywhere, τ = 1 on the first
    three elements: cos² = ⟨Δ, τ̂⟩² / ‖Δ‖² = (3/√3)² / n = 3 / n (by hand)."""
    n = 3 << 19
    model = nn.ParameterList([nn.Parameter(torch.zeros(n))])
    tau = torch.zeros(n)
    tau[:3] = 1.0
    reg = OrthogonalityLoss(model, {"0": tau}, mode="cosine2", weight=1.0)
    with torch.no_grad():
        model[0].fill_(1.0)
    close(reg(), 3.0 / n, rtol=1e-5)


def test_orthonormal_basis_drops_dependent_vectors() -> None:
    model = Tiny()
    tau = vector_for(model)
    twice = {n: 2 * t for n, t in tau.items()}
    ref = snapshot(model)
    reg = OrthogonalityLoss(model, [tau, twice], mode="projection2", basis="orthonormal")
    assert all(t.k == 1 for t in reg._targets)
    perturb(model)
    close((reg()), direct(snapshot(model), ref, tau, mode="projection2"), rtol=1e-4)


@pytest.mark.parametrize("store", [None, torch.float32])
@pytest.mark.parametrize("mode", MODES)
def test_bf16_parameters_reduce_in_float32(mode: str, store: torch.dtype | None) -> None:
    model = Tiny(dtype=torch.bfloat16)
    tau = vector_for(model)
    ref = snapshot(model)
    reg = OrthogonalityLoss(model, tau, mode=mode, dtype=store)
    assert all(b.dtype == (store or torch.bfloat16) for n, b in reg._store.items() if n.startswith("_u"))
    perturb(model, scale=0.05)
    value = reg()
    assert value.dtype == torch.float32
    # τ is stored in bf16 (8 bits): the reference uses the same rounded τ, the sums must then agree to float32 level
    taus = {n: reg._store[t.u].float().reshape(tau[n].shape) for n, t in zip(reg.names, reg._targets, strict=True)}
    close((value), direct(snapshot(model), ref, taus, mode=mode), rtol=1e-4, atol=1e-7)
    close((value), direct(snapshot(model), ref, tau, mode=mode), rtol=3e-2)
    value.backward()
    assert all(p.grad.dtype == torch.bfloat16 for p in model.parameters() if p.grad is not None)


def test_autocast_does_not_change_the_result() -> None:
    model = Tiny()
    reg = OrthogonalityLoss(model, vector_for(model))
    perturb(model)
    plain = float(reg())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = reg()
    assert inside.dtype == torch.float32 and float(inside) == plain


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"include": r"^layers\."}, lambda n: n.startswith("layers.")),
        ({"exclude": [r"bias$", r"^big$"]}, lambda n: not n.endswith("bias") and n != "big"),
        ({"layers": "1"}, lambda n: n.startswith("layers.1.")),
        ({"layers": "0", "exclude": "attn"}, lambda n: n.startswith("layers.0.") and "attn" not in n),
    ],
)
def test_masks_select_tensors(options, expected) -> None:
    model = Tiny()
    tau = vector_for(model)
    ref = snapshot(model)
    reg = OrthogonalityLoss(model, tau, mode="projection2", **options)
    names = [n for n in tau if expected(n)]
    assert reg.names == names
    perturb(model)
    close((reg()), direct(snapshot(model), ref, tau, mode="projection2", names=names), rtol=1e-4)


def test_reference_checkpoint_and_vector_path(tmp_path) -> None:
    model = Tiny()
    tau = vector_for(model)
    (tmp_path / "vec").mkdir()
    save_file(tau, str(tmp_path / "vec" / "capvector.safetensors"))
    meta = snapshot(model)
    save_file(meta, str(tmp_path / "meta.safetensors"))
    perturb(model)  # the loss is built later, but Δ is measured from the checkpoint
    vec = tmp_path / "vec" / "capvector.safetensors"
    reg = OrthogonalityLoss(model, vec, reference=str(tmp_path / "meta.safetensors"))
    close((reg()), direct(snapshot(model), meta, tau, mode="cosine2"), rtol=2e-5)
    reg = OrthogonalityLoss(model, str(tmp_path / "vec"), mode="abs", reference=meta)  # a directory
    close((reg()), direct(snapshot(model), meta, tau, mode="abs"), rtol=1e-4)


# ------------------------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("basis", ["sum", "orthonormal"])
@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_float64(mode: str, basis: str) -> None:
    model = Tiny(width=3, dtype=torch.float64)
    model.big = nn.Parameter(torch.randn(5, dtype=torch.float64))
    taus = [vector_for(model, seed=1), vector_for(model, seed=3)]
    ref = {n: p.detach() - 0.3 * torch.randn_like(p) for n, p in model.named_parameters()}  # Δ far from 0
    reg = OrthogonalityLoss(model, taus, mode=mode, basis=basis, reference=ref, reduction="mean", weight=0.7)
    params = tuple(model.parameters())
    assert torch.autograd.gradcheck(lambda *_: reg(), params, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_cosine2_is_zero_with_zero_gradient_at_step_0() -> None:
    model = Tiny()
    reg = OrthogonalityLoss(model, vector_for(model), mode="cosine2")
    value = reg()
    value.backward()
    assert float(value) == 0.0
    assert all(p.grad is None or (torch.isfinite(p.grad).all() and not p.grad.any()) for p in model.parameters())


def test_gradient_matches_autograd_of_materialised_delta() -> None:
    model = Tiny()
    tau = vector_for(model)
    ref = snapshot(model)
    reg = OrthogonalityLoss(model, tau, mode="cosine2", weight=2.0)
    perturb(model)
    reg().backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    (2.0 * orthogonality_penalty({n: p - ref[n] for n, p in model.named_parameters()}, tau, references=ref)).backward()
    for n, p in model.named_parameters():
        if p.numel() > 1:  # cos² of a 1-element tensor is 1 for any Δ ≠ 0: its gradient is rounding noise
            torch.testing.assert_close(ours[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


# ------------------------------------------------------------------------------------------------------------ LoRA
def peft_model(*, rslora: bool = False, targets=("attn", "mlp", "embed"), dtype=torch.float32, adapters=1):
    peft = pytest.importorskip("peft")
    model = Tiny(dtype=dtype)
    config = peft.LoraConfig(r=2, lora_alpha=3, target_modules=list(targets), use_rslora=rslora)
    wrapped = peft.get_peft_model(model, config)
    for extra in range(1, adapters):
        wrapped.add_adapter(f"extra{extra}", peft.LoraConfig(r=3, lora_alpha=5, target_modules=list(targets)))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in wrapped.named_parameters():
            if "lora_" in n:  # B = 0 at init: give the adapters a real update
                p.copy_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.3)
    return wrapped


def lora_deltas(wrapped) -> dict[str, torch.Tensor]:
    """Materialised Δ = Σ_a get_delta_weight(a) per base weight, by canonical name."""
    out = {}
    for mname, mod in wrapped.named_modules():
        if hasattr(mod, "get_delta_weight") and hasattr(mod, "lora_A"):
            active = [a for a in mod.scaling if a in (list(mod.lora_A) + list(getattr(mod, "lora_embedding_A", {})))]
            out[canonical_name(mname + ".weight")] = sum(mod.get_delta_weight(a) for a in active)
    return out


def lora_bases(wrapped) -> dict[str, torch.Tensor]:
    """The base weight of every LoRA layer (its θ_ref, for cosine2's ε_l), by canonical name."""
    layers = [(n, m) for n, m in wrapped.named_modules() if hasattr(m, "get_delta_weight") and hasattr(m, "lora_A")]
    return {canonical_name(n + ".weight"): m.get_base_layer().weight.detach() for n, m in layers}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rslora", [False, True])
def test_lora_matches_materialised_update(mode: str, rslora: bool) -> None:
    wrapped = peft_model(rslora=rslora)
    base = {canonical_name(n): p for n, p in wrapped.named_parameters() if "lora_" not in n}
    tau = {n: torch.randn(p.shape) for n, p in base.items()}
    reg = OrthogonalityLoss(wrapped, tau, mode=mode, weight=1.5)
    lora_names = [n for n in reg.names if any(k in n for k in ("attn", "mlp", "embed"))]
    assert sorted(lora_names) == sorted(lora_deltas(wrapped))
    assert "layers.0.attn.weight" in lora_names and "embed.weight" in lora_names
    assert "layers.0.attn.bias" in reg.frozen and "layers.0.attn.bias" not in reg.names  # PEFT froze the base
    value = reg()
    value.backward()
    grads = {n: p.grad.clone() for n, p in wrapped.named_parameters() if "lora_" in n}
    wrapped.zero_grad()
    deltas = lora_deltas(wrapped)
    expected = orthogonality_penalty(deltas, tau, mode=mode, references=lora_bases(wrapped))
    close((value), 1.5 * float(expected), rtol=1e-5)
    (1.5 * expected).backward()
    for n, p in wrapped.named_parameters():
        if "lora_" in n:
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
    report = reg.report()["tensors"]["layers.1.mlp.weight"]
    d, t = deltas["layers.1.mlp.weight"].double(), tau["layers.1.mlp.weight"].double()
    close(report["delta_norm"], float(d.norm()), rtol=1e-5)
    close(report["cos"], float((d * t).sum() / d.norm() / t.norm()), rtol=1e-4, atol=1e-7)


def test_lora_several_adapters_and_gradcheck() -> None:
    wrapped = peft_model(targets=("attn",), adapters=2)
    for mod in wrapped.modules():
        if hasattr(mod, "set_adapter") and hasattr(mod, "lora_A"):
            mod.set_adapter(["default", "extra1"])  # both adapters active and trainable
    tau = {n: torch.randn(p.shape, dtype=torch.float64) for n, p in lora_deltas(wrapped).items()}
    with torch.no_grad():
        wrapped.double()
    reg = OrthogonalityLoss(wrapped, tau, mode="cosine2", ignore_unmatched=True)
    assert [len(t.lora.adapters) for t in reg._targets] == [2, 2]
    close((reg()), float(orthogonality_penalty(lora_deltas(wrapped), tau, references=lora_bases(wrapped))), rtol=1e-10)
    factors = tuple(p for n, p in wrapped.named_parameters() if "lora_" in n)
    assert torch.autograd.gradcheck(lambda *_: reg(), factors, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_lora_fan_in_fan_out_gpt2() -> None:
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    config = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=13, n_positions=8)
    torch.manual_seed(0)
    model = transformers.GPT2Model(config)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=2, target_modules=["c_attn"],
                                                         fan_in_fan_out=True))  # fmt: skip
    with torch.no_grad():
        for n, p in wrapped.named_parameters():
            if "lora_" in n:
                p.normal_()
    name = "h.0.attn.c_attn.weight"  # Conv1D: weight is (in, out), Δ = (B·A)ᵀ
    tau = {name: torch.randn(8, 24)}
    reg = OrthogonalityLoss(wrapped, tau, mode="projection2")
    close((reg()), float(orthogonality_penalty(lora_deltas(wrapped), tau, mode="projection2")), rtol=1e-5)


def test_lora_bf16_base_stores_tau_in_base_dtype() -> None:
    wrapped = peft_model(targets=("mlp",))
    for mod in wrapped.modules():
        if hasattr(mod, "base_layer"):
            mod.base_layer.to(torch.bfloat16)
    tau = {n: torch.randn(d.shape) for n, d in lora_deltas(wrapped).items()}
    reg = OrthogonalityLoss(wrapped, tau, mode="cosine2", ignore_unmatched=True)
    assert {reg._store[t.u].dtype for t in reg._targets} == {torch.bfloat16}
    value = reg()
    assert value.dtype == torch.float32
    close((value), float(orthogonality_penalty(lora_deltas(wrapped), tau, references=lora_bases(wrapped))), rtol=2e-2)


# ----------------------------------------------------------------------------------------------------------- names
def test_canonical_names() -> None:
    peft_name = "base_model.model.encoder.layer.0.attention.self.query.lora_A.default.weight"
    assert canonical_name(peft_name) == "encoder.layer.0.attention.self.query.lora_A.default.weight"
    assert canonical_name("base_model.model.encoder.layer.0.attention.self.query.base_layer.weight") == (
        "encoder.layer.0.attention.self.query.weight"
    )
    assert canonical_name("module._orig_mod.layers.0.w") == "layers.0.w"
    assert canonical_name("_orig_mod.module.layers.0._checkpoint_wrapped_module.w") == "layers.0.w"
    assert canonical_name("base_model.model.classifier.modules_to_save.default.weight") == "classifier.weight"
    assert canonical_name("module") == "module"


def test_peft_bert_lora_names_map_to_base_weight() -> None:
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    config = transformers.BertConfig(vocab_size=17, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=12, max_position_embeddings=16)  # fmt: skip
    model = peft.get_peft_model(transformers.BertModel(config), peft.LoraConfig(r=2, target_modules=["query"]))
    names = [n for n, _ in model.named_parameters() if "lora_A" in n]
    assert names == ["base_model.model.encoder.layer.0.attention.self.query.lora_A.default.weight"]
    tau = {"encoder.layer.0.attention.self.query.weight": torch.randn(8, 8)}
    reg = OrthogonalityLoss(model, tau)
    assert reg.names == ["encoder.layer.0.attention.self.query.weight"] and reg._targets[0].lora is not None
    assert float(reg()) == 0.0  # B = 0 at init: Δ = 0


class Wrapper(nn.Module):
    """What DDP looks like from the outside: the model under ``.module``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


@pytest.mark.parametrize("wrap", ["ddp", "compile", "both"])
@pytest.mark.parametrize("vector_prefix", ["", "module.", "_orig_mod."])
def test_wrapper_prefixes_either_side(wrap: str, vector_prefix: str) -> None:
    model = Tiny()
    tau = vector_for(model)
    ref = snapshot(model)
    wrapped: nn.Module = model
    if wrap in ("ddp", "both"):
        wrapped = Wrapper(wrapped)
    if wrap in ("compile", "both"):
        wrapped = torch.compile(wrapped)  # compiles lazily, never here: only the names change
    assert next(iter(dict(wrapped.named_parameters()))) != "embed.weight"
    reg = OrthogonalityLoss(wrapped, {vector_prefix + n: t for n, t in tau.items()}, mode="projection2")
    assert reg.names == list(tau)
    perturb(model)
    close((reg(wrapped)), direct(snapshot(model), ref, tau, mode="projection2"), rtol=1e-4)


def test_tied_parameters_are_counted_once() -> None:
    model = Tiny()
    tau = vector_for(model)
    model.tied = model.embed.weight  # a second name for one parameter (tied embeddings)
    tau["tied"] = tau["embed.weight"]
    reg = OrthogonalityLoss(model, tau, ignore_unmatched=True)
    assert reg.names.count("embed.weight") == 1


# ---------------------------------------------------------------------------------------------------------- errors
def test_unmatched_and_shape_mismatch_errors() -> None:
    model = Tiny()
    tau = vector_for(model)
    tau["nope.weight"] = torch.zeros(3)
    tau["other.bias"] = torch.ones(2)
    with pytest.raises(MismatchError, match=r"2 vector tensors match no parameter.*nope\.weight.*other\.bias"):
        OrthogonalityLoss(model, tau)
    reg = OrthogonalityLoss(model, tau, ignore_unmatched=True)
    assert reg.unmatched == ["nope.weight", "other.bias"]
    bad = vector_for(model)
    bad["head.weight"] = torch.zeros(2, 6)
    with pytest.raises(MismatchError, match=r"differ in shape.*head\.weight \(2, 6\) vs \(1, 6\)") as err:
        OrthogonalityLoss(model, bad, ignore_unmatched=True)
    assert isinstance(err.value, CapmergeError) and isinstance(err.value, ValueError)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"mode": "cos"}, UsageError, "mode must be one of"),
        ({"reduction": "max"}, UsageError, "reduction must be one of"),
        ({"basis": "qr"}, UsageError, "basis must be one of"),
        ({"eps": -1.0}, UsageError, "eps"),
        ({"keep_reference": False}, UsageError, "needs"),
        ({"include": "^nothing$"}, MismatchError, "select no tensor"),
        ({"include": "("}, UsageError, "invalid --include regex"),
        ({"reference": {"embed.weight": torch.zeros(11, 6)}}, MismatchError, "reference has no tensor"),
    ],
)
def test_bad_options(kwargs, error, message) -> None:
    model = Tiny()
    with pytest.raises(error, match=message):
        OrthogonalityLoss(model, vector_for(model), **kwargs)


def test_non_finite_vector_frozen_and_zero_tensors() -> None:
    model = Tiny()
    tau = vector_for(model)
    tau["head.bias"] = torch.tensor([float("nan")])
    with pytest.raises(MismatchError, match="NaN"):
        OrthogonalityLoss(model, tau)
    tau = vector_for(model)
    tau["head.bias"] = torch.zeros(1)
    model.embed.weight.requires_grad_(False)
    reg = OrthogonalityLoss(model, tau)
    assert reg.zero == ["head.bias"] and reg.frozen == ["embed.weight"]
    assert "head.bias" not in reg.names and "embed.weight" not in reg.names
    with pytest.raises(MismatchError, match="another model"):
        reg(Tiny())


# ------------------------------------------------------------------------------------------------------- reporting
def test_report_per_tensor_layer_and_total() -> None:
    model = Tiny()
    tau = vector_for(model)
    ref = snapshot(model)
    reg = OrthogonalityLoss(model, tau, weight=0.25)
    perturb(model)
    now = snapshot(model)
    rep = reg.report()
    d = {n: (now[n] - ref[n]).double().reshape(-1) for n in tau}
    t = {n: tau[n].double().reshape(-1) for n in tau}
    for n in tau:
        close(rep["tensors"][n]["cos"], float(d[n] @ t[n] / d[n].norm() / t[n].norm()), rtol=1e-4, atol=1e-7)
        close(rep["tensors"][n]["proj"], float(d[n] @ t[n] / t[n].norm()), rtol=1e-4, atol=1e-9)
        close(rep["tensors"][n]["delta_norm"], float(d[n].norm()), rtol=1e-5)
    block = [n for n in tau if n.startswith("layers.1.")]
    dl, tl = torch.cat([d[n] for n in block]), torch.cat([t[n] for n in block])
    close(rep["layers"][1]["cos"], float(dl @ tl / dl.norm() / tl.norm()), rtol=1e-4, atol=1e-7)
    da, ta = torch.cat(list(d.values())), torch.cat(list(t.values()))
    close(rep["cos"], float(da @ ta / da.norm() / ta.norm()), rtol=1e-4, atol=1e-7)
    close(rep["loss"], 0.25 * direct(now, ref, tau, mode="cosine2"), rtol=1e-5)
    assert list(rep["layers"]) == [0, 1, "other"]
    flat = reg.report(flat=True, per_tensor=False)
    assert flat["ortho/cos"] == pytest.approx(rep["cos"]) and "ortho/layer1/cos" in flat
    assert all(isinstance(v, float) for v in flat.values())
    several = OrthogonalityLoss(model, [tau, vector_for(model, seed=9)], reference=ref).report(flat=True)
    assert "ortho/cos/v0" in several and "ortho/cos/v1" in several


# ------------------------------------------------------------------------------------------------------- behaviour
def regression_task(seed: int = 0):
    """A small MLP regression problem and a vector along which plain training clearly moves."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 8, generator=g)
    y = torch.sin(x @ torch.randn(8, 3, generator=g))
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    loss = nn.functional.mse_loss(model(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    # τ: the descent direction plus noise, so that an unconstrained run ends up with a large cos(Δ, τ)
    tau = {n: -gr / gr.norm() + 0.5 * torch.randn(gr.shape, generator=g) / math.sqrt(gr.numel())
           for (n, _), gr in zip(model.named_parameters(), grads, strict=True)}  # fmt: skip
    return model, x, y, tau


def total_cos(model: nn.Module, ref: dict, tau: dict) -> float:
    d = torch.cat([(p.detach() - ref[n]).double().reshape(-1) for n, p in model.named_parameters()])
    t = torch.cat([tau[n].double().reshape(-1) for n, _ in model.named_parameters()])
    return float(d @ t / d.norm() / t.norm())


def max_tensor_cos(model: nn.Module, ref: dict, tau: dict) -> float:
    out = 0.0
    for n, p in model.named_parameters():
        d, t = (p.detach() - ref[n]).double().reshape(-1), tau[n].double().reshape(-1)
        if d.norm() > 0:
            out = max(out, abs(float(d @ t / d.norm() / t.norm())))
    return out


def test_project_gradients_with_sgd_keeps_update_orthogonal() -> None:
    model, x, y, tau = regression_task()
    ref = snapshot(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    other = vector_for(model, seed=4)
    del other["2.bias"]  # 2 of 3 dimensions removed would leave Δ so small that fp32 rounding of θ shows in cos
    with project_gradients(model, [tau, other]) as handle:
        assert handle.names == list(tau)
        for _ in range(50):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    assert max_tensor_cos(model, ref, tau) <= 1e-5
    handle.remove()  # idempotent
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()  # hooks gone: the raw gradient has a τ component again
    assert abs(sum(float((p.grad * tau[n]).sum()) for n, p in model.named_parameters())) > 1e-3


@pytest.mark.parametrize("hard", ["gradients_in_step", "updates"])
def test_hard_modes_with_optimizer_hooks(hard: str) -> None:
    model, x, y, tau = regression_task()
    ref = snapshot(model)
    if hard == "updates":  # AdamW with weight decay: only projecting the update keeps it exact
        opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
        handle = project_updates(model, tau, opt)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        handle = project_gradients(model, tau, optimizer=opt)
    for _ in range(50):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    handle.remove()
    assert max_tensor_cos(model, ref, tau) <= 1e-5


def test_project_gradients_refuses_lora() -> None:
    wrapped = peft_model(targets=("attn",))
    with pytest.raises(UsageError, match="LoRA"):
        project_gradients(wrapped, {n: torch.randn(d.shape) for n, d in lora_deltas(wrapped).items()})


@pytest.mark.parametrize(
    ("mode", "weight", "margin"), [("cosine2", 0.4, 0.3), ("projection2", 1.0, 0.1), ("abs", 0.2, 0.1)]
)  # λ of the mean over the model's 4 tensors
def test_loss_keeps_cosine_far_below_unregularised_run(mode: str, weight: float, margin: float) -> None:
    results = {}
    for use in (False, True):
        model, x, y, tau = regression_task()
        ref = snapshot(model)
        reg = OrthogonalityLoss(model, tau, mode=mode, weight=weight) if use else None
        opt = torch.optim.AdamW(model.parameters(), lr=0.01)
        for _ in range(60):
            loss = nn.functional.mse_loss(model(x), y)
            if reg is not None:
                loss = loss + reg()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            results[use] = (abs(total_cos(model, ref, tau)), float(nn.functional.mse_loss(model(x), y)))
    (cos_off, loss_off), (cos_on, loss_on) = results[False], results[True]
    # τ is built from the task's own descent direction, the worst case: the unconstrained run follows it
    assert cos_off > 0.25, results
    assert cos_on < margin * cos_off, results
    assert loss_on < 2.0 * loss_off, results  # and the task still trains


# ------------------------------------------------------------------------------------------------- transformers
def test_trainer_mixin_adds_and_logs_the_term(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    from capmerge.integrations import OrthogonalityTrainer

    config = transformers.BertConfig(vocab_size=23, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=12, max_position_embeddings=16, num_labels=2,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    tau = {n: torch.randn(p.shape) for n, p in model.named_parameters() if ".layer.0." in n}
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(1, 23, (6,), generator=g), "labels": torch.tensor(i % 2)} for i in range(8)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, learning_rate=1e-2, disable_tqdm=True,
    )  # fmt: skip
    trainer = OrthogonalityTrainer(
        model=model,
        args=args,
        train_dataset=data,
        ortho_vector=tau,
        ortho_options={"weight": 0.5, "mode": "projection2", "keep_reference": True},
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 3 and all("ortho/loss" in e and "ortho/cos" in e for e in logs), logs
    assert logs[0]["ortho/loss"] == 0.0 and logs[-1]["ortho/loss"] > 0.0  # Δ = 0 at the first step
    reg = trainer.ortho_loss
    assert logs[-1]["ortho/cos"] == pytest.approx(reg.report()["cos"])
    # the returned loss is the task loss plus the term, which carries a gradient
    batch = {"input_ids": torch.stack([d["input_ids"] for d in data[:2]]), "labels": torch.tensor([0, 1])}
    model.train()
    with torch.no_grad():
        task = float(model(**batch).loss)
        total = float(trainer.compute_loss(model, batch))
    assert total == pytest.approx(task + float(reg().detach()), rel=1e-5)


def test_module_casts_move_but_keep_dtypes() -> None:
    model = Tiny()
    reg = OrthogonalityLoss(model, vector_for(model))
    perturb(model)
    before = float(reg().detach())
    dtypes = {n: b.dtype for n, b in reg._store.items()}
    parent = nn.Module()
    parent.reg = reg
    parent.to(torch.bfloat16)  # e.g. a LightningModule in bf16-true precision
    assert {n: b.dtype for n, b in reg._store.items()} == dtypes
    assert float(reg().detach()) == before
    # no parameters or buffers: DDP does not broadcast τ, checkpoints do not hold it
    assert reg.state_dict() == {} and list(reg.buffers()) == [] and list(reg.parameters()) == []


# ------------------------------------------------------------------------------------------------------- training
class _Attention(nn.Module):
    """An embedding of which a batch uses few rows, one attention block, a LayerNorm: the gradient patterns of a
    transformer finetune (rows without a gradient, a key bias whose gradient is rounding only)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(500, 32)
        self.q, self.k, self.v, self.out = (nn.Linear(32, 32) for _ in range(4))
        self.norm = nn.LayerNorm(32)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        a = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2) / 32**0.5, -1) @ self.v(x)
        return self.out(self.norm(x + a))


def _train_cos2(weight: float, eps: float | None, steps: int = 30) -> float:
    """AdamW (lr 1e-4) from weights of std 0.05, τ random (unrelated to the task, as a capability vector mostly is
    to another task's gradient); the mean over tensors of cos²(Δ_l, τ_l) at the end, computed here in float64."""
    torch.manual_seed(0)
    model = _Attention()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.05)
    ids = torch.randint(0, 20, (8, 12))
    gen = torch.Generator().manual_seed(1)
    tau = {n: torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()}
    ref = snapshot(model)
    reg = OrthogonalityLoss(model, tau, weight=weight, **({} if eps is None else {"eps": eps}))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for _ in range(steps):
        loss = model(ids).pow(2).mean() + reg()
        opt.zero_grad()
        loss.backward()
        opt.step()
    cos2 = []
    for n, p in model.named_parameters():
        d, t = (p.detach() - ref[n]).double().reshape(-1), tau[n].double().reshape(-1)
        cos2.append(float(d @ t) ** 2 / float(d @ d) / float(t @ t))
    return sum(cos2) / len(cos2)


def test_cosine2_lowers_the_alignment_training_would_have() -> None:
    """With the default ε_l (1e-3·‖θ_ref,l‖) the loss keeps Δ further from τ than training without it (measured:
    mean cos² 3e-4 against 0.019). A plain cos² (ε = 1e-12) does the opposite (0.051): its stiffness 2/‖Δ‖² makes its
    gradient overshoot in the first steps, and AdamW turns each overshoot into a step along sign(τ)."""
    plain = _train_cos2(0.0, None)
    assert _train_cos2(0.1, None) < 0.1 * plain
    assert _train_cos2(0.1, 1e-12) > plain  # the failure the default ε avoids
