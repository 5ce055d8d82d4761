"""Help screens: every command and subcommand renders, in the conventional form of Python CLIs.

The commands are discovered from the app's own command tree (``typer.main.get_command``), so a command added later
is covered without editing this file.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

import pytest
import typer
import typer.main
from typer.testing import CliRunner

from capmerge.cli import app, main
from capmerge.cli.helptext import Group

TYPE_PLACEHOLDER = re.compile(r"<(str|bool|int|float|path|list\[[^\]]*\]|tuple\[[^\]]*\]|[a-z]+(\|[a-z]+)+)>")


def _tree(command: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    out = [(path, command)]
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        out += _tree(sub, (*path, name))
    return out


COMMANDS = _tree(typer.main.get_command(app))


def _help(path: tuple[str, ...], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("COLUMNS", "200")  # one line per option row: the placeholders sit beside their option
    code = main([*path, "--help"])
    out, err = capsys.readouterr()
    assert code == 0, f"capmerge {' '.join(path)} --help exited {code}: {err}"
    assert err == ""
    return out


def test_the_tree_is_discovered() -> None:
    names = {" ".join(p) for p, _ in COMMANDS}
    # the CLI contract (CONVENTIONS.md) names these; the walk must reach a nested group's subcommands too
    contract = {"", "diff", "apply", "merge", "inspect", "push", "pull", "run", "compress", "recipes", "recipes copy"}
    assert contract <= names


@pytest.mark.parametrize("path", [p for p, _ in COMMANDS], ids=lambda p: " ".join(p) or "capmerge")
def test_every_help_screen_renders_conventionally(
    path: tuple[str, ...], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    command = dict(COMMANDS)[path]
    out = _help(path, capsys, monkeypatch)
    usage = next(line.strip() for line in out.splitlines() if "Usage:" in line)
    assert usage.startswith(" ".join(["Usage: capmerge", *path]))
    assert not TYPE_PLACEHOLDER.search(out), TYPE_PLACEHOLDER.search(out)
    assert "{" not in usage and "}" not in usage, usage
    # positional arguments: upper-case names in the usage line, one per argument of the command
    arguments = [p for p in command.params if p.param_type_name == "argument"]
    rest = usage.split("[OPTIONS]", 1)[1].split()
    if getattr(command, "commands", None):
        assert rest == ["COMMAND", "[ARGS]..."]
        return
    assert len(rest) == len(arguments), usage
    for token in rest:
        bare = token.strip("[]").removesuffix("...").strip("[]")
        assert re.fullmatch(r"[A-Z][A-Z0-9_]*(=[A-Z]+)?", bare), usage
    for arg in arguments:  # optional ones in brackets, repeatable ones with ...
        token = rest[arguments.index(arg)]
        assert token.startswith("[") == (not arg.required), usage
        assert token.endswith("...") == (arg.nargs != 1), usage


@pytest.mark.parametrize(
    "path, pattern",
    [
        (("apply",), r"--alpha\s+-a\s+TEXT\s"),
        (("apply",), r"--gamma\s+FLOAT\s"),
        (("apply",), r"--seed\s+INTEGER\s"),
        (("apply",), r"--output\s+-o\s+PATH\s"),
        (("apply",), r"\sVECTOR\.\.\.\s+Capability vectors"),
        (("apply",), r"--force\s+-f\s+Replace"),  # a flag takes no value: no placeholder
        (("inspect",), r"--json\s+\[FILE\]\s"),  # an optional value
        (("inspect",), r"--top\s+INTEGER\s"),
        (("inspect",), r"--task\s+P S\s"),
        (("diff",), r"Usage: capmerge diff \[OPTIONS\] BASE AUX\s"),
        (("apply",), r"Usage: capmerge apply \[OPTIONS\] BASE \[VECTOR\]\.\.\.\s"),
        (("inspect",), r"Usage: capmerge inspect \[OPTIONS\] \[PATH\]\.\.\.\s"),
        (("push",), r"Usage: capmerge push \[OPTIONS\] VECTOR REPO_ID\s"),
        (("pull",), r"Usage: capmerge pull \[OPTIONS\] REPO_ID\s"),
        (("pull",), r"hf://org/name\[@revision\]\[/subpath\]"),  # printed as written, not read as markup
        (("run",), r"Usage: capmerge run \[OPTIONS\] RECIPE \[KEY=VALUE\]\.\.\.\s"),
    ],
)
def test_placeholders(
    path: tuple[str, ...], pattern: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = _help(path, capsys, monkeypatch)
    assert re.search(pattern, out), out


def test_bare_command_prints_help_without_an_error_line(capsys: pytest.CaptureFixture[str]) -> None:
    for path in ([], ["recipes"]):
        code = main(path)
        out, err = capsys.readouterr()
        assert code == 2  # no command is a usage error, as in click
        assert "Usage: capmerge" in out and "error" not in err


def test_missing_argument_is_named_like_the_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["diff", "only-one"]) == 2
    assert capsys.readouterr().err == "error: Missing argument 'AUX'.\n"


def test_any_help_text_is_safe_from_markup() -> None:
    """A new command whose help holds rich markup look-alikes renders them verbatim (the app's Group does it)."""
    demo = typer.Typer(cls=Group, rich_markup_mode="rich", add_completion=False)

    @demo.command(help="Tags [/oops] and [bold]not bold[/bold] and [red]x")
    def one(
        ref: Annotated[str, typer.Argument(help="org/name[@rev][/sub] \\[escaped]")],
        level: Annotated[float, typer.Option(help="[/closing] only")] = 1.0,
    ) -> None:
        pass

    @demo.command()
    def two() -> None:
        pass

    runner = CliRunner()
    r = runner.invoke(demo, ["one", "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    for text in ("Tags [/oops] and [bold]not bold[/bold] and [red]x", "org/name[@rev][/sub] \\[escaped]",
                 "[/closing] only"):  # fmt: skip
        assert text in r.output, r.output
    assert re.search(r"--level\s+FLOAT\s", r.output) and "Usage: root one [OPTIONS] REF" in r.output
    r = runner.invoke(demo, ["--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0 and "Tags [/oops]" in r.output, r.output
