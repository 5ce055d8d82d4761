"""Hugging Face Hub: push / pull / hf:// inputs, with the real huggingface_hub client over real HTTP.

The client talks to tests/hubserver.py (a loopback Hub that stores what it receives) through HF_ENDPOINT. The CLI
runs in subprocesses because huggingface_hub reads HF_ENDPOINT, HF_HUB_OFFLINE and HF_HUB_DISABLE_XET at import.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import load_any, make_ckpts, tree_digest
from hubserver import HubServer
from safetensors import safe_open
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_testtoken_alice_5f3c9a"
BAD_TOKEN = "hf_not_a_valid_token_77aa1"


@pytest.fixture(scope="module")
def hub():
    with HubServer(tokens={TOKEN: "alice"}) as h:
        yield h


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """:func:`make_ckpts` once for the module (``dir``: their folder)."""
    d = tmp_path_factory.mktemp("hubdata")
    return {**make_ckpts(d), "dir": d}


def run(args: list[str], home: Path, hub: HubServer | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m capmerge ARGS`` with the Hub settings in the environment (HF_HOME = ``home``: its own cache)."""
    e = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}  # other tests set some
    e.update(PYTHONPATH=str(ROOT), HF_HOME=str(home), HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1",
             HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_ETAG_TIMEOUT="5")  # fmt: skip
    if hub is not None:
        e["HF_ENDPOINT"] = hub.url
    e.update(env)
    return subprocess.run([sys.executable, "-m", "capmerge", *args], env=e, capture_output=True, text=True,
                          cwd=home.parent, timeout=120)  # fmt: skip


