"""The capmerge CLI. Importing this package registers every command on :data:`app`."""

from capmerge.cli import apply as _apply  # noqa: F401
from capmerge.cli import compress as _compress  # noqa: F401
from capmerge.cli import diff as _diff  # noqa: F401
from capmerge.cli import hub as _hub  # noqa: F401
from capmerge.cli import inspect as _inspect  # noqa: F401
from capmerge.cli import merge as _merge  # noqa: F401
from capmerge.cli import recipes as _recipes  # noqa: F401
from capmerge.cli.app import app, main

__all__ = ["app", "main"]
