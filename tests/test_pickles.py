"""PyTorch state dicts (.bin/.pt/.pth, sharded index, nested, DDP-prefixed), name pairing, tied weights, refusals."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import load_any, save_single, tree_digest
from safetensors.torch import load_file

import capmerge
from capmerge.cli import main
from capmerge.errors import CheckpointError, MismatchError, UsageError


def tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(11, 4, generator=g),
        "layers.0.w": torch.randn(4, 4, generator=g),
        "layers.0.b": torch.randn(4, generator=g).bfloat16(),
        "layers.1.w": torch.randn(3, 4, generator=g).half(),
    }


def run_cli(*args: str) -> int:
    return main([str(a) for a in args])


def test_plain_nested_and_prefixed_pickles_diff_like_safetensors(tmp_path: Path) -> None:
    s, a = tensors(0), tensors(1)
    torch.save(s, tmp_path / "sft.bin")
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in a.items()}, "lr": 0.1}, tmp_path / "aux.pt")
    summary = capmerge.diff(tmp_path / "sft.bin", tmp_path / "aux.pt", tmp_path / "tau.safetensors")
    tau = load_file(str(tmp_path / "tau.safetensors"))
    assert set(tau) == set(s)
    for k in s:
        ref = (a[k].float() - s[k].float()).to(a[k].dtype)
        assert tau[k].dtype == a[k].dtype and torch.equal(tau[k], ref), k
    assert any("unwrapped key 'state_dict'" in n for n in summary.notes), summary.notes
    assert any("'module.'" in n and "4 tensors" in n for n in summary.notes), summary.notes


def test_key_option_and_dotted_key(tmp_path: Path) -> None:
    a = tensors(1)
    torch.save({"model": a, "ema": {k: v * 2 for k, v in a.items()}}, tmp_path / "both.pth")
    with pytest.raises(
        CheckpointError, match=r"several entries hold tensors \('model', 'ema'\); choose one with --key"
    ):
        capmerge.open_checkpoint(tmp_path / "both.pth")
    ck = capmerge.open_checkpoint(tmp_path / "both.pth", key="ema")
    assert torch.equal(ck.read_tensor("layers.0.w"), a["layers.0.w"] * 2)
    torch.save({"outer": {"inner": a}, "meta": {"x": 1}}, tmp_path / "deep.pt")
    ck = capmerge.open_checkpoint(tmp_path / "deep.pt", key="outer.inner")
    assert set(ck.tensors) == set(a)
    with pytest.raises(CheckpointError, match="no key 'nope' in the pickle"):
        capmerge.open_checkpoint(tmp_path / "deep.pt", key="nope")


def test_sharded_bin_index_and_directory(tmp_path: Path) -> None:
    a = tensors(2)
    d = tmp_path / "ck"
    d.mkdir()
    names = list(a)
    wmap = {}
    for i, part in enumerate((names[:2], names[2:])):
        fname = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({k: a[k] for k in part}, d / fname)
        wmap.update({k: fname for k in part})
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
    (d / "config.json").write_text("{}")
    ck = capmerge.open_checkpoint(d)
    assert ck.sharded and set(ck.tensors) == set(a) and len(ck.files) == 2
    for k, v in a.items():
        assert torch.equal(ck.read_tensor(k), v)
    # apply onto the pickle base: the output is safetensors, mirroring the base's shards, configs copied
    vec = save_single(tmp_path / "v.safetensors", {k: torch.ones_like(v) for k, v in a.items()})
    capmerge.apply(d, [vec], tmp_path / "out", alpha=0.5)
    out = load_any(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "capmerge.json", "config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ]  # fmt: skip
    assert set(out) == set(a)
    for k, v in a.items():
        assert torch.equal(out[k], (v.float() + 0.5).to(v.dtype)), k


def test_legacy_format_reads(tmp_path: Path) -> None:
    a = tensors(3)
    torch.save(a, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    ck = capmerge.open_checkpoint(tmp_path / "old.pt")
    assert all(torch.equal(ck.read_tensor(k), v) for k, v in a.items())


class Payload:
    """Unpickling this would create the file named by ``path`` (if code from the pickle ran)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):  # noqa: ANN204
        return (open, (self.path, "w"))


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "pwned"
    torch.save({"w": torch.ones(2), "evil": Payload(str(marker))}, tmp_path / "evil.bin")
    assert not marker.exists()
    with pytest.raises(CheckpointError, match=r"Unsupported global: GLOBAL (io|builtins)\.open.*--trust-pickle"):
        capmerge.open_checkpoint(tmp_path / "evil.bin")
    assert not marker.exists(), "code from the pickle ran"
    before = tree_digest(tmp_path)
    code = run_cli("diff", tmp_path / "evil.bin", tmp_path / "evil.bin", "-o", tmp_path / "t.safetensors")
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: pickle holds more than tensors"), err
    assert not marker.exists() and tree_digest(tmp_path) == before