def ok(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def err(r: subprocess.CompletedProcess[str], *needles: str) -> str:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert r.stdout == "", r.stdout  # no partial output
    for n in needles:
        assert n in lines[0], lines[0]
    assert "Traceback" not in r.stderr
    return lines[0]


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def files_of(d: Path) -> dict[str, str]:
    return {p.name: sha(p) for p in sorted(Path(d).iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def pushed(hub: HubServer, data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """τ (single file and sharded) made by the CLI and pushed, and P pushed as a model repo."""
    home = tmp_path_factory.mktemp("push") / "hf"
    d = data["dir"]
    ok(run(["diff", str(data["S"]), str(data["A"]), "-o", str(d / "tau.safetensors"), "-q"], home))
    ok(run(["diff", str(data["S"]), str(data["A"]), "-o", str(d / "tau_sharded"), "--shard-size", "4KB", "-q"], home))
    url = ok(run(["push", str(d / "tau.safetensors"), "org/tau", "--token", TOKEN, "--recommended-alpha", "0.5"],
                 home, hub))  # fmt: skip
    assert url.startswith(f"{hub.url}/org/tau/commit/")
    ok(run(["push", str(d / "tau_sharded"), "org/tau-sharded", "-q"], home, hub, HF_TOKEN=TOKEN))
    ok(run(["push", str(data["P"]), "org/pre", "-q"], home, hub, HF_TOKEN=TOKEN))
    return {"tau": d / "tau.safetensors", "tau_sharded": d / "tau_sharded", "home": home}


def test_push_pull_single_file_round_trip(hub, pushed, tmp_path: Path) -> None:
    out = tmp_path / "pulled"
    path = ok(run(["pull", "org/tau", "-o", str(out)], tmp_path / "hf", hub))
    assert Path(path) == out
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "capvector.safetensors"]  # a directory's name
    assert sha(out / "capvector.safetensors") == sha(pushed["tau"])
    # what the server stored is what was sent
    repo = hub.state.repos["org/tau"]
    entry = repo.commits[repo.refs["main"]]["capvector.safetensors"]
    assert entry.lfs == sha(pushed["tau"])


def test_push_pull_sharded_round_trip(hub, pushed, tmp_path: Path) -> None:
    src = files_of(pushed["tau_sharded"])
    assert len([n for n in src if n.endswith(".safetensors")]) >= 2
    path = Path(ok(run(["pull", "hf://org/tau-sharded", "--revision", "main"], tmp_path / "hf", hub)))
    assert "snapshots" in path.parts  # into the HF cache by default
    got = files_of(path)
    assert got.pop("README.md")
    assert got == src


def test_card_front_matter_and_stats(hub, pushed, data, tmp_path: Path) -> None:
    path = Path(ok(run(["pull", "org/tau"], tmp_path / "hf", hub)))
    text = (path / "README.md").read_text()
    assert text.startswith("---\n")
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["library_name"] == "capmerge"
    assert meta["tags"] == ["capmerge", "capability-vector"]
    assert meta["recommended_alpha"] == 0.5
    assert "base_model" not in meta  # local inputs are not hub ids
    assert f"capmerge diff {data['S']} {data['A']} -o {pushed['tau']} -q" in text
    assert "capmerge apply <pretrained> hf://org/tau -o merged/ --alpha 0.5" in text
    # size, dtypes and the provenance keys of the header metadata, read with safetensors itself
    with safe_open(str(pushed["tau"]), "pt") as f:
        header_meta = f.metadata()
        names = list(f.keys())
        dtypes = {str(f.get_slice(k).get_dtype()) for k in names}
        numel = sum(math.prod(f.get_slice(k).get_shape()) for k in names)
    count = len(names)
    assert f"{count} tensors, {numel:,} parameters" in text
    (dtype,) = dtypes
    assert f"dtypes: {dtype} ({count} tensors)" in text
    for k, v in header_meta.items():
        if k.startswith("capmerge.") and k != "capmerge.command" and len(v) <= 200:
            assert f"| `{k}` |" in text, k
    # per-layer table against numpy: sum of squares per block index, share of the total
    tau = {k: v.float().numpy() for k, v in load_file(str(pushed["tau"])).items()}
    sums: dict[str, float] = {}
    for name, v in tau.items():
        layer = name.split(".")[1] if name.startswith("layers.") else "other"
        sums[layer] = sums.get(layer, 0.0) + float(np.sum(v.astype(np.float64) ** 2))
    total = sum(sums.values())
    rows = {line.split("|")[1].strip(): line.split("|")[2:6] for line in text.splitlines()
            if line.startswith("| ") and line.count("|") == 6 and "layer" not in line}  # fmt: skip
    assert set(rows) == set(sums)
    for layer, (count, _params, norm, share) in rows.items():
        assert int(count) == sum(1 for n in tau if (n.split(".")[1] if n.startswith("layers.") else "other") == layer)
        assert float(norm) == pytest.approx(math.sqrt(sums[layer]), rel=1e-5)
        assert float(share) == pytest.approx(sums[layer] / total, abs=1e-4)


def test_apply_with_hub_inputs_matches_local(hub, pushed, data, tmp_path: Path) -> None:
    home = tmp_path / "hf"
    ok(run(["apply", str(data["P"]), str(pushed["tau"]), "-o", str(tmp_path / "local"), "--alpha", "0.5", "-q"], home))
    ok(run(["apply", "hf://org/pre", "org/tau", "-o", str(tmp_path / "remote"), "--alpha", "0.5", "-q"], home, hub))
    local, remote = files_of(tmp_path / "local"), files_of(tmp_path / "remote")
    assert set(remote) == set(local) | {"README.md"}  # org/pre's card is copied like any non-weight file
    for name in ("config.json", "tokenizer.json"):
        assert remote[name] == local[name]
    for name in [n for n in local if n.endswith(".safetensors")]:  # tensors bit for bit (metadata names inputs)
        a, b = load_file(str(tmp_path / "local" / name)), load_file(str(tmp_path / "remote" / name))
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype and a[k].view(-1).view(torch.uint8).equal(b[k].view(-1).view(torch.uint8))
    idx = "model.safetensors.index.json"
    wmap = json.loads((tmp_path / "local" / idx).read_text())["weight_map"]
    assert json.loads((tmp_path / "remote" / idx).read_text())["weight_map"] == wmap
    rec = json.loads((tmp_path / "remote" / "capmerge.json").read_text())
    assert "hf://org/pre" in json.dumps(rec) and "org/tau" in json.dumps(rec)


def test_revision_branch_and_pr(hub, pushed, data, tmp_path: Path) -> None:
    home = tmp_path / "hf"
    tau2 = tmp_path / "tau2.safetensors"
    ok(run(["diff", str(data["A"]), str(data["S"]), "-o", str(tau2), "-q"], home))  # −τ: other bytes
    ok(run(["push", str(tau2), "org/tau", "--revision", "dev", "--commit-message", "minus tau", "-q"], home, hub,
           HF_TOKEN=TOKEN))  # fmt: skip
    repo = hub.state.repos["org/tau"]
    assert repo.messages[repo.refs["dev"]] == "minus tau"
    assert repo.messages[repo.refs["main"]] == "Upload capability-vector with capmerge"  # the default
    dev = Path(ok(run(["pull", "hf://org/tau@dev"], home, hub)))
    assert sha(dev / "capvector.safetensors") == sha(tau2)
    main = Path(ok(run(["pull", "org/tau"], home, hub)))
    assert sha(main / "capvector.safetensors") == sha(pushed["tau"])
    pr = ok(run(["push", str(tau2), "org/tau", "--create-pr", "-q"], home, hub, HF_TOKEN=TOKEN))
    assert pr.startswith(f"{hub.url}/org/tau/discussions/")
    n = pr.rsplit("/", 1)[1]
    got = Path(ok(run(["pull", f"hf://org/tau@refs/pr/{n}"], home, hub)))
    assert sha(got / "capvector.safetensors") == sha(tau2)
    err(run(["pull", "hf://org/tau@nope"], home, hub), "revision 'nope' not found", "hf://org/tau@nope")


def test_private_repo_needs_token(hub, pushed, tmp_path: Path) -> None:
    home = tmp_path / "hf"
    ok(run(["push", str(pushed["tau"]), "org/secret", "--private", "--token", TOKEN, "-q"], home, hub))
    line = err(run(["pull", "org/secret"], home, hub), "Hub repo not found", "private")
    assert TOKEN not in line
    out = tmp_path / "o"
    ok(run(["pull", "org/secret", "-o", str(out)], home, hub, HF_TOKEN=TOKEN))
    assert sha(out / "capvector.safetensors") == sha(pushed["tau"])
    # --token overrides HF_TOKEN
    ok(run(["pull", "org/secret", "--token", TOKEN], home, hub, HF_TOKEN=BAD_TOKEN))


def test_push_token_errors_never_print_the_token(hub, pushed, tmp_path: Path) -> None:
    home = tmp_path / "hf"
    before = tree_digest(pushed["tau"])
    err(run(["push", str(pushed["tau"]), "org/new"], home, hub), "needs a token", "HF_TOKEN")
    err(run(["push", str(pushed["tau"]), "org/new", "--token", TOKEN], home, hub, HF_HUB_OFFLINE="1"), "offline")
    r = run(["push", str(pushed["tau"]), "org/new", "--token", BAD_TOKEN], home, hub)
    err(r, "rejected the token")
    assert BAD_TOKEN not in r.stdout + r.stderr
    r = run(["push", str(pushed["tau"]), "org/new"], home, hub, HF_TOKEN=BAD_TOKEN)
    err(r, "rejected the token")
    assert BAD_TOKEN not in r.stdout + r.stderr
    assert "org/new" not in hub.state.repos
    assert tree_digest(pushed["tau"]) == before  # the input is untouched


def test_not_found_and_no_safetensors(hub, pushed, tmp_path: Path) -> None:
    home = tmp_path / "hf"
    out = tmp_path / "out"
    err(run(["apply", "hf://org/pre", "hf://org/missing", "-o", str(out)], home, hub), "Hub repo not found",
        "hf://org/missing")  # fmt: skip
    assert not out.exists()
    err(run(["pull", "org/missing"], home, hub), "Hub repo not found")
    # a bare name may have been meant as a local path: the message says both
    err(run(["inspect", "org/missing"], home, hub), "no such file or directory, nor usable as a Hub repo",
        "Hub repo not found", "(org/missing)")  # fmt: skip
    # a repo with only a config and a pickle: pushed with the client itself
    code = ("from huggingface_hub import HfApi, CommitOperationAdd as A; api = HfApi(); api.create_repo('org/bin');"
            "api.create_commit('org/bin', [A('config.json', b'{}'), A('pytorch_model.bin', b'\\x00' * 64)], "
            "commit_message='x')")  # fmt: skip
    e = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    e.update(HF_ENDPOINT=hub.url, HF_TOKEN=TOKEN, HF_HOME=str(home), HF_HUB_DISABLE_XET="1")
    subprocess.run([sys.executable, "-c", code], env=e, check=True, capture_output=True)
    err(run(["pull", "org/bin"], home, hub), "holds no safetensors", "pytorch_model.bin")
    err(run(["inspect", "hf://org/bin", "--headers-only"], home, hub), "holds no safetensors")
    err(run(["pull", "hf://org/tau/nothing/here"], home, hub), "no such file or directory in the Hub repo")


def test_offline_and_unreachable(hub, pushed, data, tmp_path: Path) -> None:
    warm, cold = tmp_path / "warm", tmp_path / "cold"
    ok(run(["pull", "org/tau"], warm, hub))
    out = tmp_path / "m"
    ok(run(["apply", str(data["P"]), "hf://org/tau", "-o", str(out), "-q"], warm, hub, HF_HUB_OFFLINE="1"))
    assert (out / "capmerge.json").exists()
    err(run(["apply", str(data["P"]), "hf://org/tau", "-o", str(tmp_path / "n")], cold, hub, HF_HUB_OFFLINE="1"),
        "offline (HF_HUB_OFFLINE=1)", "hf://org/tau")  # fmt: skip
    assert not (tmp_path / "n").exists()
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    err(run(["pull", "org/tau"], cold, None, HF_ENDPOINT=dead), "cannot reach the Hub", dead)
    # unreachable but cached: the cache is used
    ok(run(["inspect", "hf://org/tau", "--headers-only", "--json"], warm, None, HF_ENDPOINT=dead))
    # a push has no cache to fall back on: the message does not speak of one
    line = err(run(["push", str(data["dir"] / "tau.safetensors"), "org/tau"], cold, None, HF_ENDPOINT=dead,
                   HF_TOKEN=TOKEN), f"cannot reach the Hub at {dead} to write to the repo (org/tau)")  # fmt: skip
    assert "cache" not in line


def test_a_server_without_xet_is_named(hub, data, tmp_path: Path) -> None:
    """With Xet transfers on (huggingface_hub's default where hf_xet is installed), a Hub-compatible server without
    Xet storage (this one: 404 on the Xet token) fails the upload: the message names Xet and the setting that turns it
    off, instead of "cannot reach the Hub ... not in the Hugging Face cache"."""
    r = run(["push", str(data["dir"] / "tau.safetensors"), "org/xet"], tmp_path / "hf", hub, HF_TOKEN=TOKEN,
            HF_HUB_DISABLE_XET="0")  # fmt: skip
    line = err(r, f"the Hub at {hub.url} refused an Xet transfer", "set HF_HUB_DISABLE_XET=1 (org/xet)")
    assert "xet-write-token" in line and "cache" not in line


def test_download_not_matching_listing(hub, pushed, tmp_path: Path) -> None:
    oid = sha(pushed["tau"])
    good = hub.state.lfs[oid]
    try:
        bad = bytearray(good)
        bad[-1] ^= 0xFF
        hub.state.lfs[oid] = bytes(bad)  # storage corruption: same size, other bytes
        home = tmp_path / "hf"
        out = tmp_path / "o"
        err(run(["pull", "org/tau", "-o", str(out)], home, hub), "does not match the repo's file listing", "sha256")
        assert not out.exists()
        err(run(["inspect", "hf://org/tau"], home, hub), "does not match")  # not left in the cache either
        hub.state.lfs[oid] = good[:-3]  # truncated
        err(run(["pull", "org/tau"], tmp_path / "hf2", hub), "does not match")
    finally:
        hub.state.lfs[oid] = good
    assert sha(Path(ok(run(["pull", "org/tau"], home, hub))) / "capvector.safetensors") == oid


def test_inspect_headers_only_uses_ranged_reads(hub, pushed, tmp_path: Path) -> None:
    home = tmp_path / "hf"
    local = json.loads(ok(run(["inspect", str(pushed["tau_sharded"]), "--headers-only", "--json"], home)))
    hub.state.requests.clear()
    remote = json.loads(ok(run(["inspect", "hf://org/tau-sharded", "--headers-only", "--json"], home, hub)))
    gets = [(m, p, r) for m, p, r in hub.state.requests if m == "GET" and p.endswith(".safetensors")]
    assert gets and all(r is not None for _, _, r in gets)  # only ranged reads of the weight files
    assert not (home / "hub" / "models--org--tau-sharded" / "blobs").exists() or not any(
        p.stat().st_size > 4000 for p in (home / "hub" / "models--org--tau-sharded" / "blobs").iterdir()
    )
    for k in ("kind", "tensors", "params", "dtypes", "fingerprint", "metadata", "tensor_bytes"):
        assert remote["inputs"][0][k] == local["inputs"][0][k], k
    hub.state.ranges = False  # a server without ranges: the files are downloaded instead
    try:
        again = json.loads(ok(run(["inspect", "hf://org/tau-sharded", "--headers-only", "--json"], home, hub)))
    finally:
        hub.state.ranges = True
    assert again["inputs"][0]["fingerprint"] == local["inputs"][0]["fingerprint"]


def test_push_merged_model_directory(hub, pushed, data, tmp_path: Path) -> None:
    home = tmp_path / "hf"
    merged = tmp_path / "merged"
    ok(run(["apply", "hf://org/pre", "hf://org/tau", "-o", str(merged), "--alpha", "0.5", "-q"], home, hub))
    ok(run(["push", str(merged), "org/merged", "-q"], home, hub, HF_TOKEN=TOKEN))
    got = Path(ok(run(["pull", "org/merged"], home, hub)))
    meta = yaml.safe_load((got / "README.md").read_text().split("---\n")[1])
    assert meta["tags"] == ["capmerge", "merge"]
    assert meta["base_model"] == ["org/pre", "org/tau"] and meta["base_model_relation"] == "merge"
    src = files_of(merged)
    src.pop("README.md")  # replaced by the generated card
    pulled = files_of(got)
    pulled.pop("README.md")
    assert pulled == src


def test_push_skips_symlinks_leading_outside(hub, data, tmp_path: Path) -> None:
    """A file of the pushed directory that is a symlink leading outside it is not uploaded (and said so)."""
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the Hub")
    d = tmp_path / "model"
    d.mkdir()
    (d / "model.safetensors").symlink_to(data["A"])  # the weights themselves may lead anywhere
    (d / "config.json").write_text('{"model_type": "toy"}')
    (d / "notes.txt").symlink_to(secret)
    (d / "vocab.txt").symlink_to("config.json")  # inside: uploaded
    r = run(["push", str(d), "org/links", "--json"], tmp_path / "hf", hub, HF_TOKEN=TOKEN)
    assert r.returncode == 0, r.stderr
    skipped = json.loads(r.stdout)["skipped"]
    assert len(skipped) == 1 and skipped[0].startswith("notes.txt not uploaded") and str(secret) in skipped[0]
    assert f"warning: {skipped[0]}" in r.stderr
    repo = hub.state.repos["org/links"]
    stored = repo.commits[repo.refs["main"]]
    assert sorted(n for n in stored if n != ".gitattributes") == ["README.md", "config.json", "model.safetensors",
                                                                  "vocab.txt"]  # fmt: skip
    assert stored["model.safetensors"].lfs == sha(data["A"])


def test_parse_ref_rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from capmerge.io.hub import HubRef, parse_ref

    assert parse_ref("hf://org/name") == HubRef("org/name")
    assert parse_ref("hf://org/name@v2/sub/dir") == HubRef("org/name", "v2", "sub/dir")
    assert parse_ref("hf://org/name@refs/pr/3/x.safetensors") == HubRef("org/name", "refs/pr/3", "x.safetensors")
    assert parse_ref("org/name@dev") == HubRef("org/name", "dev")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    assert parse_ref("runs/missing") is None  # the first component is a local directory
    assert parse_ref("org/model.safetensors") is None  # looks like a file
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert parse_ref("org/name") is None  # a local path of that name exists


def test_diff_from_hub_ids_card_base_model_and_recipe_push(hub, pushed, data, tmp_path: Path) -> None:
    home = tmp_path / "hf"
    ok(run(["push", str(data["S"].parent), "org/sft", "-q"], home, hub, HF_TOKEN=TOKEN))
    ok(run(["push", str(data["A"]), "org/aux", "-q"], home, hub, HF_TOKEN=TOKEN))
    tau = tmp_path / "tau.safetensors"
    ok(run(["diff", "hf://org/sft", "org/aux", "-o", str(tau), "-q"], home, hub))
    a, b = load_file(str(tau)), load_file(str(pushed["tau"]))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    ok(run(["push", str(tau), "org/tau-hub", "-q"], home, hub, HF_TOKEN=TOKEN))
    text = (Path(ok(run(["pull", "org/tau-hub"], home, hub))) / "README.md").read_text()
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["base_model"] == ["org/sft", "org/aux"]
    assert f"capmerge diff hf://org/sft org/aux -o {tau} -q" in text
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "steps:\n  tau:\n    op: diff\n    base: hf://org/sft\n    aux: org/aux\n"
        "  up:\n    op: push\n    path: ${steps.tau}\n    repo_id: org/tau-recipe\n    recommended_alpha: 0.7\n"
    )
    ok(run(["run", str(recipe), "--workdir", str(tmp_path / "work")], home, hub, HF_TOKEN=TOKEN))
    got = Path(ok(run(["pull", "org/tau-recipe"], home, hub)))
    c = load_file(str(got / "capvector.safetensors"))
    assert c.keys() == b.keys() and all(c[k].equal(b[k]) for k in c)
    assert yaml.safe_load((got / "README.md").read_text().split("---\n")[1])["recommended_alpha"] == 0.7


def test_mergekit_config_with_hub_models_and_a_revision(hub, pushed, data, tmp_path: Path) -> None:
    """A mergekit configuration naming Hub models (``org/name``, ``org/name@revision``) merges the same bytes as the
    same configuration naming the local folders."""
    home = tmp_path / "hf"
    sdir = data["S"].parent  # S as a model folder (model.safetensors)
    ok(run(["push", str(sdir), "org/sft", "--revision", "dev", "-q"], home, hub, HF_TOKEN=TOKEN))

    def config(base: str, other: str) -> str:
        return (f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: {other}\n"
                "    parameters: {weight: 0.5}\ndtype: float32\n")  # fmt: skip

    (tmp_path / "local.yml").write_text(config(json.dumps(str(data["P"])), json.dumps(str(sdir))))
    (tmp_path / "remote.yml").write_text(config("org/pre", "org/sft@dev"))
    ok(run(["run", str(tmp_path / "local.yml"), "-o", str(tmp_path / "local")], home))
    ok(run(["run", str(tmp_path / "remote.yml"), "-o", str(tmp_path / "remote")], home, hub))
    a, b = load_any(tmp_path / "local"), load_any(tmp_path / "remote")
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    p, s = load_any(data["P"]), load_any(sdir)
    k = next(n for n in p if p[n].is_floating_point())
    expected = p[k].float() + 0.5 * (s[k].float() - p[k].float())  # task arithmetic by hand
    assert torch.allclose(b[k].float(), expected, rtol=0, atol=1e-6)
    # offline with an empty cache: one error line naming the model, nothing written (the filled cache would serve)
    err(run(["run", str(tmp_path / "remote.yml"), "-o", str(tmp_path / "none")], tmp_path / "hf2", hub,
            HF_HUB_OFFLINE="1"), "org/pre")  # fmt: skip
    assert not (tmp_path / "none").exists()


def test_mergekit_config_fetches_into_transformers_cache(hub, pushed, data, tmp_path: Path) -> None:
    """``capmerge run CONFIG OUT --transformers-cache DIR`` (mergekit-yaml's option): Hub models land in DIR."""
    cfg = tmp_path / "linear.yml"
    cfg.write_text("merge_method: linear\nmodels:\n  - model: org/pre\n    parameters:\n      weight: 1.0\n")
    cache, home = tmp_path / "mk-cache", tmp_path / "hf"
    ok(run(["run", str(cfg), str(tmp_path / "out"), "--transformers-cache", str(cache), "-q"], home, hub))
    assert (cache / "models--org--pre").is_dir()
    assert not (home / "hub" / "models--org--pre").exists()
    got, want = load_any(tmp_path / "out"), load_any(data["P"])
    assert sorted(got) == sorted(want) and all(torch.equal(got[n], want[n]) for n in want)


def test_push_passes_on_no_warning_the_default_filters_hide(hub: HubServer, data: dict[str, Path], tmp_path: Path):
    """push collects its skipped-file warnings; other warnings reach the user as Python's default filters let them:
    a library's DeprecationWarning (httpx's, under huggingface_hub's upload) is not one of them."""
    r = run(["push", str(data["P"]), "org/quiet-push"], tmp_path / "hf", hub, HF_TOKEN=TOKEN)
    ok(r)
    assert r.stderr.strip().splitlines() == ["push: committed on org/quiet-push"], r.stderr
