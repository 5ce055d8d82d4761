"""One error hierarchy for capmerge.

Every error subclasses :class:`CapmergeError` and a fitting built-in, so callers can catch either
(``except FileNotFoundError`` keeps working). Each carries ``what`` and ``where`` (a path or tensor name);
``str(err)`` is the one-line message the CLI prints after ``error:``.
"""

from __future__ import annotations


class CapmergeError(Exception):
    """Base class of all capmerge errors. ``exit_code`` is what the CLI exits with (2 = bad input)."""

    exit_code = 2

    def __init__(self, what: str, where: str | None = None) -> None:
        self.what = what
        self.where = where
        super().__init__(f"{what} ({where})" if where else what)

    def __str__(self) -> str:
        return f"{self.what} ({self.where})" if self.where else self.what


class UsageError(CapmergeError, ValueError):
    """An option or argument that cannot be used as given."""


class CheckpointError(CapmergeError, ValueError):
    """A checkpoint that cannot be opened or read: bad header, truncated data, broken index."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A path that does not exist, or a directory holding no weights."""


class AmbiguousCheckpointError(CheckpointError):
    """A directory holding several candidate weight sets."""


class MismatchError(CapmergeError, ValueError):
    """Tensor names, shapes or dtypes that do not line up between inputs."""


class OutputExistsError(CapmergeError, FileExistsError):
    """The output exists (and ``force`` was not given) or would overwrite an input."""


class NonFiniteError(CapmergeError, ArithmeticError):
    """The merge produced NaN or Inf where all inputs were finite (e.g. fp16 overflow)."""


class WriteError(CapmergeError, OSError):
    """Writing the output failed (disk full, permission denied); nothing was left behind."""

    exit_code = 1


class HubError(CapmergeError, OSError):
    """A Hugging Face Hub reference that cannot be used: repo or revision not found, no or rejected token, Hub
    unreachable (or offline) without the files in the cache, no safetensors in the repo, a download that does not
    match the repo's file listing. Never carries a token."""


class HubNotFoundError(HubError, FileNotFoundError):
    """A Hub repo, revision or path that does not exist (or is private and no valid token was given)."""


class SkippedFileWarning(UserWarning):
    """A file left out of what is written or uploaded (e.g. a symlink leading outside the checkpoint directory)."""


class ModelAsVectorError(UsageError):
    """A whole model given where a capability vector belongs (θ instead of τ = θ − θ_base); ``reason`` says how
    it was recognised (:mod:`capmerge.vectorcheck`)."""

    reason: str = ""
