"""The CLI end to end: CliRunner for options and output, one real subprocess run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from conftest import load_any, save_single
from typer.testing import CliRunner

from capmerge.cli import app

runner = CliRunner()


def test_diff_apply_json_and_summary(ckpts: dict[str, Path]) -> None:
    tmp = ckpts["tmp"]
    r = runner.invoke(app, ["diff", str(ckpts["S"]), str(ckpts["A"]), "-o", str(tmp / "v.safetensors"), "--json"])
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["command"] == "diff" and d["tensors_written"] == 8 and len(d["zero_tensors"]) == 2
    assert d["skipped"] == {"position_ids": "non-floating (I64)"} and d["bytes_written"] > 0
    assert "diff: 8 tensors changed, 2 unchanged (zero, left out), 1 skipped" in r.stderr
    r = runner.invoke(app, ["apply", str(ckpts["P"]), str(tmp / "v.safetensors"), "-o", str(tmp / "M"), "-a", "0.5",
                            "--json", "--quiet"])  # fmt: skip
    assert r.exit_code == 0, r.stderr
    assert r.stderr == "" and json.loads(r.stdout)["tensors_unchanged"] == 3


def test_default_output_name(ckpts: dict[str, Path]) -> None:
    tmp = ckpts["tmp"]
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        r = runner.invoke(app, ["diff", str(ckpts["S"]), str(ckpts["A"]), "-q"])
    finally:
        os.chdir(cwd)
    assert r.exit_code == 0, r.stderr
    assert (tmp / "capvector.safetensors").is_file()


def test_real_subprocess_round_trip(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    s = {"w": torch.randn(300, 7, generator=g), "b": torch.randn(7, generator=g).half()}
    a = {k: (v.float() * 1.5 + 0.25).to(v.dtype) for k, v in s.items()}
    save_single(tmp_path / "s.safetensors", s)
    save_single(tmp_path / "a.safetensors", a)
    exe = str(Path(sys.executable).with_name("capmerge"))
    r = subprocess.run([exe, "diff", "s.safetensors", "a.safetensors", "--dtype", "float32"], cwd=tmp_path,
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0 and "diff: 2 tensors changed" in r.stderr, r.stderr
    r = subprocess.run([exe, "apply", "s.safetensors", "capvector.safetensors", "-o", "out.safetensors", "--alpha",
                        "-2", "--json"], cwd=tmp_path, capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["tensors_changed"] == 2
    out = load_any(tmp_path / "out.safetensors")
    for k in s:
        ref = (s[k].float() + -2.0 * (a[k].float() - s[k].float())).to(s[k].dtype)
        assert torch.equal(out[k], ref), k


def test_progress_bar_on_a_terminal(tmp_path: Path) -> None:
    """With stderr on a terminal a rich progress bar is drawn; --quiet silences everything."""
    import pty

    g = torch.Generator().manual_seed(0)
    save_single(tmp_path / "s.safetensors", {f"w{i}": torch.randn(1000, generator=g) for i in range(5)})
    save_single(tmp_path / "a.safetensors", {f"w{i}": torch.randn(1000, generator=g) for i in range(5)})
    exe = str(Path(sys.executable).with_name("capmerge"))
    for quiet in (False, True):
        master, slave = pty.openpty()
        args = [exe, "diff", "s.safetensors", "a.safetensors", "-o", "v.safetensors", "--force"]
        p = subprocess.Popen(args + (["-q"] if quiet else []), cwd=tmp_path, stderr=slave, stdout=subprocess.PIPE,
                             env={**os.environ, "COLUMNS": "120"})  # fmt: skip
        os.close(slave)
        chunks = []
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
        p.wait()
        os.close(master)
        text = b"".join(chunks).decode(errors="replace")
        assert p.returncode == 0, text
        if quiet:
            assert text == ""
        else:
            assert "/5 tensors" in text and "kB" in text, text  # the bar: tensors and bytes
            assert "diff: 5 tensors changed" in text
