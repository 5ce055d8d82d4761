"""The documentation: README.md is an entry page, every relative link in it and in docs/ resolves (anchors included),
and the README's first-screen examples run as written — the CLI lines and the library block, in subprocesses, on a
tiny BERT checkpoint saved by transformers — with results checked against numpy."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
FIRST_SCREEN = 60
ALPHA = 0.5  # the α of the README's examples (checked below against the text itself)

_FENCE = re.compile(r"^\s*```")
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def _prose(text: str) -> list[str]:
    """The lines outside fenced code blocks, with inline code spans removed."""
    out, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append(re.sub(r"`[^`]*`", "", line))
    return out


def _blocks(text: str, lang: str) -> list[tuple[int, str]]:
    """Fenced blocks of one language: (line number of the opening fence, 0-based; the code)."""
    found, start, body = [], None, []
    for i, line in enumerate(text.splitlines()):
        if start is None and line.strip() == f"```{lang}":
            start, body = i, []
        elif start is not None and _FENCE.match(line):
            found.append((start, "\n".join(body) + "\n"))
            start = None
        elif start is not None:
            body.append(line)
    return found


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: its text as rendered (code marks and emphasis gone, an underscore inside a word
    kept), lower case, punctuation but ``_`` and ``-`` dropped, spaces to hyphens."""
    text = re.sub(r"(?<!\w)_+|_+(?!\w)", "", re.sub(r"[`*]", "", heading)).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        m = None if fenced else _HEADING.match(line)
        if m:
            slug = _slug(m.group(2))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


# --- the entry page --------------------------------------------------------------------------------------------------


def test_readme_is_an_entry_page() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 450, f"README.md has {len(lines)} lines; move depth into docs/"
    first = "\n".join(lines[:FIRST_SCREEN])
    for needed in ("pip install", "make demo", "make test", "capmerge diff", "capmerge apply", "--alpha"):
        assert needed in first, f"{needed!r} is not in the README's first {FIRST_SCREEN} lines"
    # both examples start and end on the first screen
    blocks = _blocks("\n".join(lines), "python")
    assert blocks and blocks[0][0] + blocks[0][1].count("\n") + 1 < FIRST_SCREEN
    assert "import capmerge" in blocks[0][1]
    # the map into docs/ links every page that exists
    linked = {m.group(1).split("#")[0] for line in _prose("\n".join(lines)) for m in _LINK.finditer(line)}
    missing = sorted(p.relative_to(ROOT).as_posix() for p in PAGES[1:] if p.relative_to(ROOT).as_posix() not in linked)
    assert not missing, f"docs pages the README does not link: {missing}"


def test_docs_speak_of_the_project_only() -> None:
    words = re.compile(r"\b(sessions?|the lead|tickets?|lent|issue\s*#?\d+)\b", re.IGNORECASE)
    hits = [
        f"{p.relative_to(ROOT)}:{i}: {line.strip()}"
        for p in PAGES
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if words.search(line)
    ]
    assert not hits, "\n".join(hits)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for line in _prose(page.read_text(encoding="utf-8")):
        for m in _LINK.finditer(line):
            target = m.group(1)
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto:
                continue
            path_part, _, anchor = target.partition("#")
            dest = (page.parent / path_part).resolve() if path_part else page
            if not dest.exists():
                broken.append(f"{target} (no such file {dest})")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{target} (no heading with anchor #{anchor} in {dest.name})")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def test_anchor_rule() -> None:
    """The slug rule the link check relies on, on headings of the kinds used in docs/ (GitHub's published rule)."""
    assert _slug("transformers `Trainer`") == "transformers-trainer"
    assert _slug("What is fetched, when") == "what-is-fetched-when"
    assert (
        _slug("Orthogonality loss: keep finetuning orthogonal to τ")
        == "orthogonality-loss-keep-finetuning-orthogonal-to-τ"
    )
    assert _slug("The path of one `capmerge apply`") == "the-path-of-one-capmerge-apply"
    assert _slug("Runs of `arcee_fusion`'s KL") == "runs-of-arcee_fusions-kl"  # a code span's underscore stays
    assert _slug("An _emphasised_ word and **bold**") == "an-emphasised-word-and-bold"


# --- the examples run ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pretrained/, sft/ and aux/: a tiny BERT saved by transformers, and two perturbed copies of its weights."""
    import transformers

    root = tmp_path_factory.mktemp("readme")
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=24, max_position_embeddings=32)  # fmt: skip
    transformers.BertModel(cfg).save_pretrained(root / "pretrained")
    pre = load_file(str(root / "pretrained" / "model.safetensors"))
    rng = np.random.default_rng(0)
    for name, scale in (("sft", 1e-2), ("aux", 2e-2)):
        (root / name).mkdir()
        (root / name / "config.json").write_text((root / "pretrained" / "config.json").read_text())
        tensors = {
            k: (v + (scale * rng.standard_normal(v.shape)).astype(v.dtype)) if v.dtype.kind == "f" else v
            for k, v in pre.items()
        }
        save_file(tensors, str(root / name / "model.safetensors"), metadata={"format": "pt"})
    return root


