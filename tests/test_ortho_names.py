"""capmerge.ortho: a vector attaches to models whose names carry wrapper or base-model prefixes, ``rename=``, and
every hint of the module's error messages, followed (each must lead to a working loss).

Values are checked against ``direct`` (tests/test_ortho.py: float64 from materialised tensors) with the names paired
by hand.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from test_ortho import Tiny, close, direct, perturb, snapshot, vector_for  # noqa: E402

from capmerge.errors import MismatchError, UsageError  # noqa: E402
from capmerge.io.names import pair_names, rename_names  # noqa: E402
from capmerge.ortho import OrthogonalityLoss, project_gradients, project_updates  # noqa: E402


def check_value(model: nn.Module, reg: OrthogonalityLoss, tau: dict, names: dict[str, str], mode: str) -> None:
    """Perturb ``model`` and compare ``reg()`` with ``direct`` on the model's tensors (``names``: vector → model)."""
    ref = snapshot(model)
    perturb(model)
    now = snapshot(model)
    expected = direct({v: now[m] for v, m in names.items()}, {v: ref[m] for v, m in names.items()}, tau, mode=mode)
    close(reg(), expected, rtol=1e-4, atol=1e-9)


# ----------------------------------------------------------------------------------------------- transformers heads
def head_models():
    transformers = pytest.importorskip("transformers")
    bert = transformers.BertConfig(vocab_size=17, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=12, max_position_embeddings=16, num_labels=2)  # fmt: skip
    llama = transformers.LlamaConfig(vocab_size=17, hidden_size=8, intermediate_size=12, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=1,
                                     tie_word_embeddings=False)  # fmt: skip
    gpt2 = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=13, n_positions=8)
    return {
        "bert.": (transformers.BertModel, transformers.BertForSequenceClassification, bert),
        "model.": (transformers.LlamaModel, transformers.LlamaForCausalLM, llama),
        "transformer.": (transformers.GPT2Model, transformers.GPT2LMHeadModel, gpt2),
    }


@pytest.mark.parametrize("prefix", ["bert.", "model.", "transformer."])
def test_bare_model_vector_attaches_to_head_model(prefix: str) -> None:
    bare_cls, head_cls, config = head_models()[prefix]
    torch.manual_seed(0)
    tau = vector_for(bare_cls(config))  # names of the bare model: encoder.layer.0… / layers.0… / h.0…
    head = head_cls(config)
    assert not set(tau) & {n for n, _ in head.named_parameters()}  # nothing pairs by plain equality
    reg = OrthogonalityLoss(head, tau, mode="projection2")
    names = {n: prefix + n for n in tau}
    assert reg.names == list(names.values()) and reg.unmatched == []
    check_value(head, reg, tau, names, "projection2")


def test_head_vector_on_bare_model_hint_ignore_unmatched() -> None:
    bare_cls, head_cls, config = head_models()["bert."]
    torch.manual_seed(0)
    tau = vector_for(head_cls(config))  # bert.… and classifier.…
    bare = bare_cls(config)
    with pytest.raises(MismatchError, match=r"2 vector tensors match no parameter.*classifier\.weight.*"
                       r"pass ignore_unmatched=True to skip them"):  # fmt: skip
        OrthogonalityLoss(bare, tau)
    reg = OrthogonalityLoss(bare, tau, ignore_unmatched=True, mode="abs")  # the hint, followed
    assert reg.unmatched == ["classifier.weight", "classifier.bias"]
    names = {n: n.removeprefix("bert.") for n in tau if not n.startswith("classifier.")}
    assert reg.names == list(names.values())
    check_value(bare, reg, {n: tau[n] for n in names}, names, "abs")


