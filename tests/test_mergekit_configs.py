"""mergekit configurations run unchanged by ``capmerge run CONFIG.yml -o OUT``, compared with mergekit's own output.

Tiny float32 Llama checkpoints (4 layers) with a word-level tokenizer are built here; each configuration is run by
``.venv-mergekit/bin/mergekit-yaml`` (a separate process: mergekit is LGPL and never imported) and by capmerge, and
the outputs must agree within float32 rounding. The merge method is ``linear`` (the only model-centric method every
branch has); ``passthrough`` is registered for the layer-stacking case when the registry lacks it.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import load_any, save_single
from mergekit_ref import llama_tensors

from capmerge.cli import main
from capmerge.merge.methods import registry
from capmerge.merge.methods.models import ModelMethod

REPO = Path(__file__).resolve().parents[1]
MERGEKIT_YAML = REPO / ".venv-mergekit" / "bin" / "mergekit-yaml"
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
LAYERS, HIDDEN, INTER, VOCAB = 4, 16, 32, 32


def shapes() -> dict[str, tuple[int, ...]]:
    return llama_tensors(hidden=HIDDEN, intermediate=INTER, vocab=VOCAB, layers=LAYERS)


CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN, "intermediate_size": INTER,
    "num_attention_heads": 4, "num_key_value_heads": 4, "num_hidden_layers": LAYERS, "vocab_size": VOCAB,
    "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": False,
    "torch_dtype": "float32",
}  # fmt: skip


def save_tokens(d: Path, ids: list[int]) -> None:
    """A word-level tokenizer.json of tokens at ``ids``: ``<unk>``, ``<s>``, ``</s>`` at 0–2, ``w<id>`` after."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    names = {0: "<unk>", 1: "<s>", 2: "</s>"}  # the special tokens tokenizer_config.json names
    vocab = {names.get(i, f"w{i}"): i for i in ids}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(d / "tokenizer.json"))


def save_tokenizer(d: Path) -> None:
    save_tokens(d, list(range(VOCAB)))
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "model_max_length": 64}))  # fmt: skip


def save_model(d: Path, gen: torch.Generator) -> Path:
    save_single(d / "model.safetensors", {n: torch.randn(s, generator=gen) for n, s in shapes().items()})
    (d / "config.json").write_text(json.dumps(CONFIG, indent=2))
    save_tokenizer(d)
    return d


def save_lora(d: Path, gen: torch.Generator) -> Path:
    d.mkdir()
    t = {}
    for layer in range(LAYERS):
        for m in ("q_proj", "v_proj"):
            p = f"base_model.model.model.layers.{layer}.self_attn.{m}"
            t[p + ".lora_A.weight"] = torch.randn(2, HIDDEN, generator=gen)
            t[p + ".lora_B.weight"] = torch.randn(HIDDEN, 2, generator=gen)
    save_single(d / "adapter_model.safetensors", t)
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"],
              "task_type": "CAUSAL_LM", "lora_dropout": 0.0, "bias": "none"}  # fmt: skip
    (d / "adapter_config.json").write_text(json.dumps(config))
    return d


def configs(m: dict[str, Path]) -> dict[str, str]:
    a, b, c = (json.dumps(str(m[k])) for k in ("A", "B", "C"))
    a_lora = json.dumps(f"{m['A']}+{m['lora']}")
    return {
        # filters (substring, first match), a gradient over the layers, per-model vs global parameters, the base
        # among the models, the base's tokenizer
        "filters": f"""merge_method: linear
base_model: {c}
models:
  - model: {a}
    parameters:
      weight:
        - filter: self_attn
          value: [0.2, 0.8]
        - filter: mlp
          value: 0.3
        - value: 0.5
  - model: {b}
  - model: {c}
    parameters:
      weight: 0.25
parameters:
  weight: [1.0, 0.5, 2.0]
  normalize: true
tokenizer_source: base
dtype: float32
""",
        "bf16": f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.3}}\n"
        f"  - model: {b}\n    parameters: {{weight: 0.7}}\nparameters: {{normalize: false}}\nout_dtype: bfloat16\n",
        "stack": f"""merge_method: passthrough
slices:
  - sources:
      - model: {a}
        layer_range: [0, 2]
  - sources:
      - model: {b}
        layer_range: [1, 4]
dtype: float32
""",
        # every model of one vocabulary: mergekit's union of it is that vocabulary, its embeddings unpermuted
        "union": f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.6}}\n"
        f"  - model: {b}\n    parameters: {{weight: 0.4}}\ntokenizer_source: union\ndtype: float32\n",
        # mergekit's tokenizer: section with a source alone, of models of one vocabulary
        "section": f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.3}}\n"
        f"  - model: {b}\n    parameters: {{weight: 0.7}}\ntokenizer:\n  source: union\ndtype: float32\n",
        # YAML anchors and merge keys for shared parameters, a written key overriding a merged one
        "anchors": f"merge_method: linear\nparameters: &shared\n  normalize: false\nmodels:\n  - model: {a}\n"
        "    parameters: &p\n      weight: 0.5\n      normalize: true\n"
        f"  - model: {b}\n    parameters:\n      <<: *p\n      weight: 0.25\ndtype: float32\n",
        # parameters of other methods left in a configuration adapted from theirs: mergekit ignores them
        "others": f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.3, density: 0.5}}\n"
        f"  - model: {b}\n    parameters: {{weight: 0.7}}\nparameters: {{t: 0.2, epsilon: 0.1}}\ndtype: float32\n",
        "lora": f"merge_method: linear\nmodels:\n  - model: {a_lora}\n    parameters: {{weight: 0.7}}\n"
        f"  - model: {b}\n    parameters: {{weight: 0.3}}\ndtype: float32\n",
    }


def _passthrough(x):  # the layer-stacking method, for registries that do not have it yet
    scale = x.model_params[0].get("scale", 1.0)
    return x.models[0] if scale is None else x.models[0] * float(scale)


