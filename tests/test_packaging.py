"""Packaging and start-up: the wheel layout, the console script, light imports."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

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
    assert "capmerge/kernels/__init__.py" in names
    assert "capmerge/recipes/__init__.py" in names
    assert "capmerge/recipes/capvector.yaml" in names
    assert not any(n.startswith("kernels/") for n in names), [n for n in names if n.startswith("kernels/")]
    assert any(n.startswith("capmerge/_native") and n.endswith((".so", ".pyd")) for n in names)
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "capmerge = capmerge.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


def test_import_is_light() -> None:
    """`import capmerge` and the CLI module do not import torch, numpy or triton."""
    code = (
        "import sys, capmerge, capmerge.cli, capmerge.kernels, capmerge.api, capmerge.merging, capmerge.plan;"
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


def test_kernels_is_available_without_gpu() -> None:
    import capmerge.kernels

    assert capmerge.kernels.is_available() in (True, False)


def test_version_and_help() -> None:
    exe = Path(sys.executable).with_name("capmerge")
    r = subprocess.run([str(exe), "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("capmerge ")
    r = subprocess.run([str(exe), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "diff" in r.stdout and "apply" in r.stdout and "Examples" in r.stdout
