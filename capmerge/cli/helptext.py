"""Help screens in the conventional form of Python CLIs, and help text that rich markup cannot break.

Typer 0.29 renders placeholders as ``<str>``, ``<list[str]>``, ``<bool>`` and required arguments as ``{base}``.
:class:`Group` (the root command class of the app) walks the whole command tree once, when the tree is built, so
every command and subcommand, present and future, gets:

* positional arguments named in upper case (``BASE``, ``VECTOR...``; ``typer.Argument(metavar=...)`` wins), shown
  as ``BASE`` when required and ``[BASE]`` when optional in the usage line, with no type column;
* option values named by their type (``TEXT``, ``FLOAT``, ``INTEGER``), nothing for flags
  (``typer.Option(metavar=...)`` wins, e.g. ``[FILE]`` for a flag that may take a value);
* help text escaped for rich markup when a help screen is rendered (``rich.markup.escape``), so that
  ``hf://org/name[@revision][/subpath]`` prints as written and no help text can crash ``--help``.

The walk costs a few attribute assignments per run and imports nothing; rich is imported only to render help.
"""

from __future__ import annotations

import types
import typing
from typing import Any

from typer.core import TyperArgument, TyperCommand, TyperGroup

_TYPE_NAMES = {str: "TEXT", int: "INTEGER", float: "FLOAT", bool: "BOOLEAN"}


def type_name(annotation: Any) -> str:
    """The conventional placeholder of a value of type ``annotation``: ``TEXT``, ``FLOAT``, ``INTEGER``, ``PATH``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return type_name(args[0]) if len(args) == 1 else "VALUE"
    if origin in (list, set, frozenset):  # a repeatable option: one value per occurrence
        (arg,) = typing.get_args(annotation) or (str,)
        return type_name(arg)
    if origin is tuple:
        return " ".join(type_name(a) for a in typing.get_args(annotation))
    if isinstance(annotation, type):
        if annotation.__name__.endswith("Path"):
            return "PATH"
        return _TYPE_NAMES.get(annotation, annotation.__name__.upper())
    return "VALUE"


class _Argument(TyperArgument):
    """A positional argument shown as ``BASE`` / ``[BASE]`` / ``VECTOR...`` / ``[VECTOR]...``, without a type."""

    def get_usage_pieces(self, ctx: Any) -> list[str]:
        name = (self.metavar or "").removesuffix("...")
        name = name if self.required else f"[{name}]"
        return [name + ("..." if self.nargs != 1 else "")]

    def display_type_rich(self, ctx: Any) -> str | None:
        return None


class Command(TyperCommand):
    """A command of the app: markup-safe help screen, ``--help`` shown without a type."""

    def get_help_option(self, ctx: Any) -> Any:
        return _untyped(super().get_help_option(ctx))

    def format_help(self, ctx: Any, formatter: Any) -> None:
        _escape_screen(self)
        super().format_help(ctx, formatter)


class Group(TyperGroup):
    """The root group of the app: applies :func:`conventional` to the whole command tree when it is built."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        conventional(self)

    def get_help_option(self, ctx: Any) -> Any:
        return _untyped(super().get_help_option(ctx))

    def format_help(self, ctx: Any, formatter: Any) -> None:
        _escape_screen(self)
        super().format_help(ctx, formatter)


def _untyped(option: Any) -> Any:
    if option is not None and option.metavar is None:
        option.metavar = ""
    return option


def _escape_screen(command: Any) -> None:
    """Escape the help text that a help screen of ``command`` shows: its own, its parameters', its subcommands'."""
    _escape_help(command)
    for sub in getattr(command, "commands", {}).values():
        _escape_help(sub)


def _escape_help(command: Any) -> None:
    """Escape rich markup in the help of ``command`` and of its parameters, once (help text is never markup here)."""
    if getattr(command, "rich_markup_mode", None) != "rich" or getattr(command, "_markup_escaped", False):
        return
    from rich.markup import escape

    for obj, attrs in ((command, ("help", "short_help", "epilog")), *((p, ("help",)) for p in command.params)):
        for attr in attrs:
            if getattr(obj, attr, None):
                setattr(obj, attr, escape(getattr(obj, attr)))
    command._markup_escaped = True


def conventional(command: Any) -> None:
    """Give ``command`` and its subcommands conventional placeholders and markup-safe help (see the module)."""
    if type(command) is TyperCommand:
        command.__class__ = Command
    elif type(command) is TyperGroup:
        command.__class__ = Group
    for param in command.params:
        if isinstance(param, TyperArgument):
            if type(param) is TyperArgument:
                param.__class__ = _Argument
            if param.metavar is None:
                param.metavar = (param.name or "arg").upper() + ("..." if param.nargs != 1 else "")
        elif getattr(param, "param_type_name", "") == "option" and param.metavar is None:
            flag = getattr(param, "is_flag", False) and not getattr(param, "count", False)
            desc = getattr(param, "type_descriptor", None)
            param.metavar = "" if flag else type_name(getattr(desc, "annotation", str))
    for sub in getattr(command, "commands", {}).values():
        conventional(sub)