@pytest.fixture(scope="module")
def passthrough():
    if "passthrough" in registry.MODEL_METHODS:
        yield
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(registry.MODEL_METHODS, "passthrough",
                   ModelMethod("passthrough", _passthrough, base="unused", model_params={"scale": 1.0}))  # fmt: skip
        yield


def require_mergekit() -> None:
    if not MERGEKIT_YAML.exists():
        pytest.skip(f"mergekit not installed ({MERGEKIT_YAML.relative_to(REPO)} missing): run `make mergekit-venv`")


def mergekit_outputs(tmp: Path, cases: dict[str, str], options: Callable[[str], list[str]]) -> None:
    """Write each configuration to tmp/NAME.yml and run mergekit-yaml on all of them at once into tmp/mk-NAME
    (``options(name)``: its extra command-line options)."""
    procs = {}
    for name, text in cases.items():
        (tmp / f"{name}.yml").write_text(text)
        cmd = [str(MERGEKIT_YAML), str(tmp / f"{name}.yml"), str(tmp / f"mk-{name}"), "--quiet", *options(name)]
        procs[name] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                       env={**os.environ, **OFFLINE_ENV})  # fmt: skip
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"mergekit {name} failed:\n{out[-3000:]}\n{cases[name]}"


@pytest.mark.parametrize("dtypes", [("BF16", "F32"), ("F32", "BF16"), ("BF16", "F16")])
def test_mixed_input_dtypes_promote_as_mergekit_aligns_them(tmp_path: Path, capsys, dtypes: tuple[str, str]) -> None:
    """Without dtype or out_dtype, a tensor whose inputs differ in dtype is written in the dtype they promote to
    (torch.promote_types: float32 over bfloat16, and bfloat16 with float16 gives float32), as mergekit aligns a
    tensor's inputs before a method sees them; it was the first model's dtype (bfloat16 where A is). The values: the
    float32 mean of the stored values (by hand), and mergekit's output bit for bit where it is installed."""
    torch_dtypes = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
    gen = torch.Generator().manual_seed(5)
    m = {k: save_model(tmp_path / k, gen) for k in "AB"}
    for k, code in zip("AB", dtypes, strict=True):
        save_single(m[k] / "model.safetensors", {n: t.to(torch_dtypes[code]) for n, t in load_any(m[k]).items()})
    text = (f"merge_method: linear\nmodels:\n  - model: {m['A']}\n    parameters: {{weight: 0.5}}\n"
            f"  - model: {m['B']}\n    parameters: {{weight: 0.5}}\n")  # fmt: skip
    cfg = tmp_path / "mixed.yml"
    cfg.write_text(text)
    assert main(["run", str(cfg), "-o", str(tmp_path / "cm"), "--quiet"]) == 0, capsys.readouterr().err
    want_dtype = torch.promote_types(*(torch_dtypes[c] for c in dtypes))
    a, b, got = (load_any(d) for d in (m["A"], m["B"], tmp_path / "cm"))
    for name, t in got.items():
        assert t.dtype == want_dtype, (name, t.dtype)
        want = ((a[name].float() * 0.5 + b[name].float() * 0.5) / 1.0).to(want_dtype)
        assert torch.equal(t, want), name
    if MERGEKIT_YAML.exists():
        mergekit_outputs(tmp_path, {"mixed": text}, lambda name: ["--no-copy-tokenizer"])
        mk = load_any(tmp_path / "mk-mixed")
        assert set(mk) == set(got) and all(torch.equal(mk[n], got[n]) for n in got)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory):
    """Models A, B, C, a LoRA adapter, and mergekit's output for every configuration (run concurrently)."""
    require_mergekit()
    tmp = tmp_path_factory.mktemp("mkconfigs")
    gen = torch.Generator().manual_seed(7)
    m = {k: save_model(tmp / k, gen) for k in ("A", "B", "C")}
    m["lora"] = save_lora(tmp / "lora", gen)
    lora = ["--no-cuda", "--lora-merge-cache", str(tmp / "lora-cache")]
    mergekit_outputs(
        tmp, configs(m), lambda name: lora + ([] if name in ("filters", "union") else ["--no-copy-tokenizer"])
    )
    return {"tmp": tmp, "models": m}


