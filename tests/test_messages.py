"""Hostile inputs end in one worded `error:` line naming the file, never in a bare Python exception.

Each case is an input that once printed ``error: RecursionError: ...``, ``error: ValueError: Exceeds the limit
(4300 digits) ...``, ``error: TypeError: unhashable type ...`` or ``error: OverflowError: ...``. The expected
phrases come from the rules (4300 is Python's default ``sys.get_int_max_str_digits()``; 99999 the last block index
``--layers`` takes; 64 the nesting a state dict may have), not from a previous run.
"""

from __future__ import annotations

import json
import re
import struct
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import save_single, tree_digest

from capmerge.cli import main

# ^error: [A-Z][A-Za-z]*(Error|Exception)\b, widened to private and dotted names (torch's _LinAlgError)
CLASS_NAME = re.compile(r"^error: [A-Za-z_][A-Za-z_.]*(Error|Exception)\b")
DEEP = "[" * 100_000 + "]" * 100_000  # far past any parser's recursion limit
BIG = "9" * 5000  # past Python's 4300-digit limit for int(str)


def raw_safetensors(path: Path, header: str, data: bytes = b"") -> Path:
    h = header.encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return path


def good(tmp: Path, name: str = "good.safetensors") -> Path:
    return save_single(tmp / name, {"layers.0.w": torch.ones(4), "b": torch.zeros(2)})


def index_dir(tmp: Path, index_text: str) -> Path:
    d = tmp / "sharded"
    save_single(d / "model-00001-of-00001.safetensors", {"w": torch.ones(2)})
    (d / "model.safetensors.index.json").write_text(index_text)
    return d


def adapter_dir(tmp: Path, config_text: str) -> Path:
    d = tmp / "adapter"
    save_single(d / "adapter_model.safetensors", {"base_model.model.l.lora_A.weight": torch.ones(2, 4),
                                                  "base_model.model.l.lora_B.weight": torch.ones(4, 2)})  # fmt: skip
    (d / "adapter_config.json").write_text(config_text)
    return d


def deep_pickle(tmp: Path) -> Path:
    nested: dict = {"w": torch.ones(2)}
    for _ in range(200):
        nested = {"a": nested}
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(10_000)  # torch.save recurses once per level
    try:
        torch.save(nested, tmp / "deep.pt")
    finally:
        sys.setrecursionlimit(limit)
    return tmp / "deep.pt"


