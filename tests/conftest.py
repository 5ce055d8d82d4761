"""Shared fixtures: tiny real safetensors checkpoints built on the fly, and independent readers/references."""

from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors (tests/test_kernels.py); this has to be
# set before triton is first imported. With a GPU the same tests compile and run the kernels natively.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# MuJoCo picks its GL backend when first imported (by metaworld, in whichever Meta-World test runs first): offscreen
# EGL, so the vision tests can render whatever the order (the default, GLFW, aborts the process without a display).
os.environ.setdefault("MUJOCO_GL", "egl")

# A suite started as a background job (`make test &` in a script) inherits SIGINT ignored, and so would every process
# it starts: the interrupt tests need Python's default handling there, whatever started the suite.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SHAPES = [(), (1,), (7,), (4097,), (0,), (3, 5), (2, 3, 4)]


def save_single(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata or {"format": "pt"})
    return path


def save_sharded(directory: Path, tensors: dict[str, torch.Tensor], n_shards: int = 2, prefix: str = "model") -> Path:
    """An HF sharded layout: prefix-0000k-of-0000n.safetensors + prefix.safetensors.index.json."""
    directory.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    per = max(1, -(-len(names) // n_shards))
    weight_map = {}
    for i in range(n_shards):
        part = names[i * per : (i + 1) * per]
        fname = f"{prefix}-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file({k: tensors[k].contiguous() for k in part}, str(directory / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / f"{prefix}.safetensors.index.json").write_text(json.dumps(index))
    return directory


def load_any(path: Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint with the safetensors library itself (independent of capmerge's reader)."""
    path = Path(path)
    if path.is_dir():
        idx = list(path.glob("*.safetensors.index.json"))
        if idx:
            wmap = json.loads(idx[0].read_text())["weight_map"]
            out: dict[str, torch.Tensor] = {}
            for shard in sorted(set(wmap.values())):
                out.update(load_file(str(path / shard)))
            return out
        files = list(path.glob("*.safetensors"))
        assert len(files) == 1, files
        return load_file(str(files[0]))
    return load_file(str(path))


def tree_digest(path: Path) -> dict[str, str]:
    """sha256 of every file under path (or of the file): to assert inputs were not touched."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() + str(os.stat(p).st_mtime_ns) for p in files}


def rchar() -> int:
    """Bytes this process has read so far (``rchar`` of /proc/self/io): to prove that nothing else was read."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar")


def listing(directory: Path) -> set[str]:
    return {p.name for p in Path(directory).iterdir()}


def model_tensors(seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """A small transformer-like state dict with odd shapes, a frozen part and an integer buffer."""
    g = torch.Generator().manual_seed(seed)
    t = {
        "embed.weight": torch.randn(33, 16, generator=g),
        "layers.0.attn.weight": torch.randn(16, 16, generator=g),
        "layers.0.attn.bias": torch.randn(16, generator=g),
        "layers.0.mlp.weight": torch.randn(4097, generator=g),
        "layers.1.attn.weight": torch.randn(16, 16, generator=g),
        "layers.1.scale": torch.randn((), generator=g),
        "layers.1.one": torch.randn(1, generator=g),
        "layers.1.seven": torch.randn(7, generator=g),
        "layers.1.empty": torch.randn(0, generator=g),
        "vision.frozen.weight": torch.randn(8, 4, generator=g),
    }
    out = {k: v.to(dtype) for k, v in t.items()}
    out["position_ids"] = torch.arange(12, dtype=torch.int64)
    return out


def perturb(tensors: dict[str, torch.Tensor], seed: int, scale: float = 0.05) -> dict[str, torch.Tensor]:
    """Change every float tensor except the frozen ones."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in tensors.items():
        if v.is_floating_point() and "frozen" not in k:
            out[k] = (v.float() + scale * torch.randn(v.shape, generator=g)).to(v.dtype)
        else:
            out[k] = v.clone()
    return out


def make_ckpts(root: Path) -> dict[str, Path]:
    """Under ``root``: S (sft) and A (aux) bf16 single files plus P (pretrained) sharded with config files and a
    subfolder."""
    p = model_tensors(0)
    s = perturb(p, 1)
    a = perturb(s, 2)
    pdir = save_sharded(root / "P", p, 2)
    (pdir / "config.json").write_text('{"model_type": "toy"}')
    (pdir / "tokenizer.json").write_text("{}")
    (pdir / "sub").mkdir()
    (pdir / "sub" / "extra.txt").write_text("x")
    return {
        "P": pdir,
        "S": save_single(root / "S" / "model.safetensors", s),
        "A": save_single(root / "A.safetensors", a),
    }


@pytest.fixture
def ckpts(tmp_path: Path) -> dict[str, Path]:
    """:func:`make_ckpts` in the test's tmp_path (``tmp``)."""
    return {**make_ckpts(tmp_path), "tmp": tmp_path}