def capmerge_run(tmp: Path, name: str, capsys: pytest.CaptureFixture[str]) -> Path:
    out = tmp / f"cm-{name}"
    code = main(["run", str(tmp / f"{name}.yml"), "-o", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    return out


def compare(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], rtol: float) -> float:
    """Same names and dtypes, values within ``rtol`` relative to the tensor's largest magnitude (float32: a few
    ulps of reassociated sums and weights; bfloat16: one rounding step). Returns the largest absolute difference."""
    assert sorted(got) == sorted(ref)
    worst = 0.0
    for n in ref:
        assert got[n].dtype == ref[n].dtype, (n, got[n].dtype, ref[n].dtype)
        diff = (got[n].float() - ref[n].float()).abs()
        i = int(diff.argmax()) if diff.numel() else 0
        scale = float(ref[n].float().abs().max()) or 1.0
        assert diff.max() <= rtol * scale, (f"{n}: max abs diff {float(diff.max())} at {i}: {got[n].flatten()[i]} "
                                            f"vs {ref[n].flatten()[i]}")  # fmt: skip
        worst = max(worst, float(diff.max()))
    return worst


FP32_RTOL = 4 * 2.0**-23  # a few float32 ulps of the largest entry
BF16_RTOL = 2.0**-7  # one bfloat16 rounding step


@pytest.mark.parametrize("name", ["filters", "bf16", "lora", "union", "section", "others", "anchors"])
def test_config_matches_mergekit(runs, name: str, capsys) -> None:
    tmp = runs["tmp"]
    out = capmerge_run(tmp, name, capsys)
    got, mk = load_any(out), load_any(tmp / f"mk-{name}")
    # float32 sums in the same order: equal, but for the LoRA product (s·(B·A) vs PEFT's order) and bf16's one
    # rounding of the same float32 value
    worst = compare(got, mk, BF16_RTOL if name == "bf16" else FP32_RTOL)
    print(f"{name}: max abs diff vs mergekit {worst:.3g}")
    cfg, mk_cfg = (json.loads((d / "config.json").read_text()) for d in (out, tmp / f"mk-{name}"))
    assert cfg["num_hidden_layers"] == mk_cfg["num_hidden_layers"] == LAYERS
    assert (out / "README.md").is_file() and "```yaml" in (out / "README.md").read_text()
    assert (out / "mergekit_config.yml").read_text() == (tmp / f"{name}.yml").read_text()
    if name == "bf16":
        assert cfg["torch_dtype"] == "bfloat16" == mk_cfg.get("dtype", mk_cfg.get("torch_dtype"))


def test_parameters_of_other_methods_have_no_effect(runs, capsys) -> None:
    """linear given density (a ties parameter), t and epsilon: a warning each with its line, the plain weighted
    mean (by hand); a name no method takes stays an error (test_merge_cli)."""
    tmp, m = runs["tmp"], runs["models"]
    out = tmp / "cm-others-warned"
    assert main(["run", str(tmp / "others.yml"), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    for key, where in (("density", "others.yml:4: models[0].parameters.density"), ("t", "others.yml:7: parameters.t"),
                       ("epsilon", "others.yml:7: parameters.epsilon")):  # fmt: skip
        assert f"warning: linear takes no parameter {key} (other methods do): it has no effect" in err, err
        assert where in err, err
    a, b, got = load_any(m["A"]), load_any(m["B"]), load_any(out)
    for n in a:
        torch.testing.assert_close(got[n], (0.3 * a[n] + 0.7 * b[n]) / 1.0, rtol=0, atol=1e-6)


def test_filters_and_gradient_values(runs, capsys) -> None:
    """The weights capmerge resolved, checked by hand: A's filters decide first, B takes the global gradient
    (first value outside the layers), C its own 0.25; normalised by their sum."""
    tmp, m = runs["tmp"], runs["models"]
    out = tmp / "cm-filters"
    got = load_any(out if out.exists() else capmerge_run(tmp, "filters", capsys))
    a, b, c = (load_any(m[k]) for k in "ABC")

    def grad(points: list[float], t: float) -> float:
        s = t * (len(points) - 1)
        i0 = int(s)
        i1 = min(len(points) - 1, i0 + 1)
        return (1 - (s - i0)) * points[i0] + (s - i0) * points[i1]

    for n in shapes():
        layer = int(n.split(".")[2]) if ".layers." in n else None
        t = 0.0 if layer is None else layer / (LAYERS - 1)
        wa = grad([0.2, 0.8], t) if "self_attn" in n else 0.3 if "mlp" in n else 0.5
        wb, wc = grad([1.0, 0.5, 2.0], t), 0.25
        want = (wa * a[n] + wb * b[n] + wc * c[n]) / (wa + wb + wc)
        assert torch.allclose(got[n], want, rtol=1e-6, atol=1e-6), n


def test_tokenizer_source_base(runs, capsys) -> None:
    tmp, m = runs["tmp"], runs["models"]
    out = tmp / "cm-filters"
    if not out.exists():
        capmerge_run(tmp, "filters", capsys)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / f).read_bytes() == (m["C"] / f).read_bytes(), f  # copied as they are
    from transformers import AutoTokenizer

    ours, theirs = (AutoTokenizer.from_pretrained(str(d)) for d in (out, tmp / "mk-filters"))
    assert ours.get_vocab() == theirs.get_vocab()
    assert ours("w3 w4 w31")["input_ids"] == theirs("w3 w4 w31")["input_ids"]


@pytest.mark.parametrize("name", ["union", "section"])
def test_tokenizer_source_union_of_one_vocabulary(runs, capsys, name: str) -> None:
    """Models of one vocabulary: the first model's tokenizer files (no base) as they are, the vocabulary of
    mergekit's union (``tokenizer_source: union``, and ``tokenizer: {source: union}``)."""
    tmp, m = runs["tmp"], runs["models"]
    out = tmp / f"cm-{name}"
    if not out.exists():
        capmerge_run(tmp, name, capsys)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / f).read_bytes() == (m["A"] / f).read_bytes(), f
    from transformers import AutoTokenizer

    ours, theirs = (AutoTokenizer.from_pretrained(str(d)) for d in (out, tmp / f"mk-{name}"))
    assert ours.get_vocab() == theirs.get_vocab()
    assert ours("w5 w9 w30")["input_ids"] == theirs("w5 w9 w30")["input_ids"]


def save_vocab_model(d: Path, gen: torch.Generator, names: list[str], special: tuple[str, ...] = ()) -> Path:
    """A model whose word-level tokenizer has ``names`` at ids 0 .. and the ``special`` tokens after them as added
    tokens, its embeddings and head one row per token."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    d.mkdir()
    n = len(names) + len(special)
    shapes = llama_tensors(hidden=HIDDEN, intermediate=INTER, vocab=n, layers=LAYERS)
    save_single(d / "model.safetensors", {k: torch.randn(s, generator=gen) for k, s in shapes.items()})
    (d / "config.json").write_text(json.dumps({**CONFIG, "vocab_size": n}))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(names)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(x, special=True, normalized=False) for x in special])
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "model_max_length": 64}))  # fmt: skip
    return d


WORDS = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(3, VOCAB)]


@pytest.fixture(scope="module")
def vocabularies(tmp_path_factory: pytest.TempPathFactory):
    """Models of different vocabularies: P and A of WORDS; B with two more words and an added special token (as a
    chat finetune adds <|im_start|>); C with w5 and w6 swapped, w31 dropped and x2, y9 added. mergekit's output for
    union (with and without a base), base and a model as tokenizer_source."""
    require_mergekit()
    tmp = tmp_path_factory.mktemp("vocab")
    gen = torch.Generator().manual_seed(19)
    m = {"P": save_vocab_model(tmp / "P", gen, WORDS), "A": save_vocab_model(tmp / "A", gen, WORDS),
         "B": save_vocab_model(tmp / "B", gen, [*WORDS, "x1", "x2"], ("<|im_start|>",)),
         "C": save_vocab_model(tmp / "C", gen, [*WORDS[:5], WORDS[6], WORDS[5], *WORDS[7:31], "x2", "y9"])}  # fmt: skip
    ms = lambda *ws: "models:\n" + "".join(f"  - model: {m[k]}\n    parameters: {{weight: {w}, density: 0.6}}\n"  # noqa: E731
                                          for k, w in ws)  # fmt: skip
    cases = {
        "union_linear": "merge_method: linear\n" + ms(("A", 0.5), ("B", 0.3), ("C", 0.2)) + "tokenizer_source: union\n",
        "union_ta": f"merge_method: task_arithmetic\nbase_model: {m['P']}\n" + ms(("B", 0.5), ("C", 0.7))
        + "tokenizer_source: union\n",
        "base_ties": f"merge_method: ties\nbase_model: {m['P']}\n" + ms(("B", 0.5), ("C", 0.7))
        + "tokenizer_source: base\n",
        "model_b": f"merge_method: slerp\nbase_model: {m['A']}\nmodels:\n  - model: {m['A']}\n"
        f"  - model: {m['B']}\n"
        + f"parameters: {{t: 0.3}}\ntokenizer_source: {m['B']}\n",
    }  # fmt: skip
    # the tokenizer section's tokens and padding: a token from a model, one from another token of a model, a
    # token forced to zeros, a new token from a row of B; the rows padded to a multiple of 8 (only the padding:
    # the section's default source, union, over models of one vocabulary)
    cases["tokens"] = ("merge_method: linear\n" + ms(("A", 0.6), ("B", 0.4)) + "tokenizer:\n  pad_to_multiple_of: 8\n"
                       f"  tokens:\n    <|im_start|>:\n      source: {m['B']}\n    x1:\n      source: {{kind: "
                       f"model_token, model: {m['A']}, token: w7}}\n    w5:\n      source: {{kind: zero}}\n"
                       f"      force: true\n    newtok:\n      source: {{kind: model_token, model: {m['B']}, "
                       "token_id: 3}\n")  # fmt: skip
    cases["padded"] = "merge_method: linear\n" + ms(("A", 0.6), ("P", 0.4)) + "tokenizer:\n  pad_to_multiple_of: 64\n"
    cases = {k: v.replace(", density: 0.6", "" if "ties" not in k else ", density: 0.6") + "dtype: float32\n"
             for k, v in cases.items()}  # fmt: skip
    mergekit_outputs(tmp, cases, lambda name: ["--no-cuda"])
    return tmp, m


@pytest.mark.parametrize("name", ["union_linear", "union_ta", "base_ties", "model_b", "tokens", "padded"])
def test_vocabularies_aligned_like_mergekit(vocabularies, name: str, capsys) -> None:
    """Each token's embedding and head row (found through each output's own tokenizer: mergekit numbers a union's
    new regular tokens in hash order, capmerge in model order) is mergekit's; every other tensor too; both
    tokenizers split text into the same tokens, and the output loads with transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp, m = vocabularies
    out = capmerge_run(tmp, name, capsys)
    got, mk = load_any(out), load_any(tmp / f"mk-{name}")
    tok, mk_tok = AutoTokenizer.from_pretrained(str(out)), AutoTokenizer.from_pretrained(str(tmp / f"mk-{name}"))
    vocab, mk_vocab = tok.get_vocab(), mk_tok.get_vocab()
    assert set(vocab) == set(mk_vocab) and sorted(vocab.values()) == list(range(len(vocab)))
    order = sorted(vocab, key=vocab.__getitem__)
    mk_rows = torch.tensor([mk_vocab[t] for t in order] + list(range(len(order), len(mk[VOCAB_TENSORS[0]]))))
    compare(got, {n: t[mk_rows] if n in VOCAB_TENSORS else t for n, t in mk.items()}, FP32_RTOL)  # padding: after
    text = "<|im_start|> w5 x1 y9 w6 w31 zz"
    assert tok.convert_ids_to_tokens(tok(text)["input_ids"]) == mk_tok.convert_ids_to_tokens(mk_tok(text)["input_ids"])
    cfg = json.loads((out / "config.json").read_text())
    rows = -(-len(vocab) // {"tokens": 8, "padded": 64}.get(name, 1)) * {"tokens": 8, "padded": 64}.get(name, 1)
    assert cfg["vocab_size"] == rows == json.loads((tmp / f"mk-{name}" / "config.json").read_text())["vocab_size"]
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.get_input_embeddings().weight.shape == (rows, HIDDEN)


def test_union_rows_by_hand(vocabularies, capsys) -> None:
    """union_linear's rows, by mergekit's rules: a token every model has is the weighted mean of their rows (by
    token, whatever its id: C's w5 and w6 are swapped); one that only B has is B's row in every model (so its row
    in the output); x2, which B and C have, the mean of their two rows in A; w31, which C lacks, the mean of A's
    and B's rows in C; the added token comes after the regular ones, special as in B."""
    tmp, m = vocabularies
    out = tmp / "cm-union_linear"
    if not out.exists():  # run here when the parity test did not
        capmerge_run(tmp, "union_linear", capsys)
    got = load_any(out)["model.embed_tokens.weight"]
    ids = json.loads((out / "tokenizer.json").read_text())
    vocab = {**ids["model"]["vocab"], **{t["content"]: t["id"] for t in ids["added_tokens"]}}
    assert [vocab[t] for t in ("x1", "x2", "y9", "<|im_start|>")] == [32, 33, 34, 35]
    assert ids["added_tokens"][-1]["special"] is True and ids["added_tokens"][0]["normalized"] is True
    rows = {}
    for k in "ABC":
        doc = json.loads((m[k] / "tokenizer.json").read_text())
        rows[k] = ({**doc["model"]["vocab"], **{t["content"]: t["id"] for t in doc["added_tokens"]}},
                   load_any(m[k])["model.embed_tokens.weight"])  # fmt: skip

    def row(k: str, t: str) -> torch.Tensor:
        v, e = rows[k]
        if t in v:
            return e[v[t]]
        have = [e2[v2[t]] for v2, e2 in rows.values() if t in v2]
        return sum(have[1:], have[0]) / len(have)

    for t in ("w5", "w6", "w31", "x1", "x2", "y9", "<|im_start|>"):
        want = 0.5 * row("A", t) + 0.3 * row("B", t) + 0.2 * row("C", t)
        torch.testing.assert_close(got[vocab[t]], want, rtol=0, atol=1e-6)


def test_token_sources_and_padding_by_hand(vocabularies, capsys) -> None:
    """The tokens case by hand (linear 0.6 A + 0.4 B): w5 forced to zeros in both; x1 from A's row of w7 where A
    lacks it, B's own row in B; newtok (no model has it) B's row 3 in both; <|im_start|> B's; the padding rows
    each model's mean row, so the mean of the output's token rows; the new token in the tokenizer."""
    tmp, m = vocabularies
    out = tmp / "cm-tokens"
    if not out.exists():
        capmerge_run(tmp, "tokens", capsys)
    got = load_any(out)["model.embed_tokens.weight"]
    doc = json.loads((out / "tokenizer.json").read_text())
    vocab = {**doc["model"]["vocab"], **{t["content"]: t["id"] for t in doc["added_tokens"]}}
    assert vocab["newtok"] == len(vocab) - 1 and len(got) == 40
    ea, eb = load_any(m["A"])["model.embed_tokens.weight"], load_any(m["B"])["model.embed_tokens.weight"]
    ids_b = {**json.loads((m["B"] / "tokenizer.json").read_text())["model"]["vocab"], "<|im_start|>": 34}
    for tok, want in (("w5", torch.zeros(HIDDEN)), ("x1", 0.6 * ea[7] + 0.4 * eb[ids_b["x1"]]), ("newtok", eb[3]),
                      ("<|im_start|>", eb[34]), ("w9", 0.6 * ea[9] + 0.4 * eb[9])):  # fmt: skip
        torch.testing.assert_close(got[vocab[tok]], want, rtol=0, atol=1e-6)
    torch.testing.assert_close(got[len(vocab):], got[: len(vocab)].mean(0).expand(40 - len(vocab), -1), rtol=0,
                               atol=1e-6)  # fmt: skip


def tied_copy(src: Path, dst: Path) -> Path:
    """``src`` saved tied: its tokenizer, its tensors without lm_head.weight, its config with tie_word_embeddings."""
    from safetensors.torch import load_file, save_file

    dst.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (dst / f).write_text((src / f).read_text())
    weights = load_file(str(src / "model.safetensors"))
    del weights["lm_head.weight"]
    save_file(weights, str(dst / "model.safetensors"))
    (dst / "config.json").write_text(json.dumps({**json.loads((src / "config.json").read_text()),
                                                 "tie_word_embeddings": True}))  # fmt: skip
    return dst


@pytest.mark.parametrize(("method", "tied_c"), [("ties", False), ("della_linear", False), ("linear", False),
                                               ("ties", True)])  # fmt: skip
def test_aligned_rows_stream_as_read_whole(vocabularies, tmp_path: Path, capsys, monkeypatch, method: str,
                                           tied_c: bool) -> None:  # fmt: skip
    """The vocabulary tensors of models whose vocabularies differ stream through the block kernels, each model's
    rows of the output tokens made a block at a time from runs of its file's rows (vocabulary.AlignedRows), and the
    output is, bit for bit, the one made by reading them whole and merging with the method's tensor function
    (vocabulary.read): a union with a token forced to zeros, one from another token of a model, one from a row of
    a model, tokens some models lack, C's swapped rows; and with C saved tied (no head: its head is its embedding,
    the rows other models lack made from it)."""

    from capmerge.merge import vocabulary

    _, m = vocabularies
    if tied_c:
        m = {**m, "C": tied_copy(m["C"], tmp_path / "C-tied")}
    base = f"base_model: {m['P']}\n" if method != "linear" else ""
    dens = ", density: 0.6" if method != "linear" else ""
    cfg = tmp_path / "t.yml"
    cfg.write_text(f"merge_method: {method}\n{base}models:\n"
                   f"  - model: {m['B']}\n    parameters: {{weight: 0.5{dens}}}\n"
                   f"  - model: {m['C']}\n    parameters: {{weight: 0.7{dens}}}\n"
                   "tokenizer:\n  source: union\n  tokens:\n    w5:\n      source: {kind: zero}\n      force: true\n"
                   f"    x1:\n      source: {{kind: model_token, model: {m['C']}, token: w7}}\n"
                   f"    newtok:\n      source: {{kind: model_token, model: {m['B']}, token_id: 3}}\n"
                   "dtype: float32\n")  # fmt: skip
    fills = []
    fill = vocabulary.AlignedRows.fill
    monkeypatch.setattr(vocabulary.AlignedRows, "fill", lambda self, *a: fills.append(1) or fill(self, *a))
    assert main(["run", str(cfg), "-o", str(tmp_path / "streamed"), "--quiet"]) == 0, capsys.readouterr().err
    assert fills  # the rows streamed
    monkeypatch.setattr(vocabulary, "streams", lambda p, entries: None)
    assert main(["run", str(cfg), "-o", str(tmp_path / "whole"), "--quiet"]) == 0, capsys.readouterr().err
    got, want = load_any(tmp_path / "streamed"), load_any(tmp_path / "whole")
    assert sorted(got) == sorted(want)
    for n in want:
        assert torch.equal(got[n], want[n]), n
    vocab = json.loads((tmp_path / "streamed" / "tokenizer.json").read_text())["model"]["vocab"]
    assert not got["model.embed_tokens.weight"][vocab["w5"]].any()


def test_a_token_source_not_in_the_heads_slice_gives_its_tied_head(
    vocabularies, tmp_path: Path, capsys, monkeypatch
) -> None:
    """A token whose source model is merged in the first slice only, so not in the head's entries (the last slice's),
    and saved tied (no head): its head row is its embedding row, as transformers reads it; both the streamed rows and
    the whole-tensor path read it so."""
    from safetensors.torch import load_file

    from capmerge.merge import vocabulary

    _, m = vocabularies
    c = tied_copy(m["C"], tmp_path / "C-tied")
    weights = load_file(str(c / "model.safetensors"))
    cfg = tmp_path / "t.yml"
    src = lambda k, r: f"      - model: {k}\n        layer_range: {r}\n        parameters: {{weight: 0.5}}\n"  # noqa: E731
    cfg.write_text("merge_method: linear\nslices:\n  - sources:\n" + src(m["A"], [0, 1]) + src(c, [0, 1])
                   + "  - sources:\n" + src(m["A"], [1, 2]) + src(m["B"], [1, 2])
                   + f"tokenizer:\n  source: union\n  tokens:\n    x1:\n      source: {{kind: model_token, model: {c}, "
                   "token: w7}\n      force: true\ndtype: float32\n")  # fmt: skip
    c_vocab = json.loads((c / "tokenizer.json").read_text())["model"]["vocab"]
    want = weights["model.embed_tokens.weight"][c_vocab["w7"]]
    for out in ("streamed", "whole"):
        if out == "whole":
            monkeypatch.setattr(vocabulary, "streams", lambda p, entries: None)
        assert main(["run", str(cfg), "-o", str(tmp_path / out), "--quiet"]) == 0, capsys.readouterr().err
        got = load_any(tmp_path / out)
        doc = json.loads((tmp_path / out / "tokenizer.json").read_text())
        vocab = {**doc["model"]["vocab"], **{t["content"]: t["id"] for t in doc["added_tokens"]}}
        for name in ("lm_head.weight", "model.embed_tokens.weight"):
            torch.testing.assert_close(got[name][vocab["x1"]], want, rtol=0, atol=1e-6, msg=f"{out} {name}")


@pytest.mark.parametrize(
    "section,expect",
    [
        ("  tokens:\n    w3:\n      source: /nowhere\n", ["/nowhere is not one of the models merged", "t.yml:9:"]),
        ("  tokens:\n    w3:\n      source: {kind: model_token, model: @A, token: nope}\n",
         ["has no token 'nope'", "t.yml:9: tokenizer.tokens.w3"]),
        ("  tokens:\n    w3:\n      source: {kind: copy}\n", ["unknown source kind 'copy'", "t.yml:10:"]),
        ("  pad_to_multiple_of: 0\n", ["pad_to_multiple_of must be a positive integer", "t.yml:8:"]),
        ("  tokens:\n    w3:\n      force: maybe\n", ["force must be true or false", "t.yml:10:"]),
    ],
)  # fmt: skip
def test_token_source_errors(vocabularies, tmp_path: Path, capsys, section: str, expect: list[str]) -> None:
    from test_merge_cli import fails

    _, m = vocabularies
    cfg = tmp_path / "t.yml"
    cfg.write_text(f"merge_method: linear\nmodels:\n  - model: {m['A']}\n    parameters: {{weight: 1}}\n"
                   f"  - model: {m['B']}\n    parameters: {{weight: 1}}\ntokenizer:\n"
                   + section.replace("@A", str(m["A"])))  # fmt: skip
    fails(["run", cfg, "-o", tmp_path / "out"], tmp_path, capsys, *expect)


def test_a_model_without_a_tokenizer_takes_the_base_vocabulary(vocabularies, tmp_path: Path, capsys) -> None:
    """A model directory without tokenizer.json, merged with one of another vocabulary, is taken to have the base's
    vocabulary (as mergekit takes it), with a warning: its row of each token is the row of the base's id."""
    import shutil

    _, m = vocabularies
    b = tmp_path / "B"
    shutil.copytree(m["B"], b)
    (b / "tokenizer.json").unlink()
    cfg = tmp_path / "t.yml"
    cfg.write_text(f"merge_method: linear\nbase_model: {m['P']}\nmodels:\n  - model: {b}\n    parameters: "
                   f"{{weight: 1}}\n  - model: {m['C']}\n    parameters: {{weight: 1}}\n"
                   "tokenizer_source: base\n")  # fmt: skip
    out = tmp_path / "out"
    assert main(["run", str(cfg), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"warning: tokenizer_source: {b} has no readable tokenizer.json: taken to have the vocabulary of" in err
    assert f"the vocabulary of {m['P']}" in err
    got, rb, rc = (load_any(d)["model.embed_tokens.weight"] for d in (out, b, m["C"]))
    assert got.shape == (VOCAB, HIDDEN)
    torch.testing.assert_close(got[5], (rb[5] + rc[6]) / 2, rtol=0, atol=1e-6)  # C's w5 is its row 6
    torch.testing.assert_close(got[31], rb[31], rtol=0, atol=1e-6)  # w31: C lacks it, B's row alone


def test_slices_stack_layers_like_mergekit(runs, passthrough, capsys) -> None:
    tmp = runs["tmp"]
    out = capmerge_run(tmp, "stack", capsys)
    got, mk = load_any(out), load_any(tmp / "mk-stack")
    assert compare(got, mk, 0.0) == 0.0  # copies: bit for bit
    a, b = (load_any(runs["models"][k]) for k in "AB")
    assert torch.equal(got["model.layers.2.mlp.up_proj.weight"], b["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(got["model.layers.1.self_attn.q_proj.weight"], a["model.layers.1.self_attn.q_proj.weight"])
    assert torch.equal(got["lm_head.weight"], b["lm_head.weight"])  # post-layer tensors: the last slice's model
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == json.loads((tmp / "mk-stack" / "config.json").read_text())["num_hidden_layers"]
    assert cfg["num_hidden_layers"] == 5
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert len(model.model.layers) == 5
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 7]])).logits
    assert logits.shape == (1, 3, VOCAB) and torch.isfinite(logits).all()


PADDED = 30  # tokens of the padded models' tokenizer: their embeddings have VOCAB = 32 rows
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


@pytest.fixture(scope="module")
def padded(tmp_path_factory: pytest.TempPathFactory):
    """Two models whose embeddings have two rows more than their tokenizer has tokens (as Qwen2's are padded), and
    mergekit's output with the tokenizer chosen three ways (it keeps one row per token and sets vocab_size), not
    at all, and over A and a model C whose embeddings have one row per token already."""
    require_mergekit()
    tmp = tmp_path_factory.mktemp("padded")
    gen = torch.Generator().manual_seed(11)
    m = {k: save_model(tmp / k, gen) for k in "ABC"}
    for d in m.values():
        save_tokens(d, list(range(PADDED)))
    c = load_any(m["C"])  # C's embeddings resized to its tokens (as a trainer's resize_token_embeddings leaves them)
    save_single(m["C"] / "model.safetensors", {n: t[:PADDED] if n in VOCAB_TENSORS else t for n, t in c.items()})
    (m["C"] / "config.json").write_text(json.dumps({**CONFIG, "vocab_size": PADDED}))
    head = f"merge_method: linear\nmodels:\n  - model: {m['A']}\n    parameters: {{weight: 0.7}}\n"
    head += f"  - model: {m['B']}\n    parameters: {{weight: 0.3}}\ndtype: float32\n"
    cases = {"union": head + "tokenizer_source: union\n", "model": head + f"tokenizer_source: {m['B']}\n",
             "section": head + "tokenizer:\n  source: union\n", "none": head,
             "mixed": head.replace(str(m["B"]), str(m["C"])) + "tokenizer_source: union\n"}  # fmt: skip
    mergekit_outputs(tmp, cases, lambda name: ["--no-cuda"])
    return tmp, m


@pytest.mark.parametrize("name", ["union", "model", "section", "none", "mixed"])
def test_padded_embeddings_keep_a_row_per_token_like_mergekit(padded, name: str, capsys) -> None:
    tmp, _ = padded
    out = capmerge_run(tmp, name, capsys)
    got, mk = load_any(out), load_any(tmp / f"mk-{name}")
    compare(got, mk, FP32_RTOL)  # the same names and shapes, values within float32 rounding (mergekit's FMA)
    rows = VOCAB if name == "none" else PADDED  # without a chosen tokenizer, mergekit keeps every row
    assert got["model.embed_tokens.weight"].shape == got["lm_head.weight"].shape == (rows, HIDDEN)
    cfg, mk_cfg = (json.loads((d / "config.json").read_text()) for d in (out, tmp / f"mk-{name}"))
    assert cfg["vocab_size"] == mk_cfg["vocab_size"] == rows
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(str(out)).get_input_embeddings().weight.shape == (rows, HIDDEN)


@pytest.mark.parametrize(
    "ids,expect",
    [
        ([*range(PADDED), 33], "1 token(s) at ids >= vocab_size 32 (first 33)"),
        ([i for i in range(PADDED) if i != 7], "are not 0 .. 28"),
        ([0, *range(3, PADDED)], "declares special tokens its tokenizer.json lacks (</s>, <s>)"),
    ],
)
def test_tokenizer_ids_mergekit_would_rewrite_are_refused(tmp_path: Path, capsys, ids: list[int], expect: str) -> None:
    from test_merge_cli import fails

    gen = torch.Generator().manual_seed(5)
    a = save_model(tmp_path / "A", gen)
    save_tokens(a, ids)
    cfg = tmp_path / "t.yml"
    cfg.write_text(
        f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 1}}\ntokenizer_source: {a}\n"
    )
    fails(["run", cfg, "-o", tmp_path / "out"], tmp_path, capsys, expect, "t.yml:5: tokenizer_source")