def block_name_file(tmp: Path, name: str) -> Path:
    header = json.dumps({f"layers.{BIG}.w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})
    return raw_safetensors(tmp / name, header, b"\0" * 4)


Case = Callable[[Path], tuple[list[object], str, str]]  # tmp -> (argv, expected phrase, text naming the file)
CASES: dict[str, Case] = {}


def case(name: str) -> Callable[[Case], Case]:
    def register(fn: Case) -> Case:
        CASES[name] = fn
        return fn

    return register


def _header(t: Path, header: str) -> tuple[list[object], str, str]:
    # the wording belongs to the header validation; the contract (one worded line naming the file) is checked
    p = raw_safetensors(t / "h.safetensors", header, b"\0" * 4)
    return ["inspect", p], "", str(p)


case("header nested 100000 deep")(lambda t: _header(t, '{"a":' + DEEP + "}"))
case("header __metadata__ nested 100000 deep")(lambda t: _header(t, '{"__metadata__":' + DEEP + "}"))
case("header shape of 5000 digits")(
    lambda t: _header(t, '{"w":{"dtype":"F32","shape":[' + BIG + '],"data_offsets":[0,4]}}')
)
case("header offset of 5000 digits")(
    lambda t: _header(t, '{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,' + BIG + "]}}")
)
case("header dtype a mapping")(lambda t: _header(t, '{"w":{"dtype":{},"shape":[1],"data_offsets":[0,4]}}'))


@case("index nested 100000 deep")
def _(t: Path) -> tuple[list[object], str, str]:
    d = index_dir(t, '{"weight_map":' + DEEP + "}")
    return ["inspect", d], "index is not valid JSON: nested too deeply", str(d / "model.safetensors.index.json")


@case("index total_size of 5000 digits")
def _(t: Path) -> tuple[list[object], str, str]:
    d = index_dir(t, '{"metadata":{"total_size":' + BIG + '},"weight_map":{"w":"model-00001-of-00001.safetensors"}}')
    return ["inspect", d], "index holds an integer with more than 4300 digits", str(d / "model.safetensors.index.json")


@case("adapter_config nested 100000 deep")
def _(t: Path) -> tuple[list[object], str, str]:
    d = adapter_dir(t, '{"r":2,"x":' + DEEP + "}")
    return ["inspect", d], "adapter_config.json is not valid JSON: nested too deeply", str(d / "adapter_config.json")


@case("adapter_config r of 5000 digits")
def _(t: Path) -> tuple[list[object], str, str]:
    d = adapter_dir(t, '{"r":' + BIG + ',"lora_alpha":2}')
    return (
        ["inspect", d],
        "adapter_config.json holds an integer with more than 4300 digits",
        str(d / "adapter_config.json"),
    )


@case("model config.json nested 100000 deep")
def _(t: Path) -> tuple[list[object], str, str]:
    for d in (t / "A", t / "B"):
        d.mkdir()
        save_single(d / "model.safetensors", {"w": torch.ones(2)})
        (d / "config.json").write_text('{"model_type": "llama"}')
    (t / "A" / "config.json").write_text('{"x":' + DEEP + "}")
    argv: list[object] = ["merge", t / "A", t / "B", "--method", "linear", "--weights", "1", "-o", t / "out"]
    return argv, "config.json is not valid JSON: nested too deeply", str(t / "A" / "config.json")


@case("chat_template.jinja not UTF-8")
def _(t: Path) -> tuple[list[object], str, str]:
    for d in (t / "A", t / "B"):
        d.mkdir()
        save_single(d / "model.safetensors", {"w": torch.ones(2)})
    (t / "A" / "chat_template.jinja").write_bytes(b"\xff\xfe{{ messages }}")
    cfg = t / "cfg.yml"
    cfg.write_text(f"merge_method: linear\nmodels:\n  - model: {t / 'A'}\n    parameters: {{weight: 1}}\n"
                   f"  - model: {t / 'B'}\n    parameters: {{weight: 1}}\nchat_template: auto\n")  # fmt: skip
    return ["run", cfg, "-o", t / "out"], "chat_template.jinja is not valid UTF-8", str(t / "A" / "chat_template.jinja")


@case("compressed-vector table nested 100000 deep")
def _(t: Path) -> tuple[list[object], str, str]:
    meta = {"capmerge.vector_format": "lowrank", "capmerge.tensors": DEEP}
    p = save_single(t / "c.safetensors", {"w": torch.ones(2)}, meta)
    return ["inspect", p], "lowrank vector without a valid capmerge.tensors header entry", str(p)


@case("compressed-vector dtype a mapping")
def _(t: Path) -> tuple[list[object], str, str]:
    table = {"w": {"dtype": {}, "shape": [2], "storage": "dense"}}
    p = save_single(t / "c.safetensors", {"w": torch.ones(2)},
                    {"capmerge.vector_format": "lowrank", "capmerge.tensors": json.dumps(table)})  # fmt: skip
    return ["inspect", p], "invalid dtype or storage in the capmerge.tensors entry of tensor w", str(p)


@case("state dict nested 200 deep")
def _(t: Path) -> tuple[list[object], str, str]:
    p = deep_pickle(t)
    return ["inspect", p], "state dict nested more than 64 levels deep", str(p)


@case("block index of 5000 digits in a tensor name")
def _(t: Path) -> tuple[list[object], str, str]:
    header = json.dumps({f"layers.{BIG}.w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})
    p = raw_safetensors(t / "n.safetensors", header, b"\0" * 4)
    return ["inspect", p], "the block index in the tensor name has 5000 digits", "(layers.999"


@case("--layers of 5000 digits")
def _(t: Path) -> tuple[list[object], str, str]:
    argv: list[object] = ["apply", good(t), good(t, "v.safetensors"), "-o", t / "out", "--layers", BIG]
    return argv, "block indices stop at 99999", "--layers"


@case("--layers range ending at 5000 digits")
def _(t: Path) -> tuple[list[object], str, str]:
    argv: list[object] = ["apply", good(t), good(t, "v.safetensors"), "-o", t / "out", "--layers", "0-" + BIG]
    return argv, "block indices stop at 99999", "--layers"


@case("--shard-size of 5000 digits")
def _(t: Path) -> tuple[list[object], str, str]:
    argv: list[object] = ["diff", good(t), good(t, "a.safetensors"), "-o", t / "out", "--shard-size", BIG]
    return argv, "size too large", "(5000 characters)"


@case("MODEL+LORA given to diff")
def _(t: Path) -> tuple[list[object], str, str]:
    model, adapter = good(t), adapter_dir(t, '{"r":2,"lora_alpha":2,"peft_type":"LORA"}')
    ref = f"{model}+{adapter}"  # mergekit's form, which diff does not read: the hint names what does
    return ["diff", model, ref, "-o", t / "out"], "MODEL+LORA is mergekit's form, read by `capmerge merge`", ref


@case("Hub repo id of 300 characters")
def _(t: Path) -> tuple[list[object], str, str]:
    return ["pull", "a" * 300 + "/b", "-o", t / "pulled"], "invalid Hub repo id", "(hf://aaaa"


def run(argv: list[object], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def assert_one_worded_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err[:2000]
    line = lines[0]
    assert line.startswith("error: ") and not line.startswith("error: error:"), line[:300]
    assert not CLASS_NAME.match(line), line[:300]
    assert "Traceback" not in err
    return line


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_hostile_input_gives_one_worded_error_naming_the_file(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv, phrase, where = CASES[case](tmp_path)
    before = tree_digest(tmp_path)
    code, out, err = run(argv, capsys)
    line = assert_one_worded_line(err)
    assert code == 2, (code, line[:300])
    assert phrase in line, line[:300]
    assert where in line, line[:300]
    assert tree_digest(tmp_path) == before, "a file was written or an input touched"


@pytest.mark.parametrize(
    "exc, words",
    [
        (RecursionError("maximum recursion depth exceeded"), "nested too deeply"),
        (ValueError("Exceeds the limit (4300 digits) for integer string conversion"), "more than 4300 digits"),
        (ZeroDivisionError("division by zero"), "division by zero"),
        (IndexError("list index out of range"), "an item that is not there (list index out of range)"),
        (KeyError("w"), "an item that is not there ('w')"),
        (AttributeError("'NoneType' object has no attribute 'x'"), "'NoneType' object has no attribute 'x'"),
        (TypeError("unhashable type: 'LineList'"), "unhashable type: 'LineList'"),
        (re.error("missing ), unterminated subpattern", "(", 0), "invalid regular expression (missing )"),
        (OverflowError("cannot convert float infinity to integer"), "a number too large to handle"),
        (RuntimeError(""), "a failure without a message"),
        (RuntimeError("first line\nsecond line"), "first line"),
    ],
    ids=lambda x: type(x).__name__ if isinstance(x, BaseException) else None,
)
def test_unexpected_exception_is_one_line_naming_command_and_input(
    exc: BaseException, words: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The catch-all: a failure nothing turned into a message still says what was run on what, in words, exit 1."""
    import capmerge.analysis.stats

    def boom(*args: object, **kwargs: object) -> None:
        raise exc

    monkeypatch.setattr(capmerge.analysis.stats, "inspect", boom)
    path = good(tmp_path)
    code, out, err = run(["inspect", path], capsys)
    line = assert_one_worded_line(err)
    assert code == 1
    assert line.startswith(f"error: unexpected failure in `capmerge inspect` on {path}: "), line
    assert words in line, line
    assert "second line" not in line
    kind = "re.error" if isinstance(exc, re.error) else type(exc).__name__
    assert f"[{kind}; CAPMERGE_DEBUG=1 shows the traceback" in line


def test_unexpected_exception_with_debug_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import capmerge.analysis.stats

    def boom(*args: object, **kwargs: object) -> None:
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(capmerge.analysis.stats, "inspect", boom)
    monkeypatch.setenv("CAPMERGE_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        main(["inspect", str(good(tmp_path))])


def test_nan_matrix_has_no_spectrum_and_stays_dense_when_compressed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The SVD of a matrix holding NaN does not converge (torch raised _LinAlgError, printed as an unexpected failure);
    inspect shows no spectrum for it, compress keeps it dense with its values."""
    from safetensors.torch import load_file

    nan = torch.full((4, 4), float("nan"))
    p = save_single(tmp_path / "nan.safetensors", {"m": nan, "ok": torch.ones(4, 4)})
    code, out, err = run(["inspect", p, "--by", "tensor", "--spectrum"], capsys)
    assert code == 0, err
    assert next(ln for ln in out.splitlines() if "│ m " in ln).rstrip(" │").endswith("– (NaN/Inf)"), out
    code, out, err = run(["compress", p, "-o", tmp_path / "c.safetensors", "--rank", "1"], capsys)
    assert code == 0, err
    stored = load_file(tmp_path / "c.safetensors")
    assert torch.isnan(stored["m"]).all() and stored["m"].shape == (4, 4)
    # ones(4, 4) = 2·(½,½,½,½)ᵀ·2(½,½,½,½): rank 1, stored as B (4×1) · A (1×4)
    assert torch.allclose(stored["ok.lora_B"] @ stored["ok.lora_A"], torch.ones(4, 4))
