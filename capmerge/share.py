"""``capmerge push`` / ``capmerge pull``: share a vector (with its model card) on the Hugging Face Hub, fetch one.

Reading ``hf://`` references as inputs is :mod:`capmerge.io.hub`'s job; this module sits above it and above the
model card (:mod:`capmerge.analysis.card`), which reads the vector's statistics.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from capmerge.errors import HubError, OutputExistsError, SkippedFileWarning, UsageError
from capmerge.io.hub import PREFIX, HubRef, _hub_errors, fetch, parse_ref


def _token(token: str | None) -> str | None:
    if token:
        return token
    from huggingface_hub import get_token

    return get_token()


def _repo_id(repo_id: str) -> HubRef:
    h = parse_ref(repo_id if repo_id.startswith(PREFIX) else PREFIX + repo_id)
    assert h is not None
    return h


def push(
    path: str | os.PathLike[str],
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    create_pr: bool = False,
    recommended_alpha: float | None = None,
) -> str:
    """Upload a vector (file or sharded directory) or a merged model directory and a generated model card to
    ``repo_id`` in one commit (the repo is created if needed, the branch ``revision`` too).

    Returns:
        The commit URL, or the pull request URL with ``create_pr``.

    Raises:
        HubError: no token, token rejected, Hub unreachable. CheckpointError: ``path`` is not a checkpoint.
    """
    from capmerge.analysis.card import model_card
    from capmerge.io.open import open_checkpoint

    h = _repo_id(repo_id)
    if h.subpath or h.revision:
        raise UsageError("REPO_ID is org/name (use --revision for a branch)", repo_id)
    local = os.fspath(path)
    if not os.path.exists(local):
        from capmerge.errors import CheckpointNotFoundError

        raise CheckpointNotFoundError("no such file or directory", local)
    tok = _token(token)  # before the card, which reads every tensor
    if not tok:
        raise HubError("pushing needs a token: pass --token or set HF_TOKEN (or run `hf auth login`)", h.repo_id)
    ck = open_checkpoint(local)
    try:
        files = _push_files(local, ck)
        card = model_card(ck, h.repo_id, recommended_alpha=recommended_alpha)
    finally:
        ck.close()
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(token=tok)
    ops = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=src) for name, src in files]
    ops.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode()))
    message = commit_message or f"Upload {ck.metadata.get('capmerge.kind', 'checkpoint')} with capmerge"
    with _hub_errors(h.repo_id, "write to"):
        api.create_repo(h.repo_id, private=private, exist_ok=True)
        if revision and revision != "main":
            api.create_branch(h.repo_id, branch=revision, exist_ok=True)
        info = api.create_commit(h.repo_id, ops, commit_message=message, revision=revision, create_pr=create_pr)
    return str(info.pr_url if create_pr and info.pr_url else info.commit_url)


def _push_files(local: str, ck: Any) -> list[tuple[str, str]]:
    """(name in repo, local path): a single file goes up as ``capvector.safetensors`` (a vector) or
    ``model.safetensors``, the names a checkpoint directory is opened by; a directory with everything but a README
    (the card replaces it), hidden files and side files that are symlinks leading outside the directory (or outside
    its Hub cache entry), each of which is named in a :class:`~capmerge.errors.SkippedFileWarning`."""
    if os.path.isfile(local):
        from capmerge.io.checkpoint import KNOWN_SINGLE_NAMES

        name = os.path.basename(local)
        if name not in KNOWN_SINGLE_NAMES:
            vector = ck.metadata.get("capmerge.kind") == "capability-vector" or getattr(ck, "kind", "dense") != "dense"
            name = "capvector.safetensors" if vector else "model.safetensors"
        return [(name, local)]
    import warnings

    from capmerge.io.checkpoint import checkpoint_bounds, leads_outside

    out = []
    bounds = checkpoint_bounds(local)
    # The checkpoint's own weights and index may be symlinks to anywhere (they were opened and checked as such).
    weights = {os.path.realpath(f) for f in [*ck.files, *([ck.index_path] if ck.index_path else [])]}
    for p in sorted(Path(local).iterdir()):
        if p.is_file() and not p.name.startswith(".") and p.name != "README.md":
            outside = leads_outside(p, bounds) if os.path.realpath(p) not in weights else None
            if outside is not None:  # its content is not the checkpoint's: never upload it
                warnings.warn(
                    f"{p.name} not uploaded: a symlink leading outside {local} (to {outside})",
                    SkippedFileWarning,
                    stacklevel=3,
                )
                continue
            out.append((p.name, str(p)))
    return out


def pull(
    repo_id: str,
    *,
    output: str | os.PathLike[str] | None = None,
    revision: str | None = None,
    token: str | None = None,
) -> str:
    """Download what a vector or model needs (weights, index, configs, tokenizer files, card) and check every file
    (size and sha256) against the repo's listing. Into the HF cache, or ``output`` (which must not exist or be
    empty; filled only after the checks pass). Returns the local path."""
    h = _repo_id(repo_id)
    if revision:
        h = HubRef(h.repo_id, revision, h.subpath)
    out = Path(output) if output is not None else None
    if out is not None and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OutputExistsError("output exists and is not an empty directory", str(out))
    folder, selected = fetch(h, token=token, verify_all=True)
    src = folder / h.subpath if h.subpath and not h.subpath.endswith((".safetensors", ".json")) else folder
    if out is None:
        return str(folder / h.subpath) if h.subpath else str(folder)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for rel in selected:
            dst = tmp / os.path.relpath(folder / rel, src)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(folder / rel, dst)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(out)