def test_trust_pickle_warns_and_leaves_out_non_tensors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.save({"w": torch.ones(2), "cfg": Payload(str(tmp_path / "made"))}, tmp_path / "t.bin")
    ck = capmerge.open_checkpoint(tmp_path / "t.bin", trust_pickle=True)
    assert "warning: loading" in capsys.readouterr().err
    assert (tmp_path / "made").exists()  # with --trust-pickle code runs: that is what the warning says
    assert list(ck.tensors) == ["w"] and any("left out 1 non-tensor" in n for n in ck.notes)


def test_renames_prefixes_and_list_tensors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    s, a = tensors(0), tensors(1)
    save_single(tmp_path / "s.safetensors", {f"model.{k}": v for k, v in s.items()})
    torch.save({f"_orig_mod.backbone.{k}": v for k, v in a.items()}, tmp_path / "a.pt")
    with pytest.raises(MismatchError, match="tensor names differ"):
        capmerge.diff(tmp_path / "s.safetensors", tmp_path / "a.pt", tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
    pairs = capmerge.api.diff_pairs(tmp_path / "s.safetensors", tmp_path / "a.pt", rename=[r"backbone\.=model."])
    assert pairs["pairs"]["model.layers.0.w"] == ["model.layers.0.w", "_orig_mod.backbone.layers.0.w"]
    assert not pairs["only_base"] and not pairs["only_aux"]
    code = run_cli("diff", tmp_path / "s.safetensors", tmp_path / "a.pt", "--rename", r"backbone\.=model.",
                   "--list-tensors")  # fmt: skip
    out = capsys.readouterr()
    assert code == 0 and "model.layers.0.w   (BASE model.layers.0.w, AUX _orig_mod.backbone.layers.0.w)" in out.out
    assert "prefix '_orig_mod.model.'" in out.err and not (tmp_path / "capvector.safetensors").exists()
    capmerge.diff(
        tmp_path / "s.safetensors", tmp_path / "a.pt", tmp_path / "t.safetensors", rename=r"backbone\.=model."
    )
    tau = load_file(str(tmp_path / "t.safetensors"))
    assert set(tau) == {f"model.{k}" for k in s}
    # apply of a vector with other prefixes onto the base: paired automatically, output keeps the base's names
    capmerge.apply(tmp_path / "s.safetensors", [tmp_path / "t.safetensors"], tmp_path / "m.safetensors")
    merged = load_file(str(tmp_path / "m.safetensors"))
    torch.save({f"module.{k}": v for k, v in tau.items()}, tmp_path / "ddp.pt")
    desc = capmerge.list_tensors(tmp_path / "s.safetensors", [tmp_path / "ddp.pt"])
    assert desc["pairs"]["model.layers.0.w"] == [[str(tmp_path / "ddp.pt"), "module.model.layers.0.w"]]
    capmerge.apply(tmp_path / "s.safetensors", [tmp_path / "ddp.pt"], tmp_path / "m2.safetensors")
    merged2 = load_file(str(tmp_path / "m2.safetensors"))
    assert set(merged2) == {f"model.{k}" for k in s}
    for k in merged:
        assert torch.equal(merged[k], merged2[k]), k


def test_rename_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    save_single(tmp_path / "s.safetensors", tensors(0))
    with pytest.raises(UsageError, match="expected 'REGEX=REPLACEMENT'"):
        capmerge.diff(tmp_path / "s.safetensors", tmp_path / "s.safetensors", tmp_path / "o.safetensors", rename="x")
    with pytest.raises(MismatchError, match="--rename maps .* to the same name x"):
        capmerge.diff(tmp_path / "s.safetensors", tmp_path / "s.safetensors", tmp_path / "o.safetensors",
                      rename=r"layers\.\d\.w=x")  # fmt: skip
    code = run_cli("apply", tmp_path / "s.safetensors", tmp_path / "s.safetensors", "-o", tmp_path / "o.safetensors",
                   "--rename", "(=y")  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: invalid --rename '(=y'") and err.count("\n") == 1, err
    assert not (tmp_path / "o.safetensors").exists()


def test_tied_weights_written_once_and_reported(tmp_path: Path) -> None:
    def tied_model(seed: int) -> dict[str, torch.Tensor]:
        t = tensors(seed)
        t["lm_head.weight"] = t["embed.weight"]  # the same storage, as a tied model's state_dict()
        return t

    s, a = tied_model(0), tied_model(1)
    torch.save(s, tmp_path / "s.bin")
    torch.save(a, tmp_path / "a.bin")
    summary = capmerge.diff(tmp_path / "s.bin", tmp_path / "a.bin", tmp_path / "t.safetensors")
    tau = load_file(str(tmp_path / "t.safetensors"))
    assert "lm_head.weight" not in tau and torch.equal(tau["embed.weight"], a["embed.weight"] - s["embed.weight"])
    assert summary.tied == {"lm_head.weight": "embed.weight"}
    assert any("tied: lm_head.weight shares the storage of embed.weight" in n for n in summary.notes)
    meta = capmerge.open_checkpoint(tmp_path / "t.safetensors").metadata
    assert json.loads(meta["capmerge.tied"]) == {"lm_head.weight": "embed.weight"}
    # a base saved by save_pretrained (tie dropped) against a pickle with the alias: paired, written once
    save_single(tmp_path / "hf.safetensors", {k: v for k, v in s.items() if k != "lm_head.weight"})
    capmerge.diff(tmp_path / "hf.safetensors", tmp_path / "a.bin", tmp_path / "t2.safetensors")
    assert set(load_file(str(tmp_path / "t2.safetensors"))) == set(tau)
    # a side where lm_head is a separate tensor: nothing is dropped, both are diffed
    untied = {k: v.clone() for k, v in s.items()}
    save_single(tmp_path / "untied.safetensors", untied)
    summary = capmerge.diff(tmp_path / "untied.safetensors", tmp_path / "a.bin", tmp_path / "t3.safetensors")
    t3 = load_file(str(tmp_path / "t3.safetensors"))
    assert torch.equal(t3["lm_head.weight"], a["embed.weight"] - s["embed.weight"]) and not summary.tied


def test_pickle_error_paths(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty.bin").write_bytes(b"")
    (tmp_path / "junk.pt").write_bytes(b"not a pickle at all")
    torch.save([torch.ones(1)], tmp_path / "list.pt")
    torch.save({"a": 1, "b": "x"}, tmp_path / "none.pt")
    torch.save({"w": torch.ones(2, dtype=torch.complex64)}, tmp_path / "cplx.pt")
    d = tmp_path / "two"
    d.mkdir()
    torch.save({"w": torch.ones(1)}, d / "a.bin")
    torch.save({"w": torch.ones(1)}, d / "b.pt")
    cases = {
        tmp_path / "empty.bin": "empty file, not a PyTorch checkpoint",
        tmp_path / "junk.pt": "not a readable PyTorch checkpoint",
        tmp_path / "list.pt": "pickle holds a list, not a state dict",
        tmp_path / "none.pt": "no tensors in the pickle",
        tmp_path / "cplx.pt": "unsupported tensor type torch.complex64 of tensor w",
        d: "directory holds several weight sets (a.bin, b.pt)",
    }
    save_single(tmp_path / "ok.safetensors", {"w": torch.ones(1)})
    before = tree_digest(tmp_path)
    for path, message in cases.items():
        code = run_cli("diff", tmp_path / "ok.safetensors", path, "-o", tmp_path / "o.safetensors")
        err = capsys.readouterr().err
        assert code == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1, (path, err)
        assert f"({path})" in err or f"({os.fspath(path)}" in err, err
    assert tree_digest(tmp_path) == before


class SystemPayload:
    """Unpickling this runs ``os.system`` (creating ``path`` with a shell command) if code from the pickle ran."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):  # noqa: ANN204
        return (os.system, (f"touch {self.path}",))


def _one_refusal(code: int, err: str, path: Path) -> str:
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: pickle holds more than tensors"), err
    assert err.rstrip("\n").endswith(f"({path})"), err
    assert (
        "Weights only load failed" not in err and "In PyTorch 2.6" not in err and "Check the documentation" not in err
    )
    return err


@pytest.mark.parametrize("save", ["torch.save", "pickle protocol 2"])
def test_os_system_pickle_names_the_global_and_runs_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], save: str
) -> None:
    import pickle

    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    if save == "torch.save":
        torch.save({"w": torch.ones(2), "evil": SystemPayload(str(marker))}, path)
    else:  # the legacy, non-zip layout torch.load also reads
        path.write_bytes(pickle.dumps({"evil": SystemPayload(str(marker))}, protocol=2))
    glob = f"{os.system.__module__}.{os.system.__name__}"  # posix.system here, nt.system on Windows
    before = tree_digest(tmp_path)
    for args in (["inspect", path], ["diff", path, path, "-o", tmp_path / "t.safetensors"]):
        err = _one_refusal(run_cli(*args), capsys.readouterr().err, path)
        assert f"(Unsupported global: GLOBAL {glob}" in err, err
    assert not marker.exists(), "code from the pickle ran"
    assert tree_digest(tmp_path) == before


@pytest.mark.parametrize(
    "obj, glob",
    [
        (torch.nn.Linear(2, 2), "torch.nn.modules.linear.Linear"),  # a module pickled whole
        (__import__("fractions").Fraction(1, 3), "fractions.Fraction"),  # a class outside torch's allow-list
        (__import__("shutil").rmtree, "shutil.rmtree"),  # a function that would delete files
    ],
    ids=["module", "Fraction", "rmtree"],
)
def test_other_unsupported_globals_are_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], obj: object, glob: str
) -> None:
    path = tmp_path / "x.pt"
    torch.save({"w": torch.ones(2), "x": obj}, path)
    err = _one_refusal(run_cli("inspect", path), capsys.readouterr().err, path)
    assert f"(Unsupported global: GLOBAL {glob}" in err, err


# torch's texts, as its versions word them (a reason must come out of each, and a fallback when none is given)
_TORCH_24 = (
    "Weights only load failed. Re-running `torch.load` with `weights_only` set to `False` will likely succeed, but it "
    "can result in arbitrary code execution. Do it only if you got the file from a trusted source.\n Please file an "
    "issue with the following so that we can make `weights_only=True` compatible with your use case: WeightsUnpickler "
    "error: Unsupported global: GLOBAL posix.system was not an allowed global by default. Please use "
    "`torch.serialization.add_safe_globals([system])` to allowlist this global if you trust this class/function."
)
_TORCH_26_BLOCKED = (
    "Weights only load failed. In PyTorch 2.6, we changed the default value of the `weights_only` argument in "
    "`torch.load` from `False` to `True`. Re-running `torch.load` with `weights_only` set to `False` will likely "
    "succeed, but it can result in arbitrary code execution. Do it only if you got the file from a trusted source."
    "\n\n\nTrying to load unsupported GLOBAL posix.system whose module posix is blocked.\n\nCheck the documentation "
    "of torch.load to learn more about types accepted by default with weights_only https://pytorch.org/docs/stable/"
    "generated/torch.load.html."
)


@pytest.mark.parametrize(
    "message, refused, reason",
    [
        (_TORCH_24, True, "Unsupported global: GLOBAL posix.system"),
        (_TORCH_26_BLOCKED, True, "Unsupported global: GLOBAL posix.system, whose module posix is blocked"),
        ("Weights only load failed.\nWeightsUnpickler error: Unsupported operand 149\n", False,
         "pickle opcode 149 (FRAME) is not supported by the weights-only unpickler"),
        ("Weights only load failed. Re-running...\n\tWeightsUnpickler error: Unsupported class numpy.dtype. Please "
         "file an issue", True, "Unsupported class numpy.dtype"),
        ("Weights only load failed. In PyTorch 2.6, we changed...\n\n``torch.nested`` and ``torch._dynamo`` must be "
         "imported to load nested jagged tensors (NJTs)\n\nCheck the documentation of torch.load",
         False, "``torch.nested`` and ``torch._dynamo`` must be imported to load nested jagged tensors (NJTs)"),
        ("invalid load key, 'n'.", False, "invalid load key, 'n'."),
        ("Weights only load failed.\n\nCheck the documentation of torch.load", False,
         "the weights-only unpickler refused it"),
    ],
)  # fmt: skip
def test_refusal_reason_is_extracted_from_each_wording(message: str, refused: bool, reason: str) -> None:
    from capmerge.io.pickles import refusal_reason

    assert refusal_reason(message) == (refused, reason)
