"""LoRA adapters built with PEFT on a tiny model: exact low-rank τ between two adapters, apply, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tree_digest
from safetensors.torch import load_file

import capmerge
from capmerge.cli import main
from capmerge.errors import CheckpointError, UsageError

peft = pytest.importorskip("peft")


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.emb = torch.nn.Embedding(20, 8)
        self.q = torch.nn.Linear(8, 12)
        self.v = torch.nn.Linear(12, 8)
        self.c = Conv1D(6, 8)  # GPT-2 style: weight is (in, out), LoRA needs fan_in_fan_out
        self.head = torch.nn.Linear(8, 3)


ADAPTERS = {
    "sft": dict(r=2, lora_alpha=4, target_modules=["q", "v", "emb"]),
    "aux": dict(
        r=3,
        lora_alpha=5,
        use_rslora=True,
        target_modules=["q", "v", "emb"],
        modules_to_save=["head"],
        rank_pattern={"v": 4},
        alpha_pattern={"q": 7},
    ),  # fmt: skip
    "aux2": dict(r=2, lora_alpha=3, target_modules=["q", "v"], modules_to_save=["head"]),
    "fifo_a": dict(r=2, lora_alpha=2, target_modules=["c"], fan_in_fan_out=True),
    "fifo_b": dict(r=3, lora_alpha=9, target_modules=["c"], fan_in_fan_out=True),
}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Adapters saved by PEFT, the base state dict, and each adapter's merge_and_unload() weights (the reference)."""
    import warnings

    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    base = Tiny()
    torch.save(base.state_dict(), root / "base.pt")
    for i, (name, kw) in enumerate(ADAPTERS.items()):
        torch.manual_seed(i + 1)
        model = Tiny()
        model.load_state_dict(base.state_dict())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = get_peft_model(model, LoraConfig(init_lora_weights=False, **kw))
        if "modules_to_save" in kw:  # a trained head
            with torch.no_grad():
                pm.base_model.model.head.modules_to_save["default"].weight.add_(0.1 * (i + 1))
        pm.save_pretrained(str(root / name))
        torch.save(pm.merge_and_unload().state_dict(), root / f"{name}.merged.pt")
    return {"root": root, "base": root / "base.pt", **{n: root / n for n in ADAPTERS}}


def merged(adapters: dict[str, Path], name: str) -> dict[str, torch.Tensor]:
    return torch.load(adapters["root"] / f"{name}.merged.pt", weights_only=True)


def test_adapter_opens_as_its_delta(adapters: dict[str, Path]) -> None:
    base = torch.load(adapters["base"], weights_only=True)
    ref = merged(adapters, "sft")
    ck = capmerge.open_checkpoint(adapters["sft"])
    assert ck.kind == "lowrank" and set(ck.tensors) == {"emb.weight", "q.weight", "v.weight"}
    assert ck.storage("q.weight")["rank"] == 2 and ck.storage("q.weight")["scale"] == 2.0
    for n in ck.tensors:
        torch.testing.assert_close(ck.read_tensor(n), ref[n] - base[n], atol=1e-6, rtol=0)