def _expected(root: Path, alpha: float) -> dict[str, np.ndarray]:
    """θ_pre + α·(θ_aux − θ_sft) in float32, each operation rounded on its own — capmerge's documented semantics."""
    pre, sft, aux = (load_file(str(root / d / "model.safetensors")) for d in ("pretrained", "sft", "aux"))
    a = np.float32(alpha)
    return {k: (v + a * (aux[k] - sft[k])) if v.dtype.kind == "f" else v for k, v in pre.items()}


def _assert_equal(got: dict[str, np.ndarray], want: dict[str, np.ndarray], where: str) -> None:
    assert set(got) == set(want), (where, set(got) ^ set(want))
    for k, v in want.items():
        bad = np.flatnonzero(got[k].ravel() != v.ravel())
        assert bad.size == 0, f"{where}: {k}[{bad[0]}] = {got[k].ravel()[bad[0]]}, expected {v.ravel()[bad[0]]}"


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "CAPMERGE_DEBUG": "1"}


def _readme_block(lang: str, must: str) -> str:
    text = README.read_text(encoding="utf-8")
    found = [code for start, code in _blocks(text, lang) if start < FIRST_SCREEN and must in code]
    assert found, f"no {lang} block with {must!r} on the README's first screen"
    return found[0]


def test_readme_cli_example_runs(workdir: Path, tmp_path: Path) -> None:
    code = _readme_block("bash", "capmerge diff")
    assert f"--alpha {ALPHA}" in code
    run = tmp_path / "cli"
    run.mkdir()
    for d in ("pretrained", "sft", "aux"):
        os.symlink(workdir / d, run / d)
    commands = [shlex.split(line, comments=True) for line in code.splitlines() if line.strip()]
    assert len(commands) <= 6
    for args in commands:
        assert args[0] == "capmerge", args
        r = subprocess.run([sys.executable, "-m", "capmerge", *args[1:]], cwd=run, env=_env(), capture_output=True,
                           text=True, timeout=300)  # fmt: skip
        assert r.returncode == 0, (args, r.stdout, r.stderr)
    meta = run / "meta"
    _assert_equal(load_file(str(meta / "model.safetensors")), _expected(workdir, ALPHA), "meta/")
    assert json.loads((meta / "config.json").read_text()) == json.loads(
        (workdir / "pretrained" / "config.json").read_text()
    )
    for d in run.glob("meta-*"):  # the sweep's outputs and the one-pass --add/--sub form
        alpha = ALPHA if d.name == "meta-1pass" else float(d.name.removeprefix("meta-"))
        _assert_equal(load_file(str(d / "model.safetensors")), _expected(workdir, alpha), d.name)
    assert {d.name for d in run.glob("meta-*")} >= {"meta-0.2", "meta-0.5", "meta-1pass"}


def test_readme_library_example_runs(workdir: Path, tmp_path: Path) -> None:
    code = _readme_block("python", "import capmerge")
    assert len(code.strip().splitlines()) <= 6 and f"alpha={ALPHA}" in code
    run = tmp_path / "lib"
    run.mkdir()
    for d in ("pretrained", "sft", "aux"):
        os.symlink(workdir / d, run / d)
    # after the example: save the model it changed in memory, to compare with the merged checkpoint on disk
    dump = (
        "\nfrom safetensors.torch import save_file as _save\n"
        "_save({k: v.detach().contiguous() for k, v in model.state_dict().items()}, 'in_memory.safetensors')\n"
    )
    r = subprocess.run([sys.executable, "-c", code + dump], cwd=run, env=_env(), capture_output=True, text=True,
                       timeout=300)  # fmt: skip
    assert r.returncode == 0, (r.stdout, r.stderr)
    want = _expected(workdir, ALPHA)
    _assert_equal(load_file(str(run / "meta" / "model.safetensors")), want, "meta/ (capmerge.apply)")
    in_memory = load_file(str(run / "in_memory.safetensors"))
    float_names = {k for k, v in want.items() if v.dtype.kind == "f"}
    assert float_names <= set(in_memory), float_names - set(in_memory)
    _assert_equal({k: in_memory[k] for k in float_names}, {k: want[k] for k in float_names}, "apply_to_model")


@pytest.mark.parametrize("table", sorted((ROOT / "benchmarks").glob("*.csv")), ids=lambda p: p.name)
def test_benchmark_tables_parse(table: Path) -> None:
    """Every row of a benchmark CSV has its header's fields (a merge's conflict markers sat in results.csv for two
    weeks: csv read them as rows of one field), and rows with a date carry an ISO timestamp."""
    import csv

    with table.open(newline="") as fh:
        rows = list(csv.reader(fh))
    head, body = rows[0], rows[1:]
    assert body, table.name
    bad = [i + 2 for i, r in enumerate(body) if len(r) != len(head)]
    assert not bad, f"{table.name}: rows of another width at lines {bad[:5]}"
    if head[0] == "date":
        assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", r[0]) for r in body), table.name
