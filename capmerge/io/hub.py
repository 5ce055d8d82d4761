"""Hugging Face Hub references as checkpoint inputs (``hf://org/name[@rev][/sub]``): fetch, verify, read headers.

A hub reference is ``hf://org/name[@revision][/subpath]``, or a bare ``org/name[@revision]`` when no local path of
that name exists (nor a local directory ``org``, and the name does not end in a weight suffix or ``.json``).

Resolution (``diff``, ``apply``, recipes, the library) fetches everything the checkpoint needs FIRST — the weight
files of the one directory it names (shards and index), its configs, tokenizer files and card — through
``snapshot_download`` with an exact allow-list, then checks every file against the repo's file listing (size; the
sha256 of LFS files fetched by this call) before any output is opened. A failed or partial download therefore never
leaves a half-written output, and the HF cache gives reuse and offline use (``HF_HUB_OFFLINE=1``). ``inspect
--headers-only`` reads only the safetensors headers, by HTTP range requests, where the server honours them.

``huggingface_hub`` is imported inside the functions: ``import capmerge`` and ``capmerge --help`` do not pay for it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from capmerge.errors import (
    CapmergeError,
    HubError,
    HubNotFoundError,
    UsageError,
)

PREFIX = "hf://"
# What a checkpoint directory needs besides its weights: configs, tokenizer files, remote code, the card.
SIDE_FILES = ("*.json", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.jinja", "*.py", "README.md")
WEIGHT_FILES = ("*.safetensors", "*.safetensors.index.json")
_NAME = r"[A-Za-z0-9][\w.\-]*"
_BARE = re.compile(rf"({_NAME}/{_NAME})(?:@([\w.\-]+))?")


@dataclass(frozen=True)
class HubRef:
    """A parsed hub reference: ``repo_id``, ``revision`` (None = the default branch) and ``subpath`` ('' = root)."""

    repo_id: str
    revision: str | None = None
    subpath: str = ""

    def __str__(self) -> str:
        rev = f"@{self.revision}" if self.revision else ""
        sub = f"/{self.subpath}" if self.subpath else ""
        return f"{PREFIX}{self.repo_id}{rev}{sub}"


def parse_ref(ref: str | os.PathLike[str]) -> HubRef | None:
    """The :class:`HubRef` of ``ref``, or None when it is not a hub reference (see the module doc for the rule).

    Raises:
        UsageError: an ``hf://`` reference without ``org/name``.
    """
    ref = os.fspath(ref)
    if ref.startswith(PREFIX):
        parts = ref[len(PREFIX) :].strip("/").split("/")
        if len(parts) < 2 or not re.fullmatch(_NAME, parts[0]):
            raise UsageError("invalid hub reference (expected hf://org/name[@revision][/subpath])", ref)
        name, _, rev = parts[1].partition("@")
        rest = parts[2:]
        if rev == "refs" and len(rest) >= 2:  # @refs/pr/N, @refs/convert/...
            rev, rest = "/".join(["refs", *rest[:2]]), rest[2:]
        if not re.fullmatch(_NAME, name) or (parts[1].endswith("@")):
            raise UsageError("invalid hub reference (expected hf://org/name[@revision][/subpath])", ref)
        return HubRef(f"{parts[0]}/{name}", rev or None, "/".join(p for p in rest if p))
    m = _BARE.fullmatch(ref)
    if m is None or os.path.exists(ref) or os.path.isdir(ref.split("/")[0]):
        return None
    from capmerge.io.checkpoint import WEIGHT_SUFFIXES

    if ref.split("@")[0].endswith((*WEIGHT_SUFFIXES, ".json")):
        return None
    return HubRef(m.group(1), m.group(2))


# --- errors ---------------------------------------------------------------------------------------------------------


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


@contextlib.contextmanager
def _hub_errors(ref: HubRef | str, what: str = "read") -> Iterator[None]:
    """Map huggingface_hub / HTTP errors to one-line :class:`HubError` messages (never holding a token)."""
    from huggingface_hub import errors as E

    where = str(ref)
    try:
        yield
    except CapmergeError:
        raise
    except E.RevisionNotFoundError:
        rev = ref.revision if isinstance(ref, HubRef) else None
        raise HubNotFoundError(f"revision {rev or 'main'!r} not found in the Hub repo", where) from None
    except E.RemoteEntryNotFoundError:
        raise HubNotFoundError("no such file in the Hub repo", where) from None
    except E.GatedRepoError:
        raise HubError(
            "the Hub repo is gated: accept its terms and pass a token (HF_TOKEN or --token)", where
        ) from None
    except E.RepositoryNotFoundError:
        raise HubNotFoundError(
            "Hub repo not found (or it is private and no valid token was given: set HF_TOKEN or pass --token)", where
        ) from None
    except (E.OfflineModeIsEnabled, E.LocalEntryNotFoundError, E.CachedRepoTreeNotFoundError) as e:
        from huggingface_hub import constants

        if constants.is_offline_mode():
            if what != "read":
                raise HubError(f"cannot {what} the Hub while offline (HF_HUB_OFFLINE=1)", where) from None
            raise HubError("offline (HF_HUB_OFFLINE=1) and not in the Hugging Face cache", where) from None
        raise HubError(_unreachable(what, e), where) from e
    except E.HFValidationError as e:  # a repo id or revision huggingface_hub refuses (too long, '--', '..', ...)
        why = " ".join(str(e).split(": '")[0].split())
        raise UsageError(f"invalid Hub repo id or revision: {why}", where[:200]) from None
    except E.HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status == 401:
            raise HubError(f"the Hub rejected the token (401 Unauthorized) on {what}", where) from None
        if status == 403:
            raise HubError(f"the token may not {what} this repo (403 Forbidden)", where) from None
        raise HubError(f"the Hub answered {status} on {what}", where) from None
    except Exception as e:
        if isinstance(e, OSError) and "Consistency check failed" in str(e):
            raise HubError("a downloaded file does not match its size in the repo's file listing", where) from None
        if _is_network_error(e):
            raise HubError(_unreachable(what, e), where) from None
        raise


def _unreachable(what: str, e: BaseException) -> str:
    """The message of a network failure on ``what`` ("read", "write to"): a read may have been served from the cache
    (it was not there); a server that refused an Xet transfer (a Hub-compatible server without Xet storage answers
    404 on its Xet token) is named as such."""
    text = " ".join(str(e).split())
    if "xet" in text.lower():
        return (f"the Hub at {_endpoint()} refused an Xet transfer ({text[:200]}): for a server without Xet storage, "
                "set HF_HUB_DISABLE_XET=1")  # fmt: skip
    if what != "read":
        return f"cannot reach the Hub at {_endpoint()} to {what} the repo"
    return f"cannot reach the Hub at {_endpoint()} and not in the Hugging Face cache"


def _is_network_error(e: BaseException) -> bool:
    try:
        import httpx2 as httpx
    except ImportError:  # older huggingface_hub
        try:
            import httpx  # type: ignore[no-redef]
        except ImportError:
            return isinstance(e, ConnectionError | TimeoutError)
    return isinstance(e, httpx.TransportError | ConnectionError | TimeoutError)


# --- selection and fetching -----------------------------------------------------------------------------------------


def select_files(paths: list[str], sub: str, ref: HubRef | str) -> list[str]:
    """The repo files a checkpoint at ``sub`` needs: the weights (and index) of that one directory and its side
    files; a single ``.safetensors`` file; or an index and the shards of its directory."""
    paths = sorted(paths)
    if sub in paths:
        if sub.endswith(".safetensors"):
            return [sub]
        if sub.endswith(".index.json"):
            d = sub.rsplit("/", 1)[0] + "/" if "/" in sub else ""
            return [sub, *[p for p in paths if _in_dir(p, d) and p.endswith(".safetensors")]]
        raise HubError("not a safetensors file or directory", str(ref))
    d = sub.rstrip("/") + "/" if sub else ""
    inside = [p for p in paths if _in_dir(p, d)]
    if sub and not inside and not any(p.startswith(d) for p in paths):
        raise HubNotFoundError("no such file or directory in the Hub repo", str(ref))
    chosen = [p for p in inside if any(fnmatch(p[len(d) :], pat) for pat in (*WEIGHT_FILES, *SIDE_FILES))]
    if not any(p.endswith(".safetensors") for p in chosen):
        others = [p[len(d) :] for p in inside if p.endswith((".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5"))]
        extra = f" (found {', '.join(others[:5])})" if others else ""
        raise HubError(f"the Hub repo holds no safetensors weights{extra}", str(ref))
    return chosen


def _in_dir(path: str, d: str) -> bool:
    return path.startswith(d) and "/" not in path[len(d) :]


def _pattern(path: str) -> str:
    """An allow-pattern matching exactly ``path`` (fnmatch: brackets escape the wildcard characters)."""
    return re.sub(r"([*?\[])", r"[\1]", path)


def _storage(repo_id: str) -> Path:
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")


def _listing(api: Any, ref: HubRef) -> tuple[str | None, dict[str, tuple[int, str | None]], bool]:
    """The commit, ``path → (size, lfs sha256 or None)`` of ``ref``'s revision, and whether that came from the Hub
    (else from the cache: offline, or the Hub unreachable; the commit is then None — only ranged reads need it, and
    they need the Hub)."""
    from huggingface_hub import constants, get_cached_repo_tree

    if not constants.is_offline_mode():
        try:
            info = api.repo_info(ref.repo_id, revision=ref.revision)  # one plain request: fast failure when offline
        except Exception as e:
            if not _is_network_error(e):
                raise
        else:
            files = api.list_repo_tree(ref.repo_id, revision=info.sha, recursive=True)
            listing = {f.path: (f.size, f.lfs.sha256 if f.lfs else None) for f in files if hasattr(f, "size")}
            return info.sha, listing, True
    cached = get_cached_repo_tree(ref.repo_id, revision=ref.revision)
    return None, {f.path: (f.size, None) for f in cached}, False


def fetch(ref: HubRef, *, token: str | None = None, verify_all: bool = False) -> tuple[Path, list[str]]:
    """Download (or find in the cache) what ``ref`` needs; check it; return the snapshot folder and the files.

    Sizes are always checked against the listing; the sha256 of LFS files is checked for files this call
    downloaded (``verify_all``: for every file). A file that does not match is removed from the cache.
    """
    from huggingface_hub import HfApi, snapshot_download

    api = HfApi(token=token)
    with _hub_errors(ref):
        _, listing, online = _listing(api, ref)
        selected = select_files(list(listing), ref.subpath, ref)
        blobs = _storage(ref.repo_id) / "blobs"
        before = set(os.listdir(blobs)) if blobs.is_dir() else set()
        folder = snapshot_download(
            ref.repo_id,
            revision=ref.revision,
            allow_patterns=[_pattern(p) for p in selected],
            token=token,
            local_files_only=not online,  # offline or unreachable: _listing read the cache
        )
    folder_p = Path(folder)
    for rel in selected:
        size, sha = listing[rel]
        local = folder_p / rel
        got = local.stat().st_size if local.exists() else -1
        problem = None
        if got != size:
            problem = f"size {got} B, the listing says {size} B"
        elif sha and (verify_all or os.path.basename(os.path.realpath(local)) not in before) and _sha256(local) != sha:
            problem = "sha256 differs from the listing's"
        if problem:
            _evict(local)
            raise HubError(f"downloaded file {rel} does not match the repo's file listing ({problem}); removed "
                           "from the cache", str(ref))  # fmt: skip
    return folder_p, selected


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _evict(local: Path) -> None:
    blob = Path(os.path.realpath(local))
    for p in (local, blob):
        with contextlib.suppress(OSError):
            p.unlink()


def resolve(ref: str | os.PathLike[str] | HubRef, *, token: str | None = None) -> str:
    """The local path (in the HF cache) of a hub reference, all its files fetched and checked."""
    h = ref if isinstance(ref, HubRef) else parse_ref(ref)
    if h is None:
        raise UsageError("not a hub reference", os.fspath(ref))  # type: ignore[arg-type]
    try:
        folder, _ = fetch(h, token=token)
    except HubError as e:
        if os.fspath(ref).startswith(PREFIX) or isinstance(ref, HubRef):  # type: ignore[arg-type]
            raise
        # a bare org/name may have been meant as a local path: say both
        raise type(e)(f"no such file or directory, nor usable as a Hub repo: {e.what}", os.fspath(ref)) from None
    return str(folder / h.subpath) if h.subpath else str(folder)


# --- ranged header reads --------------------------------------------------------------------------------------------


def open_headers(ref: str | HubRef, *, token: str | None = None) -> Any:
    """A header-only :class:`~capmerge.io.checkpoint.Checkpoint` of a hub reference from HTTP range reads of each
    safetensors header (8-byte length, then the JSON); None when the server ignores ranges or the layout needs the
    files (adapters, ambiguous directories) — the caller then fetches them."""
    from huggingface_hub import HfApi, constants, hf_hub_download

    from capmerge.io.checkpoint import KNOWN_SINGLE_NAMES, Checkpoint, read_weight_map

    h = ref if isinstance(ref, HubRef) else parse_ref(ref)
    if h is None or constants.is_offline_mode():
        return None
    api = HfApi(token=token)
    with _hub_errors(h):
        try:
            commit, listing, online = _listing(api, h)
        except Exception as e:
            if _is_network_error(e):
                return None
            raise
        if not online:
            return None
        selected = select_files(list(listing), h.subpath, h)
        names = [p.rsplit("/", 1)[-1] for p in selected]
        if "adapter_config.json" in names:
            return None
        indexes = [p for p in selected if p.endswith(".safetensors.index.json")]
        weights = [p for p in selected if p.endswith(".safetensors")]
        index_path = None
        if len(indexes) == 1:
            local_index = hf_hub_download(h.repo_id, indexes[0], revision=commit, token=token)
            d = indexes[0].rsplit("/", 1)[0] + "/" if "/" in indexes[0] else ""
            wmap = read_weight_map(Path(local_index))
            shards = [d + s for s in sorted(set(wmap.values()))]
            index_path = local_index
        elif not indexes and len(weights) == 1 and (h.subpath == weights[0] or names[selected.index(weights[0])]
                                                    in KNOWN_SINGLE_NAMES):  # fmt: skip
            shards, wmap = weights, None
        else:
            return None
        headers = []
        for s in shards:
            if s not in listing:
                raise HubError(f"index names a shard that does not exist: {s}", str(h))
            hd = _ranged_header(h, commit, s, token)
            if hd is None:
                return None
            headers.append(hd)
    tensors = {}
    for s, hd in zip(shards, headers, strict=True):
        for name, info in hd.tensors.items():
            if wmap is None or wmap.get(name) == s.rsplit("/", 1)[-1]:
                tensors[name] = info
    ck = Checkpoint(str(ref), [hd.path for hd in headers], tensors, headers[0].metadata, root=None,
                    index_path=index_path, headers=headers)  # fmt: skip
    return ck


def _ranged_header(h: HubRef, commit: str, path: str, token: str | None) -> Any:
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session

    from capmerge.io.checkpoint import header_length, parse_header

    url = hf_hub_url(h.repo_id, path, revision=commit)
    session = get_session()

    def get(a: int, b: int) -> tuple[bytes, int] | None:
        hdrs = {**build_hf_headers(token=token), "Range": f"bytes={a}-{b}", "Accept-Encoding": "identity"}
        with session.stream("GET", url, headers=hdrs, follow_redirects=True) as r:
            if r.status_code == 200:
                return None  # the server ignored the range: let the caller download instead
            from huggingface_hub.utils import hf_raise_for_status

            hf_raise_for_status(r)
            data = r.read()
            total = int(r.headers.get("Content-Range", "/0").rsplit("/", 1)[-1] or 0)
            return data, total

    first = get(0, 8)
    if first is None:
        return None
    (data, size) = first
    head = data[:8]
    n = header_length(url, head, size, data[8:9])
    second = get(8, 8 + n - 1)
    if second is None:
        return None
    return parse_header(url, head, second[0], size)


# --- push and pull --------------------------------------------------------------------------------------------------