def test_diff_of_two_adapters_is_exact_and_low_rank(adapters: dict[str, Path], tmp_path: Path) -> None:
    """rslora, rank_pattern, alpha_pattern, embeddings, modules_to_save (with --base)."""
    out = tmp_path / "tau.safetensors"
    summary = capmerge.diff(adapters["sft"], adapters["aux"], out, adapter_base=adapters["base"])
    ms, ma = merged(adapters, "sft"), merged(adapters, "aux")
    stored = load_file(str(out))
    # stored as factor pairs of rank r_a + r_s (emb 3+2, q 3+2, v 4+2); head dense
    assert {k: tuple(v.shape) for k, v in stored.items() if k.endswith("lora_A")} == {
        "emb.weight.lora_A": (5, 8), "q.weight.lora_A": (5, 8), "v.weight.lora_A": (6, 12)}  # fmt: skip
    assert "head.weight" in stored and "q.bias" not in stored
    ck = capmerge.open_checkpoint(out)
    assert (
        ck.kind == "lowrank" and ck.storage("v.weight")["rank"] == 6 and ck.storage("head.weight")["storage"] == "dense"
    )
    meta = json.loads(ck.metadata["capmerge.tensors"])
    assert meta["q.weight"] == {"dtype": "F32", "shape": [12, 8], "storage": "lowrank"}
    for n in ck.tensors:
        torch.testing.assert_close(ck.read_tensor(n), ma[n] - ms[n], atol=2e-6, rtol=0, msg=n)
    # the untrained head.bias (a modules_to_save copy equal to the base's) differs by zero: left out, like diff does
    changed = {n for n in ma if not torch.equal(ma[n], ms[n])}
    assert set(ck.tensors) == changed and len(changed) == 4
    assert summary.tensors_written == summary.tensors_changed == 4 and summary.zero_tensors == ["head.bias"]
    assert any("low rank" in n for n in summary.notes)


def test_dense_diff_and_apply_match_low_rank(adapters: dict[str, Path], tmp_path: Path) -> None:
    low, dense = tmp_path / "low.safetensors", tmp_path / "dense.safetensors"
    capmerge.diff(adapters["sft"], adapters["aux"], low, adapter_base=adapters["base"])
    capmerge.diff(adapters["sft"], adapters["aux"], dense, adapter_base=adapters["base"], dense=True)
    d = load_file(str(dense))
    assert set(d) == {"emb.weight", "q.weight", "v.weight", "head.weight"} | ({"head.bias"} & set(d))
    lo = capmerge.open_checkpoint(low)
    for n in d:
        torch.testing.assert_close(lo.read_tensor(n), d[n], atol=1e-6, rtol=0)
    capmerge.apply(adapters["base"], [low], tmp_path / "m_low.safetensors", alpha=0.7)
    capmerge.apply(adapters["base"], [dense], tmp_path / "m_dense.safetensors", alpha=0.7)
    a, b = load_file(str(tmp_path / "m_low.safetensors")), load_file(str(tmp_path / "m_dense.safetensors"))
    base = torch.load(adapters["base"], weights_only=True)
    ms, ma = merged(adapters, "sft"), merged(adapters, "aux")
    for n in base:
        torch.testing.assert_close(a[n], b[n], atol=1e-6, rtol=0)
        torch.testing.assert_close(a[n], base[n] + 0.7 * (ma[n] - ms[n]), atol=2e-6, rtol=0)


def test_apply_an_adapter_binds_modules_to_save_to_the_base(adapters: dict[str, Path], tmp_path: Path) -> None:
    capmerge.apply(adapters["base"], [adapters["aux"]], tmp_path / "m.safetensors")
    got, ref = load_file(str(tmp_path / "m.safetensors")), merged(adapters, "aux")
    for n, t in ref.items():
        torch.testing.assert_close(got[n], t, atol=2e-6, rtol=0, msg=n)


def test_fan_in_fan_out(adapters: dict[str, Path], tmp_path: Path) -> None:
    capmerge.diff(adapters["fifo_a"], adapters["fifo_b"], tmp_path / "t.safetensors")
    ck = capmerge.open_checkpoint(tmp_path / "t.safetensors")
    ma, mb = merged(adapters, "fifo_a"), merged(adapters, "fifo_b")
    assert ck.tensors["c.weight"].shape == (8, 6) == tuple(ma["c.weight"].shape)
    torch.testing.assert_close(ck.read_tensor("c.weight"), mb["c.weight"] - ma["c.weight"], atol=1e-6, rtol=0)


def test_modules_to_save_in_both_adapters_need_no_base(adapters: dict[str, Path], tmp_path: Path) -> None:
    capmerge.diff(adapters["aux2"], adapters["aux"], tmp_path / "t.safetensors")
    ck = capmerge.open_checkpoint(tmp_path / "t.safetensors")
    m2, ma = merged(adapters, "aux2"), merged(adapters, "aux")
    torch.testing.assert_close(ck.read_tensor("head.weight"), ma["head.weight"] - m2["head.weight"], atol=1e-6, rtol=0)
    torch.testing.assert_close(ck.read_tensor("emb.weight"), ma["emb.weight"] - m2["emb.weight"], atol=1e-6, rtol=0)