HEAD, EMBED = "lm_head.weight", "model.embed_tokens.weight"


def save_tied(d: Path, gen: torch.Generator, tied: bool) -> Path:
    """A model whose config ties its head to its embeddings (no lm_head.weight saved, as transformers saves Qwen2's
    small models or Llama 3.2 1B), or one with its own head."""
    save_model(d, gen)
    t = load_any(d)
    save_single(d / "model.safetensors", {n: v for n, v in t.items() if n != HEAD or not tied})
    (d / "config.json").write_text(json.dumps({**CONFIG, "tie_word_embeddings": tied}))
    return d


@pytest.fixture(scope="module")
def tied(tmp_path_factory: pytest.TempPathFactory):
    """Tied models T1, T2 and untied U1, U2, and mergekit's output for a base that has its head with tied models
    (``untied_base``, the tied model's head weighted by a filter on lm_head), and a tied base with an untied model
    (``tied_base``: mergekit merges and writes the head)."""
    require_mergekit()
    tmp = tmp_path_factory.mktemp("tied")
    gen = torch.Generator().manual_seed(13)
    m = {k: save_tied(tmp / k, gen, k.startswith("T")) for k in ("T1", "T2", "U1", "U2")}
    weight = "[{filter: lm_head, value: 0.2}, {value: 0.6}]"
    cases = {
        "untied_base": f"merge_method: ties\nbase_model: {m['U1']}\nmodels:\n"
        f"  - model: {m['T1']}\n    parameters: {{weight: {weight}, density: 0.5}}\n"
        f"  - model: {m['U2']}\n    parameters: {{weight: 0.4, density: 0.7}}\ndtype: float32\n",
        "tied_base": f"merge_method: slerp\nbase_model: {m['T1']}\nmodels:\n  - model: {m['T1']}\n"
        f"  - model: {m['U1']}\nparameters: {{t: 0.3}}\ndtype: float32\n",
        "all_tied": f"merge_method: task_arithmetic\nbase_model: {m['T1']}\nmodels:\n"
        f"  - model: {m['T2']}\n    parameters: {{weight: 0.5}}\ndtype: float32\n",
    }
    mergekit_outputs(tmp, cases, lambda name: ["--no-cuda", "--no-copy-tokenizer"])
    return tmp, m


