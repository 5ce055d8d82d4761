"""Hostile recipes fail fast with one `error:` line at file:line; failed steps leave nothing; the force: guard.

Each hostile recipe runs in a subprocess with a wall-clock timeout (2 s beyond the start-up of the same command on
a trivial recipe, measured here) and an address-space limit, so a regression shows as a timeout or a MemoryError
rather than as a slow or swapping test run. Expected lines are found in the text the test writes.
"""

from __future__ import annotations

import re
import resource
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import save_single, tree_digest
from safetensors.torch import load_file
from typer.testing import CliRunner

from capmerge.cli import app

runner = CliRunner()
MEMORY_LIMIT = 2 * 2**30  # the alias bomb took 3.4 GB before it was bounded


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def _capmerge(args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "capmerge", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, preexec_fn=_limit_memory)  # fmt: skip


@pytest.fixture(scope="module")
def timeout(tmp_path_factory: pytest.TempPathFactory) -> float:
    """2 s for the case itself, on top of what starting the same command on a trivial recipe takes here."""
    d = tmp_path_factory.mktemp("baseline")
    (d / "r.yaml").write_text("steps:\n  s: {op: diff, base: a, aux: b}\n")
    t0 = time.perf_counter()
    _capmerge(["recipes", "validate", "r.yaml"], d, 60)
    return 2.0 + min(time.perf_counter() - t0, 20.0)


def line_of(text: str, marker: str) -> int:
    """1-based line of the first line holding ``marker``."""
    return next(i for i, ln in enumerate(text.splitlines(), 1) if marker in ln)