def test_adapter_errors(adapters: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = tree_digest(adapters["root"])
    out = tmp_path / "t.safetensors"
    code = main(["diff", str(adapters["sft"]), str(adapters["aux"]), "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err == (
        "error: modules_to_save weights in only one adapter need the base model (head.bias, head.weight); "
        "pass --base BASE\n"
    ), err
    code = main(["diff", str(adapters["base"]), str(adapters["sft"]), "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "a LoRA adapter can only be diffed against another adapter" in err and err.count("\n") == 1
    with pytest.raises(CheckpointError, match=r"tensor head.weight is stored in full by the adapter"):
        capmerge.open_checkpoint(adapters["aux"]).read_tensor("head.weight")
    assert not out.exists() and tree_digest(adapters["root"]) == before
    bad = tmp_path / "dora"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "use_dora": True}))
    with pytest.raises(CheckpointError, match="DoRA adapters are not a low-rank difference"):
        capmerge.open_checkpoint(bad)
    (bad / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(CheckpointError, match="unsupported PEFT adapter type IA3"):
        capmerge.open_checkpoint(bad)
    (bad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(CheckpointError, match="adapter directory has no adapter_model"):
        capmerge.open_checkpoint(bad)
    with pytest.raises(UsageError):
        capmerge.diff(adapters["sft"], adapters["aux"], tmp_path / "x.safetensors")


def _module_weights(adapter: Path) -> set[str]:
    """The base weight names an adapter changes, read from its saved tensor names (PEFT's naming)."""
    out = set()
    for k in load_file(str(adapter / "adapter_model.safetensors")):
        k = k.removeprefix("base_model.model.")
        if k.endswith((".lora_B.weight", ".lora_embedding_B")):
            continue
        for part in (".lora_A.weight", ".lora_embedding_A"):
            k = k.removesuffix(part) + ".weight" if k.endswith(part) else k
        out.add(k.replace(".modules_to_save.default.", "."))  # modules_to_save: stored in full
    return out


@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("name", ["sft", "aux"])  # aux: rslora, patterns, modules_to_save in both
def test_diff_of_identical_adapters_changes_nothing(
    adapters: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, dense: bool
) -> None:
    twin = tmp_path / "twin"
    shutil.copytree(adapters[name], twin)  # the same adapter saved twice: equal bytes, another file
    out = tmp_path / "t.safetensors"
    assert (
        main(["diff", str(adapters[name]), str(twin), "-o", str(out), "--json", *(["--dense"] if dense else [])]) == 0
    )
    cap = capsys.readouterr()
    d = json.loads(cap.out)
    modules = _module_weights(adapters[name])
    assert len(modules) >= 3
    assert d["tensors_changed"] == 0 and sorted(d["zero_tensors"]) == sorted(modules)
    assert f"diff: 0 tensors changed, {len(modules)} unchanged (zero, left out)" in cap.err
    assert d["outputs"] == [str(out)] and load_file(str(out)) == {}
    data = adapters[name] / "adapter_model.safetensors"
    raw = data.read_bytes()
    assert d["bytes_read"] == 2 * (len(raw) - 8 - int.from_bytes(raw[:8], "little"))  # both adapters' tensor data
    # the empty τ leaves a model as it is
    capmerge.apply(adapters["base"], [out], tmp_path / "m.safetensors")
    base, m = torch.load(adapters["base"], weights_only=True), load_file(str(tmp_path / "m.safetensors"))
    assert all(torch.equal(base[k], m[k]) for k in base) and set(m) == set(base)


def test_inspect_kind_of_an_adapter_and_of_its_difference(adapters: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "tau.safetensors"
    capmerge.diff(adapters["sft"], adapters["aux"], out, adapter_base=adapters["base"])
    r = capmerge.inspect([adapters["sft"], out], headers_only=True)
    assert [(i["kind"], i["storage"]) for i in r["inputs"]] == [("lora-adapter", "lowrank"),
                                                                 ("capability-vector", "lowrank")]  # fmt: skip


# -- adapter_config.json validation ----------------------------------------------------------------------------------
def edited_adapter(src: Path, dst: Path, **changes: object) -> Path:
    """A copy of a PEFT-saved adapter directory with keys of its adapter_config.json replaced."""
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))  # NaN / Infinity written as JSON's extensions
    return dst


BAD_CONFIGS = [
    ({"lora_alpha": "16"}, 'lora_alpha must be a number, got "16"'),
    ({"lora_alpha": [16]}, "lora_alpha must be a number, got [16]"),
    ({"lora_alpha": "nan"}, 'lora_alpha must be a number, got "nan"'),
    ({"lora_alpha": True}, "lora_alpha must be a number, got true"),
    ({"lora_alpha": None}, "lora_alpha must be a number, got null"),
    ({"lora_alpha": float("nan")}, "lora_alpha must be a finite number, got nan"),
    ({"lora_alpha": float("-inf")}, "lora_alpha must be a finite number, got -inf"),
    ({"lora_alpha": 1e39}, "lora_alpha 1e+39 is too large (the scale multiplies float32 factors)"),
    ({"lora_alpha": 10**50}, "lora_alpha 1000000000000000000000000000000000000... is too large (the scale "
     "multiplies float32 factors)"),
    ({"r": 0}, "r must be a positive integer, got 0"),
    ({"r": 2.0}, "r must be a positive integer, got 2.0"),
    ({"r": 4, "rank_pattern": {"emb": 2, "v": 2}}, "LoRA module q has rank 2 (lora_A [2, 8]) but r gives 4"),
    ({"r": 2, "rank_pattern": {"emb": 3}}, "LoRA module emb has rank 2 (lora_embedding_A [2, 20]) but rank_pattern "
     "gives 3"),
    ({"alpha_pattern": ["q"]}, 'alpha_pattern must map module-name patterns to values, got ["q"]'),
    ({"alpha_pattern": "q"}, 'alpha_pattern must map module-name patterns to values, got "q"'),
    ({"alpha_pattern": {"q[": 3}}, 'alpha_pattern key "q[" is not a valid regular expression: unterminated '
     "character set at position 1"),
    ({"alpha_pattern": {"q": "3"}}, 'alpha_pattern["q"] must be a number, got "3"'),
    ({"alpha_pattern": {"q": float("inf")}}, 'alpha_pattern["q"] must be a finite number, got inf'),
    ({"rank_pattern": 4}, "rank_pattern must map module-name patterns to values, got 4"),
    ({"rank_pattern": {"(v": 2}}, 'rank_pattern key "(v" is not a valid regular expression: missing ), '
     "unterminated subpattern at position 0"),
    ({"rank_pattern": {"v": 0}}, 'rank_pattern["v"] must be a positive integer, got 0'),
    ({"rank_pattern": {"v": 3}}, "LoRA module v has rank 2 (lora_A [2, 12]) but rank_pattern gives 3"),
    ({"use_rslora": "false"}, 'use_rslora must be true or false, got "false"'),
    ({"fan_in_fan_out": 1}, "fan_in_fan_out must be true or false, got 1"),
    ({"use_dora": "no"}, 'use_dora must be true or false, got "no"'),
    ({"peft_type": 3}, "unsupported PEFT adapter type 3 (only LoRA)"),
]  # fmt: skip


@pytest.mark.parametrize(("changes", "what"), BAD_CONFIGS)
def test_bad_adapter_configs_are_refused(
    adapters: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], changes: dict, what: str
) -> None:
    """Each bad key of a PEFT adapter's config (sft: r 2, lora_alpha 4, targets q, v, emb): one error line naming the
    file and the key, for apply and inspect, nothing written, the adapter untouched."""
    bad = edited_adapter(adapters["sft"], tmp_path / "bad", **changes)
    before = tree_digest(bad)
    out = tmp_path / "out.safetensors"
    expected = f"error: {what} ({bad / 'adapter_config.json'})\n"
    assert main(["apply", str(adapters["base"]), str(bad), "-o", str(out)]) == 2
    assert capsys.readouterr().err == expected
    assert main(["inspect", "--headers-only", str(bad)]) == 2
    assert capsys.readouterr().err == expected
    assert not out.exists() and tree_digest(bad) == before


def hand_adapter(path: Path, config: dict, a: torch.Tensor, b: torch.Tensor) -> Path:
    """A PEFT-format adapter written by hand: one LoRA module ``q`` with factors A [r, in] and B [out, r]."""
    from safetensors.torch import save_file

    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "target_modules": ["q"], **config}))
    save_file({"base_model.model.q.lora_A.weight": a, "base_model.model.q.lora_B.weight": b},
              str(path / "adapter_model.safetensors"))  # fmt: skip
    return path