class Wrapper(nn.Module):
    """DDP's naming: the model under ``.module``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


def test_peft_and_ddp_around_a_head_model() -> None:
    peft = pytest.importorskip("peft")
    bare_cls, head_cls, config = head_models()["bert."]
    torch.manual_seed(0)
    tau = vector_for(bare_cls(config))
    head = head_cls(config)
    wrapped = Wrapper(peft.get_peft_model(head, peft.LoraConfig(r=2, target_modules=["query"])))
    first = next(n for n, _ in wrapped.named_parameters() if "query" in n)
    assert first.startswith("module.base_model.model.bert.encoder.layer.0.")
    reg = OrthogonalityLoss(wrapped, tau)
    assert reg.names == ["bert.encoder.layer.0.attention.self.query.weight",
                         "bert.encoder.layer.1.attention.self.query.weight"]  # fmt: skip
    assert all(t.lora is not None for t in reg._targets) and len(reg.frozen) == len(tau) - 2


# ---------------------------------------------------------------------------------------------------- ambiguity
class TwoCopies(nn.Module):
    """A head model that declares ``bert`` its base model but also holds a ``model``: ``layers.0.…`` could be
    either."""

    base_model_prefix = "bert"

    def __init__(self) -> None:
        super().__init__()
        self.bert = Tiny(seed=0)
        self.model = Tiny(seed=1)


def test_two_candidate_parameters_are_an_error_and_the_hint_works() -> None:
    model = TwoCopies()
    tau = vector_for(Tiny())
    with pytest.raises(MismatchError) as err:
        OrthogonalityLoss(model, tau)
    message = str(err.value)
    assert message.startswith(
        "vector tensor big could be any of the model's parameters bert.big, model.big "
        f"({len(tau) - 1} more such tensors)"
    ), message
    assert message.endswith("choose with rename=, e.g. rename={'^': 'bert.'}"), message
    reg = OrthogonalityLoss(model, tau, rename={"^": "bert."}, mode="projection2")  # the hint, followed
    names = {n: "bert." + n for n in tau}
    assert reg.names == list(names.values())
    check_value(model, reg, tau, names, "projection2")


class Headed(nn.Module):
    base_model_prefix = "bert"

    def __init__(self) -> None:
        super().__init__()
        self.bert = Tiny()


def test_two_vector_tensors_for_one_parameter_hint_exclude() -> None:
    model = Headed()
    tau = {"model.head.bias": torch.ones(1), "head.bias": torch.full((1,), 2.0)}  # both strip to head.bias
    with pytest.raises(MismatchError) as err:
        OrthogonalityLoss(model, tau)
    assert str(err.value) == ("the vector tensors model.head.bias, head.bias all pair with the model's parameter "
                              "bert.head.bias: keep one (exclude= the others)")  # fmt: skip
    reg = OrthogonalityLoss(model, tau, exclude=r"^model\.", mode="projection2")  # the hint, followed
    assert reg.names == ["bert.head.bias"]
    check_value(model, reg, {"head.bias": tau["head.bias"]}, {"head.bias": "bert.head.bias"}, "projection2")


class Distill(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.student = Tiny(seed=0)
        self.teacher = Tiny(seed=1)


def test_vector_fitting_several_submodules_hint() -> None:
    model = Distill()
    tau = vector_for(Tiny())
    for options in ({}, {"ignore_unmatched": True}):  # ignore_unmatched skips nothing useful: the same error
        with pytest.raises(MismatchError) as err:
            OrthogonalityLoss(model, tau, **options)
        message = str(err.value)
        assert message.startswith(f"none of the {len(tau)} vector tensors matches a parameter of the model"), message
        assert message.endswith("the vector fits under several submodules (student., teacher.): choose one with "
                                "rename=, e.g. rename={'^': 'student.'}"), message  # fmt: skip
    reg = OrthogonalityLoss(model, tau, rename={"^": "student."}, mode="projection2")
    names = {n: "student." + n for n in tau}
    assert reg.names == list(names.values())
    check_value(model, reg, tau, names, "projection2")


# ------------------------------------------------------------------------------------- unmatched names: the hints
class Backbone(nn.Module):
    """A custom task model: a ``backbone`` and a head, no transformers convention to go by."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = Tiny()
        self.cls = nn.Linear(6, 3)


@pytest.mark.parametrize("options", [{}, {"ignore_unmatched": True}])
def test_custom_wrapper_hint_gives_the_rename(options) -> None:
    model = Backbone()
    tau = vector_for(Tiny())
    with pytest.raises(MismatchError) as err:  # before: "... pass ignore_unmatched=True", then a dead end
        OrthogonalityLoss(model, tau, **options)
    message = str(err.value)
    assert "(vector: big, embed.weight, layers.0.attn.weight; model: backbone.big, backbone.embed.weight" in message
    assert message.endswith("pass rename={'^': 'backbone.'} to map the vector's names to the model's"), message
    reg = OrthogonalityLoss(model, tau, rename={"^": "backbone."}, mode="cosine2")  # the hint, followed
    names = {n: "backbone." + n for n in tau}
    assert reg.names == list(names.values()) and "cls.weight" not in reg.names
    check_value(model, reg, tau, names, "cosine2")


