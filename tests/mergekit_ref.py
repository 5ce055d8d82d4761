"""What the tests that compare capmerge with mergekit share: tiny float32 Llama checkpoints, mergekit configurations,
and running mergekit (LGPL: only ever as a separate process, from ``.venv-mergekit``; ``make mergekit-venv``)."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import save_single

REPO = Path(__file__).resolve().parent.parent
MERGEKIT_YAML = REPO / ".venv-mergekit" / "bin" / "mergekit-yaml"
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
# mergekit 0.1.5 (make mergekit-venv) has these flags; probing `--help` first would cost ~5 s of imports
MERGEKIT_FLAGS = ["--no-copy-tokenizer", "--no-write-model-card", "--quiet", "--no-cuda"]
GRID = 2.0**-20
LLAMA = {"hidden": 64, "layers": 2, "intermediate": 128, "vocab": 256, "heads": 4}


def require_mergekit() -> None:
    if not MERGEKIT_YAML.exists():
        pytest.skip(f"mergekit not installed ({MERGEKIT_YAML.relative_to(REPO)} missing): run `make mergekit-venv`")


def tie_free(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Distinct magnitudes 1..n times 2⁻²⁰ in random order, random signs: no two |τ| equal, no zeros."""
    n = math.prod(shape)
    mags = (torch.randperm(n, generator=gen) + 1).to(torch.float32) * GRID
    signs = torch.randint(0, 2, (n,), generator=gen).to(torch.float32) * 2 - 1
    return (mags * signs).reshape(shape)


def llama_tensors(
    hidden: int = LLAMA["hidden"],
    intermediate: int = LLAMA["intermediate"],
    vocab: int = LLAMA["vocab"],
    layers: int = LLAMA["layers"],
) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a Llama checkpoint (HF names), the tiny one by default."""
    h, i, v = hidden, intermediate, vocab
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for n in range(layers):
        p = f"model.layers.{n}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes.update({f"{p}self_attn.{x}_proj.weight": (h, h) for x in "qkvo"})
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes.update({p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h)})
        shapes[p + "mlp.down_proj.weight"] = (h, i)
    return {**shapes, "model.norm.weight": (h,), "lm_head.weight": (v, h)}


def llama_config() -> dict[str, object]:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": LLAMA["hidden"],
        "intermediate_size": LLAMA["intermediate"], "num_attention_heads": LLAMA["heads"],
        "num_key_value_heads": LLAMA["heads"], "num_hidden_layers": LLAMA["layers"], "vocab_size": LLAMA["vocab"],
        "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }  # fmt: skip


def save_hf(directory: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_single(directory / "model.safetensors", tensors)
    (directory / "config.json").write_text(json.dumps(llama_config(), indent=2))
    return directory


def mergekit_config(method: str, models: list[tuple[Path, dict[str, object] | None]], *, base: Path | None = None,
                    parameters: dict[str, object] | None = None) -> str:  # fmt: skip
    """A mergekit configuration (JSON, which is YAML) in float32: ``models`` as (path, per-model parameters)."""
    cfg: dict[str, object] = {"merge_method": method, "dtype": "float32"}
    if base is not None:
        cfg["base_model"] = str(base)
    cfg["models"] = [{"model": str(m), **({"parameters": p} if p else {})} for m, p in models]
    if parameters:
        cfg["parameters"] = parameters
    return json.dumps(cfg, indent=1)


# mergekit-yaml's own entry point, called once per configuration in one process: the ~5-10 s of imports are paid once
# instead of once per configuration.
_DRIVER = """
import json, sys, traceback
from mergekit.scripts.run_yaml import main
failed = []
for config, out in json.loads(sys.argv[1]):
    try:
        main.main(args=[config, out, *json.loads(sys.argv[2])], standalone_mode=False)
    except Exception:
        failed.append(config)
        traceback.print_exc()
sys.exit(f"failed: {failed}" if failed else 0)
"""


def start_mergekit(configs: dict[str, str], tmp: Path) -> subprocess.Popen[str]:
    """Write each configuration to tmp/NAME.yml and start one mergekit process that merges them all into tmp/mk-NAME
    (``wait_mergekit`` collects it)."""
    jobs = []
    for name, text in configs.items():
        (tmp / f"{name}.yml").write_text(text)
        jobs.append((str(tmp / f"{name}.yml"), str(tmp / f"mk-{name}")))
    python = MERGEKIT_YAML.with_name("python")
    cmd = [str(python), "-c", _DRIVER, json.dumps(jobs), json.dumps(MERGEKIT_FLAGS)]
    env = {**os.environ, **OFFLINE_ENV}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def wait_mergekit(proc: subprocess.Popen[str], timeout: float = 300) -> None:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"mergekit failed:\n{out[-5000:]}"


def karcher_mean(tensors: list[torch.Tensor], alphas: list[float], *, max_iter: int = 10, tol: float = 1e-5,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:  # fmt: skip
    """The weighted Karcher mean of ``tensors`` iterated on the tensors themselves in ``dtype`` (as mergekit does in
    float32; in float64 the reference capmerge's karcher, which iterates on Gram-matrix coefficients, is held to):
    see capmerge/merge/methods/karcher.py for the iteration."""
    xs = [t.to(dtype) for t in tensors]
    if len(xs) == 1:
        return xs[0].clone()
    norms = [torch.linalg.vector_norm(x) for x in xs]
    units = [torch.zeros_like(x) if float(n) == 0.0 else x / n for x, n in zip(xs, norms, strict=True)]
    valid = [i for i, n in enumerate(norms) if float(n) > tol]
    if not valid:
        return torch.zeros_like(xs[0])
    total = sum(alphas[i] for i in valid)
    a = [alphas[i] / total for i in valid]
    us = [units[i] for i in valid]
    mean = torch.zeros_like(us[0])
    for ai, u in zip(a, us, strict=True):
        mean += ai * u
    mean_norm = torch.linalg.vector_norm(mean)
    mean = us[0].clone() if float(mean_norm) < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for ai, u in zip(a, us, strict=True):
            dot = torch.clamp(torch.dot(mean.reshape(-1), u.reshape(-1)), -1.0, 1.0)
            theta = torch.arccos(dot)
            if float(theta) < tol:
                continue
            tangent += ai * (theta / torch.sin(theta)) * (u - dot * mean)
        tn = torch.linalg.vector_norm(tangent)
        if float(tn) < tol:
            break
        mean = torch.cos(tn) * mean + torch.sin(tn) * (tangent / tn)
        un = torch.linalg.vector_norm(mean)
        if float(un) > tol:
            mean = mean / un
    scale = sum(ai * n for ai, n in zip(alphas, norms, strict=True))
    return scale * mean