def alias_bomb() -> tuple[str, int]:
    """A "billion laughs" recipe: level k holds 9 aliases of level k-1 (9**9 = 387 million strings at the last)."""
    levels = ["  a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    names = "abcdefghi"
    for prev, name in zip(names, names[1:], strict=False):
        levels.append(f"  {name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    text = "vars:\n" + "\n".join(levels) + "\nsteps:\n  s: {op: diff, base: x, aux: y, include: *i}\n"
    # Values under level k once expanded: the list itself plus its items, s_a = 1 + 9, s_k = 1 + 9 s_(k-1).
    # The first level past 100000 values is where reading stops.
    size, level = 1 + 9, 0
    while size <= 100_000:
        size, level = 1 + 9 * size, level + 1
    return text, line_of(text, f"  {names[level]}: &")


def string_bomb() -> tuple[str, int]:
    """``${v}`` doubled twice per level: v_i is 10 * 4**i characters long."""
    lines = ["vars:", "  v0: xxxxxxxxxx"] + [f"  v{i}: ${{v{i - 1}}}${{v{i - 1}}}${{v{i - 1}}}${{v{i - 1}}}"
                                              for i in range(1, 40)]  # fmt: skip
    text = "\n".join(lines) + "\nsteps:\n  s: {op: diff, base: '${v39}', aux: y}\n"
    first = next(i for i in range(40) if 10 * 4**i > 1_000_000)  # the first variable over the limit
    return text, line_of(text, f"  v{first}: ")


def list_bomb() -> tuple[str, int]:
    """A list of 10 references to the previous list per level: the values are shared, their expansion is not."""
    lines = ["vars:", "  v0: [" + ", ".join(["x"] * 10) + "]"]
    lines += [f"  v{i}: [" + ", ".join([f"'${{v{i - 1}}}'"] * 10) + "]" for i in range(1, 20)]
    text = "\n".join(lines) + "\nsteps:\n  s: {op: diff, base: x, aux: y, include: '${v19}'}\n"
    # A list counts 1 plus its items: s_0 = 1 + 10 (one-character strings), s_i = 1 + 10 s_(i-1).
    size, first = 11, 0
    while size <= 1_000_000:
        size, first = 1 + 10 * size, first + 1
    return text, line_of(text, f"  v{first}: ")


def marked(text: str, marker: str) -> tuple[str, int]:
    return text, line_of(text, marker)


CASES = {
    "alias bomb": (alias_bomb, "YAML aliases expand to more than 100000 values"),
    "string expansion bomb": (string_bomb, "value expands to more than 1000000 characters"),
    "list expansion bomb": (list_bomb, "value expands to more than 1000000 characters"),
    "list as a mapping key": (lambda: marked("steps:\n  ? [a, b]\n  : {op: diff}\n", "? [a"),
                              "a mapping key must be a plain value such as a name, not a list"),
    "mapping as a mapping key": (lambda: marked("steps:\n  s: {op: diff}\n  ? {a: 1}\n  : 1\n", "? {a"),
                                 "a mapping key must be a plain value such as a name, not a mapping"),
    "NUL byte": (lambda: marked("steps:\n  s:\n    op: diff\n    base: a\0b\n", "base:"),
                 "control character #x0000 is not allowed"),
    "integer of 5000 digits": (lambda: marked("steps:\n  s:\n    op: apply\n    seed: " + "9" * 5000 + "\n", "seed:"),
                               "does not fit in 64 bits"),
    "hex integer of 5000 digits": (lambda: marked("steps:\n  s:\n    op: apply\n    seed: 0x" + "f" * 5000 + "\n",
                                                  "seed:"), "does not fit in 64 bits"),
    "nested 100000 deep": (lambda: marked("steps:\n  s: " + "[" * 100_000 + "]" * 100_000 + "\n", "  s: "),
                           "YAML nested more than 64 levels deep"),
    "date with month 13": (lambda: marked("steps:\n  s:\n    op: diff\n    base: 2020-13-45\n", "base:"),
                           "cannot read the value '2020-13-45' as timestamp: month must be in 1..12"),
    "op a list": (lambda: marked("steps:\n  s:\n    op: [diff]\n", "op:"), "unknown op ['diff']"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_recipe_fails_fast_with_file_and_line(name: str, tmp_path: Path, timeout: float) -> None:
    build, message = CASES[name]
    text, line = build()
    (tmp_path / "r.yaml").write_bytes(text.encode())
    if name == "alias bomb":
        assert len(text) < 700  # the 600-byte document
    before = tree_digest(tmp_path)
    r = _capmerge(["run", "r.yaml", "--workdir", "work"], tmp_path, timeout)  # TimeoutExpired past the limit
    assert r.returncode == 2, r.stderr[:500]
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[:1000]
    assert message in lines[0], lines[0][:500]
    assert lines[0].endswith(f" (r.yaml:{line})") or f" (r.yaml:{line}: " in lines[0], (line, lines[0][:500])
    assert "Traceback" not in r.stderr and not r.stdout
    assert tree_digest(tmp_path) == before and not (tmp_path / "work").exists()
    # validating (the same reading of the file, in this process) gives the same line
    v = runner.invoke(app, ["recipes", "validate", str(tmp_path / "r.yaml")])
    assert v.exit_code == 2 and v.stderr == lines[0].replace("(r.yaml:", f"({tmp_path / 'r.yaml'}:") + "\n", v.stderr[
        :500
    ]


def test_override_of_5000_digits_is_one_error(tmp_path: Path, timeout: float) -> None:
    (tmp_path / "r.yaml").write_text("vars:\n  seed: 1\nsteps:\n  s: {op: diff, base: a, aux: b}\n")
    r = _capmerge(["run", "r.yaml", "seed=" + "9" * 5000], tmp_path, timeout)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr[:500]
    assert (
        r.stderr.startswith("error: invalid override seed=...: integer 999") and "does not fit in 64 bits" in r.stderr
    )


def _pair(tmp: Path) -> tuple[Path, Path, Path]:
    base = save_single(tmp / "in" / "base.safetensors", {"w": torch.arange(6, dtype=torch.float32)})
    aux = save_single(tmp / "in" / "aux.safetensors", {"w": torch.full((6,), 10.0)})
    odd = save_single(tmp / "in" / "odd.safetensors", {"w": torch.ones(5)})
    return base, aux, odd


def test_failed_first_step_leaves_no_work_directory(tmp_path: Path) -> None:
    base, _, odd = _pair(tmp_path)
    (tmp_path / "r.yaml").write_text(f"steps:\n  vec:\n    op: diff\n    base: {base}\n    aux: {odd}\n")
    work = tmp_path / "runs" / "work"
    before = tree_digest(tmp_path)
    r = runner.invoke(app, ["run", str(tmp_path / "r.yaml"), "--workdir", str(work), "--quiet"])
    assert r.exit_code == 2 and r.stderr.startswith("error: shape mismatch: [6] in BASE vs [5] in AUX"), r.stderr
    assert not (tmp_path / "runs").exists(), "the failed step left the work directory behind"
    assert tree_digest(tmp_path) == before


def test_failed_later_step_keeps_earlier_outputs_and_adds_nothing(tmp_path: Path) -> None:
    base, aux, odd = _pair(tmp_path)
    (tmp_path / "r.yaml").write_text(textwrap.dedent(f"""\
        steps:
          vec:
            op: diff
            base: {base}
            aux: {aux}
          merged:
            op: apply
            base: {odd}
            vectors: ["${{steps.vec}}"]
            output: {tmp_path / "out" / "deep" / "merged"}
        """))  # fmt: skip
    work = tmp_path / "work"
    r = runner.invoke(app, ["run", str(tmp_path / "r.yaml"), "--workdir", str(work), "--quiet"])
    assert r.exit_code == 2 and "shape mismatch" in r.stderr, r.stderr
    assert sorted(p.name for p in work.iterdir()) == [".capmerge-steps", "vec.safetensors"]
    assert not (tmp_path / "out").exists()


def _force_recipe(tmp: Path, base: Path, aux: Path, output: Path, force: bool | None) -> Path:
    text = f"steps:\n  vec:\n    op: diff\n    base: {base}\n    aux: {aux}\n    output: {output}\n    dtype: float32\n"
    if force is not None:
        text += f"    force: {'true' if force else 'false'}\n"
    path = tmp / "r.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("force", [None, False])
def test_step_does_not_overwrite_an_output_it_did_not_write(tmp_path: Path, force: bool | None) -> None:
    """README (Recipes, Caching): outputs outside the work directory are replaced only if this step wrote them
    before, else only with ``force: true``."""
    base, aux, _ = _pair(tmp_path)
    out = tmp_path / "results" / "vec.safetensors"
    out.parent.mkdir()
    out.write_bytes(b"somebody else's file")
    recipe = _force_recipe(tmp_path, base, aux, out, force)
    r = runner.invoke(app, ["run", str(recipe), "--workdir", str(tmp_path / "work"), "--quiet"])
    assert r.exit_code == 2, r.stderr
    assert r.stderr == f"error: output exists; pass --force to replace it ({out})\n"
    assert out.read_bytes() == b"somebody else's file"


def test_force_true_replaces_it_and_the_step_owns_it_afterwards(tmp_path: Path) -> None:
    base, aux, _ = _pair(tmp_path)
    out = tmp_path / "results" / "vec.safetensors"
    out.parent.mkdir()
    out.write_bytes(b"somebody else's file")
    work = str(tmp_path / "work")
    r = runner.invoke(app, ["run", str(_force_recipe(tmp_path, base, aux, out, True)), "--workdir", work, "-q"])
    assert r.exit_code == 0, r.stderr
    assert out.read_bytes() != b"somebody else's file"
    expected = torch.full((6,), 10.0) - torch.arange(6, dtype=torch.float32)  # aux - base, by hand: 10, 9, ..., 5
    assert torch.equal(load_file(out)["w"], expected)
    # The step wrote it: a later run (inputs changed, no force:) may replace it.
    save_single(aux, {"w": torch.full((6,), 20.0)})
    r = runner.invoke(app, ["run", str(_force_recipe(tmp_path, base, aux, out, None)), "--workdir", work, "-q"])
    assert r.exit_code == 0, r.stderr
    assert torch.equal(load_file(out)["w"], torch.full((6,), 20.0) - torch.arange(6, dtype=torch.float32))


def test_variables_referring_down_a_long_chain_stop_at_the_nesting_limit(tmp_path: Path, timeout: float) -> None:
    """v999 uses v998, ..., v1 uses v0, written in that order: resolving v999 would recurse 1000 deep."""
    lines = [f"  v{i}: ${{v{i - 1}}}" for i in range(999, 0, -1)]
    text = "vars:\n" + "\n".join(lines) + "\n  v0: x\nsteps:\n  s: {op: diff, base: '${v999}', aux: y}\n"
    (tmp_path / "r.yaml").write_text(text)
    r = _capmerge(["recipes", "validate", "r.yaml"], tmp_path, timeout)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr[:1000]
    m = re.fullmatch(r"error: value nests more than 64 levels deep .*\(r\.yaml:(\d+): vars\.(v\d+)\)\n", r.stderr)
    assert m, r.stderr
    assert int(m.group(1)) == line_of(text, f"  {m.group(2)}: "), r.stderr


def test_filter_list_with_vectors_from_an_unset_variable_or_a_step(tmp_path: Path) -> None:
    """``add: ${v}`` (unset) or ``add: ${steps.x}`` next to a filter list once failed with ``TypeError: Value after *
    must be an iterable``: the number of vectors is unknown until the run, so per-vector counts are checked then."""
    base, aux, _ = _pair(tmp_path)
    path = tmp_path / "r.yaml"
    for add in ("'${v}'", "'${steps.vec}'"):
        path.write_text(textwrap.dedent(f"""\
            vars:
              v: null
            steps:
              vec: {{op: diff, base: {base}, aux: {aux}}}
              merged:
                op: apply
                base: {base}
                add: {add}
                weights: [{{filter: w, value: 1.0}}, {{value: 0.5}}]
            """))  # fmt: skip
        r = runner.invoke(app, ["recipes", "validate", str(path)])
        assert r.exit_code == 0 and r.stdout.startswith(f"ok: {path}: 2 steps"), (add, r.stderr)
    r = runner.invoke(app, ["run", str(path), "--plan"])  # v has no value: that is the one error
    assert (
        r.exit_code == 2
        and r.stderr == f"error: variable 'v' has no value (give v=... on the command line) ({path}:2: vars.v)\n"
    )


@pytest.mark.parametrize(
    "text",
    [
        "x: &x {a: 1, b: 2}\ny:\n  <<: *x\n  b: 9\n",  # a written key overrides a merged one
        "x: &x {a: 1, b: 2}\nz: &z {a: 5, c: 3}\ny: {<<: [*x, *z], b: 9}\n",  # the first merged mapping wins
        "p: &p {weight: 0.5, density: 0.5}\nmodels:\n  - {model: A, parameters: {<<: *p, weight: 0.3}}\n",
    ],
)
def test_yaml_merge_keys_read_as_pyyaml_reads_them(text: str) -> None:
    """YAML merge keys (mergekit configurations use them for shared parameters): the values PyYAML gives, and the
    line of each key — a merged one's where its anchor wrote it."""
    import yaml

    from capmerge.recipes.yaml_lines import load

    got = load(text)
    assert got == yaml.safe_load(text)
    if "models" not in got:
        assert got["y"].lines["b"] == text[: text.index("b: 9")].count("\n") + 1
        assert got["y"].lines["a"] == 1


def test_a_key_written_twice_beside_a_merge_is_still_an_error() -> None:
    from capmerge.recipes.yaml_lines import DuplicateKey, load

    with pytest.raises(DuplicateKey, match="duplicate key 'b' \\(first at line 3\\)"):
        load("x: &x {a: 1}\ny:\n  b: 1\n  <<: *x\n  b: 2\n")