def test_partly_unmatched_hint_suggests_a_rule_that_spares_the_matched_names() -> None:
    model = Backbone()
    tau = vector_for(Tiny())
    tau.update({"cls.weight": torch.randn(3, 6), "cls.bias": torch.randn(3)})  # these match as they are
    with pytest.raises(MismatchError) as err:
        OrthogonalityLoss(model, tau)
    message = str(err.value)
    rule = {r"^(?=(?:big|embed|head|layers)(?:\.|$))": "backbone."}
    assert message.endswith(f"or rename= to map their names to the model's (e.g. rename={rule!r}))"), message
    reg = OrthogonalityLoss(model, tau, rename=rule, mode="projection2")  # the hint, followed
    names = {n: n if n.startswith("cls.") else "backbone." + n for n in tau}
    assert reg.names == list(names.values())
    check_value(model, reg, tau, names, "projection2")


def test_partly_unmatched_hints_ignore_and_rename() -> None:
    model = Tiny()
    tau = vector_for(model)
    tau["out_proj.weight"] = tau.pop("head.weight")  # another naming of the head
    tau["out_proj.bias"] = tau.pop("head.bias")
    with pytest.raises(MismatchError) as err:
        OrthogonalityLoss(model, tau)
    message = str(err.value)
    assert message == ("2 vector tensors match no parameter of the model: out_proj.weight, out_proj.bias (pass "
                       "ignore_unmatched=True to skip them, or rename= to map their names to the model's)")  # fmt: skip
    reg = OrthogonalityLoss(model, tau, ignore_unmatched=True, mode="projection2")  # hint 1
    kept = {n: n for n in tau if not n.startswith("out_proj.")}
    assert reg.names == list(kept) and reg.unmatched == ["out_proj.weight", "out_proj.bias"]
    reg = OrthogonalityLoss(model, tau, rename={r"^out_proj\.": "head."}, mode="projection2")  # hint 2
    names = {n: n.replace("out_proj.", "head.") for n in tau}
    assert reg.names == list(names.values())
    check_value(model, reg, tau, names, "projection2")


def test_no_suggestion_generic_rename_hint_with_a_callable() -> None:
    model = Tiny()
    tau = {n.replace(".", "_"): t for n, t in vector_for(model).items() if n != "big"}  # a flat naming scheme
    with pytest.raises(MismatchError) as err:
        OrthogonalityLoss(model, tau)
    assert str(err.value).endswith(
        "pass rename= (regex → replacement mapping, or a callable) to map the vector's names to the model's"
    ), str(err.value)
    reg = OrthogonalityLoss(model, tau, rename=lambda n: n.replace("_", "."), mode="abs")  # the hint, followed
    names = {n: n.replace("_", ".") for n in tau}
    assert reg.names == list(names.values())
    check_value(model, reg, tau, names, "abs")


# --------------------------------------------------------------------------------------------------- rename forms
@pytest.mark.parametrize(
    "rename",
    [
        {"^": "backbone."},
        {"^embed": "backbone.embed", r"^(layers|head|big)": r"backbone.\1"},
        r"^=backbone.",
        [r"^(?!backbone)=backbone."],
        lambda n: "backbone." + n,
    ],
)
def test_rename_forms_and_the_reference(rename) -> None:
    model = Backbone()
    tau = vector_for(Tiny())
    ref = {n: t.clone() for n, t in snapshot(model.backbone).items()}  # θ_ref under the vector's (bare) names
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(1.0)  # the loss is built later: Δ is measured from the reference checkpoint
    reg = OrthogonalityLoss(model, tau, rename=rename, reference=ref, mode="projection2")
    assert reg.names == ["backbone." + n for n in tau]
    now = snapshot(model.backbone)
    close(reg(), direct(now, ref, tau, mode="projection2"), rtol=1e-4)


def test_reference_pairs_through_prefixes_too() -> None:
    _, head_cls, config = head_models()["bert."]
    torch.manual_seed(0)
    head = head_cls(config)
    ref = {n.removeprefix("bert."): p.detach().clone() for n, p in head.named_parameters()}  # bare names
    tau = {n: torch.randn(t.shape) for n, t in ref.items() if not n.startswith("classifier.")}
    perturb(head)
    reg = OrthogonalityLoss(head, tau, reference=ref, mode="cosine2")
    now = {n.removeprefix("bert."): p.detach() for n, p in head.named_parameters()}
    close(reg(), direct(now, ref, tau, mode="cosine2"), rtol=1e-4)


