"""A small Hub-compatible HTTP server for the tests: the endpoints the installed huggingface_hub client calls.

It is honest: it stores what the client uploads (git blobs inline, LFS objects through the basic transfer) and
serves it back; it knows nothing about capmerge. Implemented: ``POST /api/repos/create``, ``POST /api/validate-yaml``,
``GET /api/models/{repo}[/revision/{rev}]`` (repo info with siblings), ``GET /api/models/{repo}/tree/{rev}[/path]``,
``POST /api/models/{repo}/branch/{name}``, ``POST /api/models/{repo}/preupload/{rev}``, the LFS batch API
(``POST /{repo}.git/info/lfs/objects/batch``) with basic upload (``PUT``) and verify, ``POST
/api/models/{repo}/commit/{rev}`` (NDJSON, ``create_pr=1`` opens ``refs/pr/N``), and ``GET``/``HEAD
/{repo}/resolve/{rev}/{path}`` with ETag, X-Repo-Commit, X-Linked-Etag/X-Linked-Size for LFS files, Content-Length
and byte ranges. Private repos answer 401 without a valid bearer token; an unknown token is refused everywhere.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

LFS_EXTENSIONS = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".model", ".gguf", ".h5", ".msgpack", ".onnx")
LFS_THRESHOLD = 10 * 1024 * 1024


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass(frozen=True)
class Entry:
    """One file of a commit: a git blob (``content``) or an LFS object (``lfs`` = sha256)."""

    size: int
    oid: str  # git blob sha1 (of the pointer for LFS files)
    lfs: str | None = None
    content: bytes | None = None


@dataclass
class Repo:
    private: bool
    commits: dict[str, dict[str, Entry]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)  # branch or refs/pr/N -> commit
    messages: dict[str, str] = field(default_factory=dict)  # commit -> its summary line
    prs: int = 0


class HubState:
    def __init__(self, tokens: dict[str, str]) -> None:
        self.tokens = tokens  # token -> user
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self.ranges = True  # honour Range headers on resolve
        self.lock = threading.Lock()

    def new_commit(self, repo: Repo, parent: str | None, files: dict[str, Entry], message: str) -> str:
        blob = json.dumps([parent, message, sorted((p, e.oid) for p, e in files.items()), len(repo.commits)])
        sha = hashlib.sha1(blob.encode()).hexdigest()
        repo.commits[sha] = files
        repo.messages[sha] = message
        return sha


class HubServer:
    """``with HubServer(tokens={"hf_x": "alice"}) as hub: hub.url``: serves in a background thread."""

    def __init__(self, tokens: dict[str, str] | None = None) -> None:
        self.state = HubState(dict(tokens or {}))
        state = self.state

        class Handler(_Handler):
            hub = state

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        Handler.base = self.url
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> HubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _Error(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


class _Handler(BaseHTTPRequestHandler):
    hub: HubState
    base: str
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    # --- plumbing -------------------------------------------------------------------------------------------------
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                n = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if n == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(n)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        hdrs = {"Content-Length": str(len(body)), **(headers or {})}
        for k, v in hdrs.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _user(self) -> str | None:
        """The user of a valid bearer token, None without one; an unknown token is refused (401)."""
        auth = self.headers.get("Authorization") or ""
        if not auth.lower().startswith("bearer "):
            return None
        user = self.hub.tokens.get(auth[7:].strip())
        if user is None:
            raise _Error(401, "Invalid credentials in Authorization header")
        return user

    def _repo(self, repo_id: str, *, write: bool = False) -> Repo:
        user = self._user()
        repo = self.hub.repos.get(repo_id)
        if repo is None or (repo.private and user is None):
            raise _Error(401 if user is None else 404, "Repository not found", "RepoNotFound")
        if write and user is None:
            raise _Error(401, "You must be authenticated to write")
        return repo

    def _commit(self, repo: Repo, rev: str) -> str:
        if rev in repo.refs:
            return repo.refs[rev]
        if rev in repo.commits:
            return rev
        raise _Error(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def _dispatch(self) -> None:
        split = urlsplit(self.path)
        parts = [unquote(p) for p in split.path.split("/")[1:]]
        query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        self.hub.requests.append((self.command, split.path, self.headers.get("Range")))
        try:
            with self.hub.lock:
                self._route(parts, query)
        except _Error as e:
            hdrs = {"X-Error-Message": e.message, **e.headers}
            if e.code:
                hdrs["X-Error-Code"] = e.code
            self._json({"error": e.message}, e.status, hdrs)

    do_GET = do_HEAD = do_POST = do_PUT = _dispatch

    # --- routes ---------------------------------------------------------------------------------------------------
    def _route(self, p: list[str], q: dict[str, str]) -> None:
        m = self.command
        if p[:3] == ["api", "repos", "create"] and m == "POST":
            return self._create_repo()
        if p[:2] == ["api", "validate-yaml"] and m == "POST":
            self._body()
            return self._json({"errors": [], "warnings": []})
        if p[:2] == ["api", "models"] and len(p) >= 4:
            repo_id, rest = f"{p[2]}/{p[3]}", p[4:]
            if not rest and m == "GET":
                return self._info(repo_id, "main")
            if rest[:1] == ["revision"] and m == "GET":
                return self._info(repo_id, "/".join(rest[1:]))
            if rest[:1] == ["tree"] and m == "GET":
                return self._tree(repo_id, rest[1], "/".join(rest[2:]))
            if rest[:1] == ["branch"] and m == "POST":
                return self._branch(repo_id, "/".join(rest[1:]))
            if rest[:1] == ["preupload"] and m == "POST":
                return self._preupload(repo_id, "/".join(rest[1:]))
            if rest[:1] == ["commit"] and m == "POST":
                return self._commit_post(repo_id, "/".join(rest[1:]), q.get("create_pr") == "1")
        if len(p) == 6 and p[1].endswith(".git") and p[2:] == ["info", "lfs", "objects", "batch"] and m == "POST":
            return self._lfs_batch(f"{p[0]}/{p[1][:-4]}")
        if p[:1] == ["lfs-upload"] and m == "PUT":
            return self._lfs_put(p[1])
        if p[:1] == ["lfs-verify"] and m == "POST":
            return self._lfs_verify()
        if len(p) >= 5 and p[2] == "resolve" and m in ("GET", "HEAD"):
            return self._resolve(f"{p[0]}/{p[1]}", p[3], "/".join(p[4:]))
        raise _Error(404, f"no route for {m} {self.path}")

    def _create_repo(self) -> None:
        body = json.loads(self._body() or b"{}")
        if self._user() is None:
            raise _Error(401, "You must be authenticated to create a repo")
        repo_id = f"{body['organization']}/{body['name']}" if body.get("organization") else body["name"]
        if repo_id in self.hub.repos:  # the Hub's 409 also carries the repo's url
            msg = "You already created this model repo"
            return self._json({"error": msg, "url": f"{self.base}/{repo_id}"}, 409, {"X-Error-Message": msg})
        private = body.get("visibility") == "private" or bool(body.get("private"))
        repo = Repo(private=private)
        attrs = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
        repo.refs["main"] = self.hub.new_commit(
            repo, None, {".gitattributes": Entry(len(attrs), git_blob_sha1(attrs), None, attrs)}, "initial commit"
        )
        self.hub.repos[repo_id] = repo
        self._json({"url": f"{self.base}/{repo_id}", "name": repo_id})

    def _info(self, repo_id: str, rev: str) -> None:
        repo = self._repo(repo_id)
        sha = self._commit(repo, rev)
        files = repo.commits[sha]
        siblings = [{"rfilename": path} for path in sorted(files)]
        self._json({"id": repo_id, "modelId": repo_id, "sha": sha, "private": repo.private, "siblings": siblings,
                    "tags": [], "downloads": 0, "likes": 0})  # fmt: skip

    def _tree(self, repo_id: str, rev: str, sub: str) -> None:
        repo = self._repo(repo_id)
        files = repo.commits[self._commit(repo, rev)]
        prefix = sub.rstrip("/") + "/" if sub else ""
        out: list[dict[str, Any]] = []
        dirs: set[str] = set()
        for path in sorted(files):
            if not path.startswith(prefix):
                continue
            parts = path.split("/")
            for i in range(len(prefix.split("/")) if prefix else 1, len(parts)):
                dirs.add("/".join(parts[:i]))
            e = files[path]
            item: dict[str, Any] = {"type": "file", "oid": e.oid, "size": e.size, "path": path}
            if e.lfs:
                item["lfs"] = {"oid": e.lfs, "size": e.size, "pointerSize": len(lfs_pointer(e.lfs, e.size))}
            out.append(item)
        out += [{"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d}
                for d in sorted(dirs)]  # fmt: skip
        if sub and not out:
            raise _Error(404, f"no such path {sub}", "EntryNotFound")
        self._json(out)

    def _branch(self, repo_id: str, name: str) -> None:
        body = json.loads(self._body() or b"{}")
        repo = self._repo(repo_id, write=True)
        if name in repo.refs:
            raise _Error(409, "Reference already exists")
        repo.refs[name] = self._commit(repo, body.get("startingPoint") or "main")
        self._json({})

    def _preupload(self, repo_id: str, rev: str) -> None:
        body = json.loads(self._body())
        self._commit(self._repo(repo_id, write=True), rev)
        out = []
        for f in body["files"]:
            sample = base64.b64decode(f["sample"])
            lfs = f["path"].endswith(LFS_EXTENSIONS) or b"\0" in sample or f["size"] > LFS_THRESHOLD
            out.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False})
        self._json({"files": out, "commitOid": None})

    def _lfs_batch(self, repo_id: str) -> None:
        body = json.loads(self._body())
        self._repo(repo_id, write=True)
        objects = []
        for o in body["objects"]:
            item: dict[str, Any] = {"oid": o["oid"], "size": o["size"], "authenticated": True}
            if o["oid"] not in self.hub.lfs:
                item["actions"] = {
                    "upload": {"href": f"{self.base}/lfs-upload/{o['oid']}", "header": {}},
                    "verify": {"href": f"{self.base}/lfs-verify", "header": {}},
                }
            objects.append(item)
        self._json({"transfer": "basic", "objects": objects}, headers={"Content-Type": "application/vnd.git-lfs+json"})

    def _lfs_put(self, oid: str) -> None:
        data = self._body()
        if hashlib.sha256(data).hexdigest() != oid:
            raise _Error(400, "content does not match its oid")
        self.hub.lfs[oid] = data
        self._send(200)

    def _lfs_verify(self) -> None:
        body = json.loads(self._body())
        data = self.hub.lfs.get(body["oid"])
        if data is None or len(data) != body["size"]:
            raise _Error(404, "object not found")
        self._json({})

    def _commit_post(self, repo_id: str, rev: str, create_pr: bool) -> None:
        lines = [json.loads(x) for x in self._body().splitlines() if x.strip()]
        repo = self._repo(repo_id, write=True)
        parent = self._commit(repo, rev)
        files = dict(repo.commits[parent])
        header = next((x["value"] for x in lines if x["key"] == "header"), {})
        for x in lines:
            k, v = x["key"], x["value"]
            if k == "file":
                data = base64.b64decode(v["content"])
                files[v["path"]] = Entry(len(data), git_blob_sha1(data), None, data)
            elif k == "lfsFile":
                data = self.hub.lfs.get(v["oid"])
                if data is None:
                    raise _Error(422, f"LFS object {v['oid']} of {v['path']} was never uploaded")
                files[v["path"]] = Entry(len(data), git_blob_sha1(lfs_pointer(v["oid"], len(data))), v["oid"])
            elif k == "deletedFile":
                files.pop(v["path"], None)
            elif k == "deletedFolder":
                files = {p: e for p, e in files.items() if not p.startswith(v["path"].rstrip("/") + "/")}
        sha = self.hub.new_commit(repo, parent, files, header.get("summary", ""))
        pr_url = None
        if create_pr:
            repo.prs += 1
            repo.refs[f"refs/pr/{repo.prs}"] = sha
            pr_url = f"{self.base}/{repo_id}/discussions/{repo.prs}"
        else:
            repo.refs[rev] = sha
        self._json({"commitUrl": f"{self.base}/{repo_id}/commit/{sha}", "commitOid": sha, "pullRequestUrl": pr_url})

    def _resolve(self, repo_id: str, rev: str, path: str) -> None:
        repo = self._repo(repo_id)
        sha = self._commit(repo, rev)
        e = repo.commits[sha].get(path)
        if e is None:
            raise _Error(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": sha})
        data = self.hub.lfs[e.lfs] if e.lfs else e.content
        assert data is not None
        hdrs = {"X-Repo-Commit": sha, "ETag": f'"{e.lfs or e.oid}"', "Content-Type": "application/octet-stream"}
        if e.lfs:
            hdrs.update({"X-Linked-Etag": f'"{e.lfs}"', "X-Linked-Size": str(e.size)})
        rng = self.headers.get("Range")
        if self.hub.ranges:
            hdrs["Accept-Ranges"] = "bytes"
        if rng and self.hub.ranges and rng.startswith("bytes="):
            a, _, b = rng[6:].partition("-")
            start = int(a)
            end = min(int(b), len(data) - 1) if b else len(data) - 1
            if start >= len(data):
                raise _Error(416, "range not satisfiable", headers={"Content-Range": f"bytes */{len(data)}"})
            hdrs["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            return self._send(206, data[start : end + 1], hdrs)
        self._send(200, data, hdrs)