@pytest.mark.parametrize("name", ["untied_base", "tied_base", "all_tied"])
def test_tied_embeddings_merge_like_mergekit(tied, name: str, capsys) -> None:
    """A tied model's head is its embedding matrix (transformers, mergekit): merged with models that have a head of
    their own, the same output as mergekit's, the filter on lm_head applied to the tied model's head too."""
    from transformers import AutoModelForCausalLM

    tmp, m = tied
    out = capmerge_run(tmp, name, capsys)
    got, mk = load_any(out), load_any(tmp / f"mk-{name}")
    compare(got, mk, FP32_RTOL)
    assert (HEAD in got) == (name != "all_tied")
    if name == "untied_base":  # by hand: ties over τ = head − U1's head, T1's head its embeddings, weight 0.2 there
        t1, u1, u2 = (load_any(m[k]) for k in ("T1", "U1", "U2"))
        from capmerge import functional as F

        taus = [F.magnitude_prune(t1[EMBED] - u1[HEAD], 0.5), F.magnitude_prune(u2[HEAD] - u1[HEAD], 0.7)]
        weighted = [0.2 * taus[0], 0.4 * taus[1]]
        sign = torch.where(weighted[0] + weighted[1] >= 0, 1.0, -1.0)
        agree = [(torch.sign(w) == sign) & (w != 0) for w in weighted]
        num = sum(torch.where(a, w, 0.0) for a, w in zip(agree, weighted, strict=True))
        den = sum(torch.where(a, c, 0.0) for a, c in zip(agree, (0.2, 0.4), strict=True)).clamp(min=1e-30)
        torch.testing.assert_close(got[HEAD], u1[HEAD] + torch.where(den > 0.0, num / den, 0.0), rtol=0, atol=1e-6)
    cfg = json.loads((out / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(str(out))
    if name == "tied_base":  # the merged head written beside embeddings the base ties: the config unties them
        assert cfg["tie_word_embeddings"] is False
        assert torch.equal(model.get_output_embeddings().weight, got[HEAD])
        assert not torch.equal(got[HEAD], got[EMBED])
    else:
        assert cfg["tie_word_embeddings"] is (name == "all_tied")
        want = got[EMBED] if name == "all_tied" else got[HEAD]
        assert torch.equal(model.get_output_embeddings().weight, want)


def test_a_missing_head_of_an_untied_model_is_refused(tmp_path: Path, capsys) -> None:
    """A model without lm_head.weight whose config says tie_word_embeddings: false lacks a tensor: refused."""
    from test_merge_cli import fails

    gen = torch.Generator().manual_seed(17)
    base, a = save_tied(tmp_path / "B", gen, False), save_tied(tmp_path / "A", gen, True)
    (a / "config.json").write_text(json.dumps({**CONFIG, "tie_word_embeddings": False}))
    cfg = tmp_path / "t.yml"
    cfg.write_text(f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: {a}\n"
                   "    parameters: {weight: 1}\n")  # fmt: skip
    fails(["run", cfg, "-o", tmp_path / "out"], tmp_path, capsys, f"tensor {HEAD} is missing in model {a}",
          "t.yml:4: models[0].model")  # fmt: skip


@pytest.mark.parametrize("broken", ["missing", "a list"])
@pytest.mark.parametrize(("section", "asked"), [
    ("  tokens:\n    newtok:\n      source: {kind: zero}\n", "tokens"),
    ("  pad_to_multiple_of: 64\n", "pad_to_multiple_of"),
])  # fmt: skip
def test_a_tokenizer_section_needs_a_readable_chosen_tokenizer(vocabularies, tmp_path: Path, capsys, broken: str,
                                                               section: str, asked: str) -> None:  # fmt: skip
    """A tokenizer section's tokens or padding whose chosen source has no readable tokenizer.json: one error naming
    the section's settings and the source (the section was dropped without a word, the merge written)."""
    import shutil

    from test_merge_cli import fails

    _, m = vocabularies
    b = tmp_path / "B"
    shutil.copytree(m["B"], b)
    if broken == "missing":
        (b / "tokenizer.json").unlink()
    else:
        (b / "tokenizer.json").write_text("[]")
    cfg = tmp_path / "t.yml"
    cfg.write_text(f"merge_method: linear\nmodels:\n  - model: {m['A']}\n    parameters: {{weight: 1}}\n"
                   f"  - model: {b}\n    parameters: {{weight: 1}}\ntokenizer:\n  source: {b}\n{section}")  # fmt: skip
    fails(["run", cfg, "-o", tmp_path / "out"], tmp_path, capsys,
          f"tokenizer: the section's {asked} need the chosen tokenizer.json, and {b} has none that can be read",
          "t.yml:8: tokenizer.source")  # fmt: skip


def test_an_unreadable_tokenizer_is_refused(vocabularies, tmp_path: Path, capsys) -> None:
    import shutil

    from test_merge_cli import fails

    _, m = vocabularies
    b = tmp_path / "B"
    shutil.copytree(m["B"], b)
    doc = json.loads((b / "tokenizer.json").read_text())
    doc["added_tokens"] = [{"content": "<|im_start|>"}]  # no id
    (b / "tokenizer.json").write_text(json.dumps(doc))
    cfg = tmp_path / "t.yml"
    cfg.write_text(f"merge_method: linear\nmodels:\n  - model: {m['A']}\n    parameters: {{weight: 1}}\n"
                   f"  - model: {b}\n    parameters: {{weight: 1}}\ntokenizer_source: union\n")  # fmt: skip
    fails(["run", cfg, "-o", tmp_path / "out"], tmp_path, capsys,
          f"cannot read the tokens of {b}'s tokenizer.json (KeyError: 'id')", "t.yml:7: tokenizer_source")  # fmt: skip