def test_rename_errors() -> None:
    model = Tiny()
    tau = vector_for(model)
    with pytest.raises(MismatchError, match=r"rename= maps layers.0.attn.weight and layers.1.attn.weight to the same"):
        OrthogonalityLoss(model, tau, rename={r"layers\.\d": "layers.0"})
    with pytest.raises(UsageError, match=r"invalid rename= regex '\('"):
        OrthogonalityLoss(model, tau, rename={"(": "x"})
    with pytest.raises(UsageError, match="expected 'REGEX=REPLACEMENT'"):
        OrthogonalityLoss(model, tau, rename="no-equals-sign")
    OrthogonalityLoss(model, tau, rename="no-equals-sign=no-equals-sign")  # that message's form, followed
    with pytest.raises(UsageError, match="rename= must be 'REGEX=REPLACEMENT' rules, a mapping or a callable"):
        OrthogonalityLoss(model, tau, rename=3)
    with pytest.raises(UsageError, match="it must return a non-empty name"):
        OrthogonalityLoss(model, tau, rename=lambda n: None)


def test_pair_names_and_rename_names_directly() -> None:
    """The shared rules of capmerge.io.names: ambiguity is reported, not guessed; the readers' default is unchanged."""
    pairs, ambiguous = pair_names(["model.x", "module.y", "bert.x"], ["x", "y"])
    assert pairs == {"x": "model.x", "y": "module.y"} and ambiguous == {}  # bert. is no wrapper prefix by default
    pairs, ambiguous = pair_names(["model.x", "module.y", "bert.x"], ["x", "y"],
                                  prefixes=("module.", "model.", "bert."))  # fmt: skip
    assert pairs == {"y": "module.y"} and ambiguous == {"x": ["bert.x", "model.x"]}
    assert rename_names(["a.w", "b.w"], {r"^a\.": "c."}) == {"a.w": "c.w", "b.w": "b.w"}


# -------------------------------------------------------------------------------------- the other hints, followed
def test_cosine2_without_reference_copy_hint() -> None:
    model = Tiny()
    tau = vector_for(model)
    with pytest.raises(UsageError) as err:
        OrthogonalityLoss(model, tau, keep_reference=False)
    assert str(err.value).endswith("drop keep_reference=False, or use mode='projection2'")
    OrthogonalityLoss(model, tau)  # dropped
    reg = OrthogonalityLoss(model, tau, keep_reference=False, mode="projection2")
    check_value(model, reg, tau, {n: n for n in tau}, "projection2")


CHOICES = [
    ("mode", ("cosine2", "projection2", "abs")),
    ("reduction", ("sum", "mean")),
    ("basis", ("sum", "orthonormal")),
]


@pytest.mark.parametrize(("option", "allowed"), CHOICES)
def test_option_choices_listed_in_the_error_work(option: str, allowed: tuple[str, ...]) -> None:
    model = Tiny()
    tau = vector_for(model)
    with pytest.raises(UsageError, match=f"{option} must be one of {', '.join(allowed)}, not 'x'"):
        OrthogonalityLoss(model, tau, **{option: "x"})
    for value in allowed:
        OrthogonalityLoss(model, tau, **{option: value})()


def test_built_on_another_model_hint() -> None:
    model = Tiny()
    tau = vector_for(model)
    reg = OrthogonalityLoss(model, tau)
    wrapped = Wrapper(Tiny())  # e.g. a copy made by a wrapper after the loss was built
    with pytest.raises(MismatchError, match=r"built on another model's parameters \(build it after wrapping\)"):
        reg(wrapped)
    reg = OrthogonalityLoss(wrapped, tau)  # built after wrapping
    assert float(reg(wrapped).detach()) == 0.0


def test_project_updates_needs_the_optimizer_hint() -> None:
    model = Tiny()
    tau = vector_for(model)
    with pytest.raises(UsageError, match="pass it as the third argument"):
        project_updates(model, tau, None)  # type: ignore[arg-type]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref = snapshot(model)
    with project_updates(model, tau, opt):  # followed
        model(torch.tensor([[1, 2, 3]])).sum().backward()
        opt.step()
    now = snapshot(model)
    assert any(not torch.equal(now[n], ref[n]) for n in tau)
    for n in tau:
        d, t = (now[n] - ref[n]).double().reshape(-1), tau[n].double().reshape(-1)
        assert abs(float(d @ t)) <= 1e-4 * float(t.norm() * d.norm()) + 1e-12, n


def test_project_gradients_on_lora_hint_use_the_loss() -> None:
    peft = pytest.importorskip("peft")
    wrapped = peft.get_peft_model(Tiny(), peft.LoraConfig(r=2, target_modules=["attn"]))
    tau = {"layers.0.attn.weight": torch.randn(6, 6)}
    with pytest.raises(UsageError, match="use OrthogonalityLoss"):
        project_gradients(wrapped, tau)
    reg = OrthogonalityLoss(wrapped, tau)  # followed
    assert reg.names == ["layers.0.attn.weight"] and float(reg().detach()) == 0.0  # B = 0 at init