def test_rank_zero_factors_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ad = hand_adapter(tmp_path / "ad", {"lora_alpha": 4}, torch.zeros(0, 8), torch.zeros(12, 0))
    assert main(["inspect", str(ad)]) == 2
    assert capsys.readouterr().err == (
        f"error: LoRA module q has rank 0 (lora_A [0, 8]) ({ad / 'adapter_model.safetensors'})\n"
    )


def test_nonfinite_results_from_finite_adapters_are_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """lora_alpha 3e38, r 1: the scale times lora_B (3) is 9e38, past float32; lora_alpha 1e38 with lora_A 10: the
    scaled factors are finite, their product 1e39 is not — the same error (and --allow-nonfinite) as for a dense
    merge that overflows."""
    base = tmp_path / "base.safetensors"
    from safetensors.torch import save_file

    save_file({"q.weight": torch.zeros(12, 8)}, str(base))
    a, b = torch.full((1, 8), 10.0), torch.full((12, 1), 3.0)
    big_scale = hand_adapter(tmp_path / "scale", {"r": 1, "lora_alpha": 3e38}, a, b)
    out = tmp_path / "out.safetensors"
    assert main(["apply", str(base), str(big_scale), "-o", str(out)]) == 2
    assert capsys.readouterr().err == ("error: the LoRA factors times the scale 3e+38 (lora_alpha / r) overflow "
                                       f"float32 (q in {big_scale / 'adapter_model.safetensors'})\n")  # fmt: skip
    product = hand_adapter(tmp_path / "product", {"r": 1, "lora_alpha": 1e38}, a, torch.full((12, 1), 1.0))
    assert main(["apply", str(base), str(product), "-o", str(out)]) == 2
    assert capsys.readouterr().err == ("error: result has NaN/Inf where the inputs were finite (overflow in the "
                                       "output dtype?); use --allow-nonfinite to keep it (q.weight)\n")  # fmt: skip
    assert not out.exists()
    assert main(["apply", str(base), str(product), "-o", str(out), "--allow-nonfinite", "-q"]) == 0
    assert torch.isposinf(load_file(str(out))["q.weight"]).all()


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_peft_saved_configs_pass(adapters: dict[str, Path], tmp_path: Path, name: str) -> None:
    """Every adapter PEFT saved (rslora, rank_pattern, alpha_pattern, fan_in_fan_out, modules_to_save) passes the
    checks, and apply through the CLI gives PEFT's merge_and_unload() weights."""
    from capmerge.io.lora import check_config, read_config

    cfg = check_config(read_config(adapters[name] / "adapter_config.json"), "x")
    assert cfg.alpha == ADAPTERS[name]["lora_alpha"] and cfg.r == ADAPTERS[name]["r"]
    out = tmp_path / "m.safetensors"
    assert main(["apply", str(adapters["base"]), str(adapters[name]), "-o", str(out), "-q"]) == 0
    got, ref = load_file(str(out)), merged(adapters, name)
    for n, t in ref.items():
        torch.testing.assert_close(got[n], t, atol=2e-6, rtol=0, msg=n)
