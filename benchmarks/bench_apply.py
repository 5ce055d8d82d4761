"""Benchmark `capmerge diff` / `capmerge apply` against the I/O floor and mergekit on a synthetic Llama checkpoint.

Run:
    .venv/bin/python benchmarks/bench_apply.py                      # headline: 0.95b, 3 repeats, mergekit if installed
    .venv/bin/python benchmarks/bench_apply.py --size tiny          # quick end-to-end check
    .venv/bin/python benchmarks/bench_apply.py --setup-mergekit     # create .venv-mergekit first (CPU torch, mergekit)
    .venv/bin/python benchmarks/bench_apply.py --memory-depth       # everything at 4 and 16 layers: RssAnon ratio
    .venv/bin/python benchmarks/bench_apply.py --mergekit-ties      # + mergekit ties vs capmerge ties (~3 min a run)

It writes three bf16 checkpoints with identical names and shapes in HF layout (sharded safetensors + index + a minimal
llama config.json) under --work-dir: P (pretrained), S (sft) and A (aux), where S and A are P plus small noise. They
are reused on later runs (a marker json records the preset). Then, with all inputs in the page cache, it times
(median of --repeats, the cases interleaved within each repeat, outputs deleted and `sync`ed before each run):

    floor_diff     read S and A, write one model's bytes
    floor_apply    read P and the vector, write one model's bytes
    floor_merge    read P, A and S, write one model's bytes (the one-pass floor of P + alpha * (A - S))
    floor_ties3    read P and three vectors, write one model's bytes
    capmerge_diff / capmerge_apply / capmerge_diff_then_apply (their sum) / mergekit_task_arithmetic
    capmerge_ties3     apply P V1 V2 V3 --method ties --density 0.3 (V1 = S - P, V2 = A - P, V3 = A - S, bf16 vectors
                       made once with `capmerge diff`, outside any timing; kept in WORK/<size>/V)   vs floor_ties3
    capmerge_addsub    apply P --add A --sub S --alpha ALPHA (the three-checkpoint form)              vs floor_merge
    with --mergekit-ties, the same TIES merge of two models (A and S over base P, density 0.3, weights 1) by both:
    capmerge_ties2     apply P --add A --add S --method ties --density 0.3                             vs floor_merge
    mergekit_ties2     mergekit-yaml, merge_method ties, normalize true, dtype bfloat16                vs floor_merge

A floor is the faster of two plain copies per repeat (`cat`, i.e. in-kernel copy_file_range, and `dd bs=1M`), and the
fastest repeat of that (capmerge and mergekit: the median repeat). Start-up is the same command on the tiny preset;
steady = seconds - start-up. Memory is peak VmRSS and RssAnon of the whole
process tree, sampled every 20 ms from /proc/PID/status (VmRSS also takes VmHWM). Both tools run with the Hub offline.
Rows are printed and appended to benchmarks/results.csv.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import os
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results.csv"
MERGEKIT_VENV = REPO / ".venv-mergekit"
MERGEKIT_YAML = MERGEKIT_VENV / "bin" / "mergekit-yaml"
CSV_COLUMNS = [
    "date", "machine", "device", "commit", "case", "size", "seconds", "floor_seconds", "ratio", "steady_ratio",
    "startup_seconds", "peak_rss_mb", "peak_rss_anon_mb", "notes",
]  # fmt: skip
MARKER = "bench-marker.json"
MARKER_FORMAT = 1
TIES_DENSITY = 0.3
MERGEKIT_SPEC = "mergekit==0.1.5"  # as `make mergekit-venv`
# No hub look-ups from either tool: a timed-out network probe would be counted as merge time.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


@dataclass(frozen=True)
class Preset:
    hidden: int
    layers: int
    intermediate: int
    vocab: int
    heads: int
    shards: int = 2


PRESETS = {
    "0.95b": Preset(hidden=2048, layers=16, intermediate=5632, vocab=32000, heads=16),
    "tiny": Preset(hidden=64, layers=2, intermediate=128, vocab=256, heads=4),
}


# ---------------------------------------------------------------------------------------------------------- checkpoints
def llama_shapes(p: Preset) -> list[tuple[str, tuple[int, ...]]]:
    h, i = p.hidden, p.intermediate
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (p.vocab, h))]
    for n in range(p.layers):
        pre = f"model.layers.{n}."
        shapes += [(pre + "input_layernorm.weight", (h,))]
        shapes += [(f"{pre}self_attn.{x}_proj.weight", (h, h)) for x in "qkvo"]
        shapes += [(pre + "post_attention_layernorm.weight", (h,))]
        shapes += [(pre + "mlp.gate_proj.weight", (i, h)), (pre + "mlp.up_proj.weight", (i, h))]
        shapes += [(pre + "mlp.down_proj.weight", (h, i))]
    return shapes + [("model.norm.weight", (h,)), ("lm_head.weight", (p.vocab, h))]


def split_shards(shapes: list[tuple[str, tuple[int, ...]]], n: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Consecutive tensors, cut where the running byte count passes k/n of the total."""
    sizes = [torch.Size(s).numel() for _, s in shapes]
    total, done, out = sum(sizes), 0, [[] for _ in range(n)]
    for item, size in zip(shapes, sizes, strict=True):
        out[min(n - 1, done * n // total)].append(item)
        done += size
    return [s for s in out if s]


def llama_config(p: Preset) -> dict[str, object]:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": p.hidden,
        "intermediate_size": p.intermediate, "num_attention_heads": p.heads, "num_key_value_heads": p.heads,
        "num_hidden_layers": p.layers, "vocab_size": p.vocab, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
        "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 1,
        "eos_token_id": 2,
    }  # fmt: skip


def ensure_checkpoints(root: Path, preset: Preset, *, seed: int = 0, names: str = "PSA") -> dict[str, Path]:
    """Create (or reuse) root/{P,S,A}: bf16, sharded, HF layout. S and A are P plus independent uniform noise.

    ``names``: one letter per checkpoint, the first the base and the others it plus noise (bench_methods: PABC)."""
    dirs = {k: root / k for k in names}
    want = {"format": MARKER_FORMAT, "preset": asdict(preset), "seed": seed}
    if names != "PSA":
        want["names"] = names
    marker = root / MARKER
    if marker.exists() and json.loads(marker.read_text()) == want:
        settle(list(dirs.values()))
        return dirs
    print(f"generating {'/'.join(names)} in {root} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    marker.unlink(missing_ok=True)
    for d in dirs.values():
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    shards = split_shards(llama_shapes(preset), preset.shards)
    weight_map: dict[str, str] = {}
    total_size = 0
    for k, shard in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        tensors: dict[str, dict[str, torch.Tensor]] = {c: {} for c in names}
        for name, shape in shard:
            if len(shape) == 1:  # RMSNorm weights live around 1
                p = torch.empty(shape, dtype=torch.bfloat16).uniform_(0.9, 1.1, generator=gen)
            else:
                p = torch.empty(shape, dtype=torch.bfloat16).uniform_(-0.03, 0.03, generator=gen)
            tensors[names[0]][name] = p
            for c in names[1:]:
                tensors[c][name] = p + torch.empty_like(p).uniform_(-0.003, 0.003, generator=gen)
            weight_map[name] = fname
            total_size += p.numel() * p.element_size()
        for c, d in dirs.items():
            save_file(tensors[c], str(d / fname), metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    for d in dirs.values():
        (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (d / "config.json").write_text(json.dumps(llama_config(preset), indent=2) + "\n")
    marker.write_text(json.dumps(want) + "\n")
    print(f"generated {total_size / 1e9:.2f} GB x {len(names)} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    settle(list(dirs.values()))
    return dirs


def shard_files(path: Path) -> list[Path]:
    return [path] if path.is_file() else sorted(path.glob("*.safetensors"))


def nbytes(path: Path) -> int:
    return sum(f.stat().st_size for f in shard_files(path))


def read_tensor(path: Path, name: str) -> torch.Tensor:
    for f in shard_files(path):
        with safe_open(str(f), framework="pt") as sf:
            if name in sf.keys():  # noqa: SIM118 - safe_open has no __contains__
                return sf.get_tensor(name)
    raise KeyError(f"{name} not in {path}")


def check_merge(out: Path, dirs: dict[str, Path], alpha: float, names: list[str]) -> str:
    """Max |out - (P + alpha (A - S))| over a few tensors, the reference in float32 from the bf16 inputs."""
    parts = []
    for name in names:
        ref = read_tensor(dirs["P"], name).float()
        ref += alpha * (read_tensor(dirs["A"], name).float() - read_tensor(dirs["S"], name).float())
        got = read_tensor(out, name).float()
        err = (got - ref).abs().max().item()
        rounding = (ref.bfloat16().float() - ref).abs().max().item()  # what an exact result rounded to bf16 shows
        exact = (got == ref.bfloat16().float()).float().mean().item()
        parts.append(
            f"{name.removeprefix('model.')} maxerr={err:.2e} (bf16 rounding {rounding:.2e}, {exact:.1%} equal)"
        )
    return "; ".join(parts)


def read_all(paths: list[Path]) -> None:
    """Pull files into the page cache."""
    for p in paths:
        for f in shard_files(p):
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass


def settle(paths: list[Path]) -> None:
    """Drop the files' pages from the page cache and read them back (untimed, once per checkpoint set): every run
    then starts from the cache a sequential read leaves, whatever wrote the files and whatever happened since.

    How a file came into the cache sets the size of its folios (the cache's units). Read sequentially, or written
    in large pieces, it sits in folios of up to 2 MB on kernels with large folios (ext4 from Linux 6.16); written in
    small pieces, in 4 KB ones. Mapping a file, as capmerge reads its inputs, takes a page-table entry per 4 KB
    folio: about 0.13 s of CPU per GB, against 0.015 s with 2 MB folios (this VM, Linux 6.18); plain copies (the
    floor) gain less, about 0.19 -> 0.13 s per GB. The generated files were found in 4 KB folios hours
    after they were written (what split them is not known; a DAMON daemon pages out cold memory on this VM), and
    capmerge's times moved with the files' history from run to run."""
    for p in paths:
        for f in shard_files(p):
            fd = os.open(f, os.O_RDONLY)
            try:
                if hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    read_all(paths)


# ------------------------------------------------------------------------------------------------------------ measuring
@dataclass
class Run:
    seconds: float
    rc: int
    peak_rss_mb: float
    peak_anon_mb: float
    error: str = ""
    method: str = ""  # floors: which plain-copy method was the faster


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as fh:
                out += [int(c) for c in fh.read().split()]
    except OSError:
        pass
    return out


def _status_kb(pid: int) -> tuple[int, int, int]:
    """VmRSS, RssAnon and VmHWM (the exact peak VmRSS of this process image) in kB."""
    got = {"VmRSS:": 0, "RssAnon:": 0, "VmHWM:": 0}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                key = line.split(maxsplit=1)[0]
                if key in got:
                    got[key] = int(line.split()[1])
    except OSError:
        pass
    return got["VmRSS:"], got["RssAnon:"], got["VmHWM:"]


def measure(cmd: list[str], *, interval: float = 0.02, env: dict[str, str] | None = None) -> Run:
    """Wall time of cmd and the peak VmRSS / RssAnon of its process tree (summed over live processes per sample).

    VmRSS also takes each process's VmHWM, which catches a peak between samples. wait4's ru_maxrss is not used: a child
    forked from this (torch-sized) Python inherits the parent's high-water mark across exec.
    """
    peaks = [0, 0]
    hwm: dict[int, int] = {}
    done = threading.Event()

    def sample(root: int) -> None:
        while not done.is_set():
            pids, i = [root], 0
            while i < len(pids):
                pids += _children(pids[i])
                i += 1
            stats = [_status_kb(p) for p in pids]
            peaks[0] = max(peaks[0], sum(s[0] for s in stats))
            peaks[1] = max(peaks[1], sum(s[1] for s in stats))
            for p, s in zip(pids, stats, strict=True):
                hwm[p] = max(hwm.get(p, 0), s[2])
            done.wait(interval)

    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, **(env or {})})
        sampler = threading.Thread(target=sample, args=(proc.pid,), daemon=True)
        sampler.start()
        rc = proc.wait()
        seconds = time.perf_counter() - t0
        done.set()
        sampler.join()
        err.seek(0)
        tail = [line for line in err.read().decode(errors="replace").splitlines() if line.strip(" ^~")]
    rss_kb = max(peaks[0], max(hwm.values(), default=0))
    error = "" if rc == 0 else f"rc={rc}: {tail[-1][:300] if tail else ''}"
    return Run(seconds, rc, rss_kb / 1024, peaks[1] / 1024, error)


FLOOR_METHODS = ("cat", "dd", "direct")
DIRECT_COPY = Path(__file__).resolve().parent / "direct_copy.py"


def floor_cmd(method: str, copy: Path, also_read: list[Path], out: Path) -> list[str]:
    """copy's bytes to out and also_read's to /dev/null, with plain file copies.

    ``cat`` copies file to file in the kernel (copy_file_range: a page-cache copy on ext4, but a reflink on btrfs/XFS,
    which is why it is not used there); ``dd bs=1M`` is read + write through a small user buffer; ``direct``
    (direct_copy.py) writes with O_DIRECT, as capmerge writes its output.
    """
    q = shlex.quote
    if method == "cat":
        write = f"cat {' '.join(q(str(f)) for f in shard_files(copy))} > {q(str(out))}"
    elif method == "direct":
        files = " ".join(q(str(f)) for f in shard_files(copy))
        write = f"{q(sys.executable)} {q(str(DIRECT_COPY))} {q(str(out))} {files}"
    else:
        write = f"{{ {'; '.join(f'dd if={q(str(f))} bs=1M status=none' for f in shard_files(copy))}; }} > {q(str(out))}"
    reads = " ".join(q(str(f)) for p in also_read for f in shard_files(p))
    return ["bash", "-c", f"{write} && cat {reads} > /dev/null"]


def measure_floor(copy: Path, also_read: list[Path], out: Path) -> Run:
    """The fastest of the plain-copy methods: on this VM any can be 2-4x slower on a given try."""
    runs = []
    for method in floor_methods(out.parent):
        clean(out)
        run = measure(floor_cmd(method, copy, also_read, out))
        run.method = method
        runs.append(run)
    clean(out)
    return min(runs, key=lambda r: (r.rc != 0, r.seconds))


@functools.cache
def floor_methods(where: Path) -> tuple[str, ...]:
    fs = subprocess.run(["stat", "-f", "-c", "%T", str(where)], capture_output=True, text=True).stdout.strip()
    return ("dd", "direct") if fs in {"btrfs", "xfs", "zfs", "bcachefs", "nfs"} else FLOOR_METHODS


def clean(*paths: Path) -> None:
    for p in paths:
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    os.sync()  # no write-back of an earlier run's output during the next timed run


@dataclass
class Case:
    name: str
    runs: list[Run] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.runs) and all(r.rc == 0 for r in self.runs)

    @property
    def seconds(self) -> float | None:
        """The median run; for this script's floors (cases ``floor_*``) the fastest (copies on this VM vary 2-4x between
        runs: a median floor would flatter every ratio). bench_methods' floors (``METHOD_floor``) take the median of
        their repeats, each already the fastest of the copy methods (measure_floor), as its other times do."""
        stat = min if self.name.startswith("floor") else statistics.median
        return stat(r.seconds for r in self.runs) if self.ok else None

    def peak(self, attr: str) -> float | None:
        return max(getattr(r, attr) for r in self.runs) if self.runs else None

    def error(self) -> str:
        errs = [r.error for r in self.runs if r.error]
        return f"failed {errs[0]}" if errs else ("not run" if not self.runs else "")


def capmerge_bin(override: str | None = None) -> str | None:
    local = REPO / ".venv" / "bin" / "capmerge"
    return override or (str(local) if local.exists() else shutil.which("capmerge"))


def human(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def mergekit_flags() -> list[str]:
    help_text = subprocess.run([str(MERGEKIT_YAML), "--help"], capture_output=True, text=True).stdout
    wanted = ["--no-copy-tokenizer", "--no-write-model-card", "--quiet", "--no-cuda"]
    return [f for f in wanted if f in help_text]


def ensure_vectors(dirs: dict[str, Path], cli: str) -> list[Path]:
    """V1 = S - P, V2 = A - P, V3 = A - S (bf16, one file each), made once per checkpoint set, never timed."""
    root = dirs["P"].parent
    paths = [root / "V" / f"V{i}.safetensors" for i in (1, 2, 3)]
    made = (root / MARKER).stat().st_mtime
    if all(p.exists() and p.stat().st_mtime > made for p in paths):
        return paths
    paths[0].parent.mkdir(exist_ok=True)
    for path, (b, a) in zip(paths, [("P", "S"), ("P", "A"), ("S", "A")], strict=True):
        cmd = [cli, "diff", str(dirs[b]), str(dirs[a]), "-o", str(path), "--quiet", "--force"]
        subprocess.run(cmd, check=True, env={**os.environ, **OFFLINE_ENV})
    return paths


def check_ties(out: Path, base: Path, taus: list[tuple[Path, Path | None]], names: list[str], density: float) -> str:
    """out vs capmerge.functional's TIES (magnitude prune, total sign, normalize; float32, rounded once) of taus.

    A tau is a vector file (b is None) or a checkpoint pair a - b.
    """
    from capmerge import functional as F  # the benchmark otherwise only runs capmerge as a process

    parts = []
    for name in names:
        terms = []
        for a, b in taus:
            t = read_tensor(a, name).float() - (read_tensor(b, name).float() if b is not None else 0.0)
            terms.append(F.magnitude_prune(t, density))
        ref = F.merge(read_tensor(base, name), terms, sign="total", normalize=True)
        got = read_tensor(out, name)
        exact = (got == ref).float().mean().item()
        err = (got.float() - ref.float()).abs().max().item()
        parts.append(f"{name.removeprefix('model.')} {exact:.2%} equal, maxerr {err:.2e}")
    return "; ".join(parts)


def compare_outputs(x: Path, y: Path, names: list[str]) -> str:
    parts = []
    for name in names:
        a, b = read_tensor(x, name), read_tensor(y, name)
        exact = (a == b).float().mean().item()
        parts.append(
            f"{name.removeprefix('model.')} {exact:.2%} equal, maxdiff {(a.float() - b.float()).abs().max():.2e}"
        )
    return "; ".join(parts)


def run_merge_cases(
    cases: dict[str, Case], dirs: dict[str, Path], out_root: Path, *, alpha: float, cli: str | None,
    mergekit_ties: bool, last: bool,
) -> None:  # fmt: skip
    """One repeat of the multi-vector cases. Inputs are re-read into the page cache first (untimed): mergekit's
    multi-GB RSS next to ~17 GB of checkpoints, vectors and outputs may have evicted some of them. Each output is
    checked on the last repeat, then deleted."""
    names = tensor_names(dirs["P"])
    check = [next(n for n in names if n.endswith("q_proj.weight")), names[1], names[-2]]
    floor_out, out, out2 = (out_root / n for n in ("floor.bin", "merged-capmerge", "merged-mergekit"))
    if cli is None:
        for name in ("capmerge_ties3", "capmerge_addsub"):
            cases[name].runs.append(Run(0, 127, 0, 0, "capmerge CLI not found"))
        return
    vecs = ensure_vectors(dirs, cli)
    read_all([dirs["P"], *vecs])
    cases["floor_ties3"].runs.append(measure_floor(dirs["P"], vecs, floor_out))
    clean(out)
    cmd = [cli, "apply", str(dirs["P"]), *map(str, vecs), "--method", "ties", "--density", str(TIES_DENSITY)]
    cases["capmerge_ties3"].runs.append(measure([*cmd, "-o", str(out), "--quiet", "--force"], env=OFFLINE_ENV))
    if last and cases["capmerge_ties3"].ok:
        taus = [(v, None) for v in vecs]
        cases["capmerge_ties3"].notes.append("vs functional: " + check_ties(out, dirs["P"], taus, check, TIES_DENSITY))
    clean(out)
    read_all([dirs["P"], dirs["A"], dirs["S"]])
    cmd = [cli, "apply", str(dirs["P"]), "--add", str(dirs["A"]), "--sub", str(dirs["S"]), "--alpha", str(alpha)]
    cases["capmerge_addsub"].runs.append(measure([*cmd, "-o", str(out), "--quiet", "--force"], env=OFFLINE_ENV))
    if last and cases["capmerge_addsub"].ok:
        cases["capmerge_addsub"].notes.append("vs P+a(A-S): " + check_merge(out, dirs, alpha, check))
    clean(out)
    if not mergekit_ties:
        return
    cmd = [cli, "apply", str(dirs["P"]), "--add", str(dirs["A"]), "--add", str(dirs["S"]), "--method", "ties"]
    cases["capmerge_ties2"].runs.append(
        measure([*cmd, "--density", str(TIES_DENSITY), "-o", str(out), "--quiet", "--force"], env=OFFLINE_ENV)
    )
    config = out_root / "mergekit-ties.yml"
    config.write_text(
        f"merge_method: ties\nbase_model: {json.dumps(str(dirs['P']))}\nmodels:\n"
        + "".join(f"  - model: {json.dumps(str(dirs[m]))}\n    parameters: {{weight: 1.0, density: {TIES_DENSITY}}}\n"
                  for m in "AS")
        + "parameters: {normalize: true}\ndtype: bfloat16\n"
    )  # fmt: skip
    read_all([dirs["P"], dirs["A"], dirs["S"]])
    clean(out2)
    cases["mergekit_ties2"].runs.append(
        measure([str(MERGEKIT_YAML), str(config), str(out2), *mergekit_flags()], env=OFFLINE_ENV)
    )
    taus = [(dirs["A"], dirs["P"]), (dirs["S"], dirs["P"])]
    for name, path in (("capmerge_ties2", out), ("mergekit_ties2", out2)):
        if last and cases[name].ok:
            cases[name].notes.append("vs functional: " + check_ties(path, dirs["P"], taus, check, TIES_DENSITY))
    if last and cases["capmerge_ties2"].ok and cases["mergekit_ties2"].ok:
        cases["mergekit_ties2"].notes.append("vs capmerge_ties2: " + compare_outputs(out2, out, check))
    clean(out, out2)


def run_suite(
    dirs: dict[str, Path], out_root: Path, *, alpha: float, repeats: int, mergekit: bool, cli: str | None,
    mergekit_ties: bool = False,
) -> dict[str, Case]:  # fmt: skip
    """Every case, interleaved per repeat so that drift hits all of them alike."""
    out_root.mkdir(parents=True, exist_ok=True)
    vec, applied, merged, floor_out = (out_root / n for n in ("vector.safetensors", "applied", "mergekit", "floor.bin"))
    clean(vec, applied, merged, floor_out)
    read_all(list(dirs.values()))
    cases = {n: Case(n) for n in ("floor_diff", "floor_apply", "floor_merge", "capmerge_diff", "capmerge_apply")}
    cases.update({n: Case(n) for n in ("floor_ties3", "capmerge_ties3", "capmerge_addsub")})
    mergekit_ties = mergekit and mergekit_ties
    if mergekit_ties:
        cases.update({n: Case(n) for n in ("capmerge_ties2", "mergekit_ties2")})
    if mergekit:
        cases["mergekit_task_arithmetic"] = Case("mergekit_task_arithmetic")
        config = out_root / "mergekit.yml"
        models = [(dirs["A"], alpha), (dirs["S"], -alpha)]
        config.write_text(
            "merge_method: task_arithmetic\n"
            f"base_model: {json.dumps(str(dirs['P']))}\n"
            "models:\n"
            + "".join(f"  - model: {json.dumps(str(m))}\n    parameters: {{weight: {w!r}}}\n" for m, w in models)
            + "parameters: {normalize: false}\ndtype: bfloat16\n"
        )
        mk_cmd = [str(MERGEKIT_YAML), str(config), str(merged), *mergekit_flags()]
    for r in range(repeats):
        print(f"  repeat {r + 1}/{repeats}", file=sys.stderr, flush=True)
        # inputs back into the page cache before each floor + case pair (untimed): outputs and mergekit's RSS evict
        read_all([dirs["S"], dirs["A"]])
        cases["floor_diff"].runs.append(measure_floor(dirs["S"], [dirs["A"]], floor_out))
        clean(vec)
        if cli is None:
            cases["capmerge_diff"].runs.append(Run(0, 127, 0, 0, "capmerge CLI not found"))
        else:
            cmd = [cli, "diff", str(dirs["S"]), str(dirs["A"]), "-o", str(vec), "--quiet", "--force"]
            cases["capmerge_diff"].runs.append(measure(cmd, env=OFFLINE_ENV))
        vec_in = vec if vec.exists() and cases["capmerge_diff"].runs[-1].rc == 0 else dirs["A"]
        read_all([dirs["P"], vec_in])
        cases["floor_apply"].runs.append(measure_floor(dirs["P"], [vec_in], floor_out))
        clean(applied)
        if vec_in == vec:
            cmd = [cli or "capmerge", "apply", str(dirs["P"]), str(vec), "-o", str(applied)]
            cmd += ["--alpha", str(alpha), "--quiet", "--force"]
            cases["capmerge_apply"].runs.append(measure(cmd, env=OFFLINE_ENV))
        else:
            cases["capmerge_apply"].runs.append(Run(0, 1, 0, 0, "no vector: capmerge diff failed"))
        read_all([dirs["P"], dirs["A"], dirs["S"]])
        cases["floor_merge"].runs.append(measure_floor(dirs["P"], [dirs["A"], dirs["S"]], floor_out))
        if mergekit:
            clean(merged)
            cases["mergekit_task_arithmetic"].runs.append(measure(mk_cmd, env=OFFLINE_ENV))
        if r < repeats - 1:
            clean(vec, applied, merged)
        run_merge_cases(cases, dirs, out_root, alpha=alpha, cli=cli, mergekit_ties=mergekit_ties, last=r == repeats - 1)
    cases["capmerge_diff_then_apply"] = Case("capmerge_diff_then_apply", [
        Run(d.seconds + a.seconds, d.rc or a.rc, max(d.peak_rss_mb, a.peak_rss_mb), max(d.peak_anon_mb, a.peak_anon_mb),
            d.error or a.error)
        for d, a in zip(cases["capmerge_diff"].runs, cases["capmerge_apply"].runs, strict=True)
    ])  # fmt: skip
    for name in ("floor_diff", "floor_apply", "floor_merge", "floor_ties3"):
        won = [r.method for r in cases[name].runs]
        cases[name].notes.append(
            "faster copy: " + ", ".join(f"{m} {won.count(m)}/{len(won)}" for m in sorted(set(won)))
        )
    names = tensor_names(dirs["P"])
    check = [names[0], next(n for n in names if n.endswith("down_proj.weight")), names[-2]]
    if cases["capmerge_apply"].ok:
        cases["capmerge_apply"].notes.append("vs P+a(A-S): " + check_merge(applied, dirs, alpha, check))
    if mergekit and cases["mergekit_task_arithmetic"].ok:
        cases["mergekit_task_arithmetic"].notes.append("vs P+a(A-S): " + check_merge(merged, dirs, alpha, check))
    if vec.exists() and abs(nbytes(vec) - nbytes(dirs["S"])) > max(0.01 * nbytes(dirs["S"]), 1e6):  # a float32 vector?
        cases["capmerge_diff"].notes.append(
            f"vector {human(nbytes(vec))} but floor_diff writes {human(nbytes(dirs['S']))}"
        )
    return cases


def tensor_names(ckpt: Path) -> list[str]:
    return list(json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"])


# ------------------------------------------------------------------------------------------------------------ reporting
FLOOR_OF = {
    "floor_diff": "floor_diff", "floor_apply": "floor_apply", "floor_merge": "floor_merge",
    "capmerge_diff": "floor_diff", "capmerge_apply": "floor_apply", "capmerge_diff_then_apply": "floor_merge",
    "mergekit_task_arithmetic": "floor_merge",
    "floor_ties3": "floor_ties3", "capmerge_ties3": "floor_ties3", "capmerge_addsub": "floor_merge",
    "capmerge_ties2": "floor_merge", "mergekit_ties2": "floor_merge",
}  # fmt: skip


def make_rows(cases: dict[str, Case], startup: dict[str, Case] | None, size: str) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for name, floor_name in FLOOR_OF.items():
        if name not in cases:
            continue
        case, floor = cases[name], cases[floor_name].seconds
        sec = case.seconds
        start = startup[name].seconds if startup and name in startup and not name.startswith("floor") else None
        notes = list(case.notes)
        if case.ok and len(case.runs) > 1:  # this VM's page-cache writes are noisy: show the spread
            notes.insert(0, "runs " + "/".join(f"{r.seconds:.2f}" for r in case.runs) + " s")
        if name == "capmerge_diff_then_apply" and cases["floor_diff"].ok and cases["floor_apply"].ok:
            notes.append(f"floor = one-pass merge; two-step floor {floor_diff_apply(cases):.2f}s")
        if not case.ok:
            notes.insert(0, case.error())
        rows.append(
            {
                "case": name,
                "size": size,
                "seconds": sec,
                "floor_seconds": floor,
                "ratio": sec / floor if sec is not None and floor else None,
                "steady_ratio": (sec - start) / floor if sec is not None and start is not None and floor else None,
                "startup_seconds": start,
                "peak_rss_mb": case.peak("peak_rss_mb") if case.ok else None,
                "peak_rss_anon_mb": case.peak("peak_anon_mb") if case.ok else None,
                "notes": "; ".join(notes),
            }
        )
    return rows


def floor_diff_apply(cases: dict[str, Case]) -> float:
    return (cases["floor_diff"].seconds or 0.0) + (cases["floor_apply"].seconds or 0.0)


def fmt(v: object, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec) if isinstance(v, float) else str(v)


def print_table(rows: list[dict[str, object]]) -> None:
    head = ["case", "size", "seconds", "floor s", "total/floor", "steady/floor", "start-up s", "RSS MB", "RssAnon MB"]
    keys = ["case", "size", "seconds", "floor_seconds", "ratio", "steady_ratio", "startup_seconds"]
    body = [[fmt(r[k]) for k in keys] + [fmt(r["peak_rss_mb"], ".0f"), fmt(r["peak_rss_anon_mb"], ".0f")] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]
    for line in [head, ["-" * w for w in widths], *body]:
        print("  ".join(x.ljust(w) if i < 2 else x.rjust(w) for i, (x, w) in enumerate(zip(line, widths, strict=True))))
    for r in rows:
        if r["notes"]:
            print(f"  {r['case']} [{r['size']}]: {r['notes']}")


def git_commit() -> str:
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout.strip()

    sha = git("rev-parse", "--short", "HEAD") or "none"
    return sha + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def machine() -> str:
    """The host, its cores, its CPU and the widest vector instructions of those the native loops use (AVX-512 or
    AVX2): rows from different VMs compare only within one machine."""
    cpu, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = (x.strip() for x in line.partition(":"))
            if key == "model name" and not cpu:
                cpu = value
            elif key == "flags" and not flags:
                flags = set(value.split())
    except OSError:  # not Linux
        pass
    isa = "AVX-512" if {"avx512f", "avx512bw", "avx512vl"} <= flags else "AVX2" if "avx2" in flags else ""
    cap = os.environ.get("CAPMERGE_NATIVE_CPU")  # the native loops capped below what the CPU has
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    parts = (f"{cores} cores", cpu, isa, f"CAPMERGE_NATIVE_CPU={cap}" if cap else "")
    return f"{socket.gethostname()} ({', '.join(x for x in parts if x)})"


def append_csv(rows: list[dict[str, object]], path: Path = RESULTS) -> None:
    common = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine(),
        "device": "cpu",
        "commit": git_commit(),
    }
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({**common, **{k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()}})


# ----------------------------------------------------------------------------------------------------------------- main
def setup_mergekit() -> None:
    """A separate venv: mergekit is LGPL and only ever run as a peer process, never imported here."""
    if MERGEKIT_YAML.exists():
        print(f"mergekit already in {MERGEKIT_VENV}", file=sys.stderr)
        return
    subprocess.run([shutil.which("python3") or sys.executable, "-m", "venv", str(MERGEKIT_VENV)], check=True)
    pip = [str(MERGEKIT_VENV / "bin" / "python"), "-m", "pip", "install", "-q"]
    # torch first, pinned to ours: a plain `torch` requirement would pull the multi-GB CUDA build.
    subprocess.run([*pip, f"torch=={torch.__version__.split('+')[0]}"], check=True)
    subprocess.run([*pip, MERGEKIT_SPEC], check=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size", choices=sorted(PRESETS), default="0.95b", help="checkpoint preset (default 0.95b)")
    ap.add_argument("--layers", type=int, help="override the preset's number of layers")
    ap.add_argument("--repeats", type=int, default=3, help="runs per case; the median is reported (default 3)")
    ap.add_argument("--work-dir", type=Path, default=REPO / "benchmarks" / "work", help="checkpoints and outputs")
    ap.add_argument("--alpha", type=float, default=0.5, help="apply scale: P + alpha * (A - S) (default 0.5)")
    ap.add_argument("--no-mergekit", action="store_true", help="skip mergekit even when .venv-mergekit exists")
    ap.add_argument("--setup-mergekit", action="store_true", help="create .venv-mergekit (CPU torch + mergekit)")
    ap.add_argument("--mergekit-ties", action="store_true", help="also mergekit ties vs capmerge ties (slow: minutes)")
    ap.add_argument("--memory-depth", action="store_true", help="run at 4 layers and at --layers (default: preset's)")
    ap.add_argument("--keep", action="store_true", help="keep the outputs of the last repeat")
    ap.add_argument("--capmerge", help="capmerge executable (default: .venv/bin/capmerge, else the one on PATH)")
    ap.add_argument("--no-csv", action="store_true", help="print only; do not append to results.csv")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    if args.setup_mergekit:
        setup_mergekit()
    use_mergekit = not args.no_mergekit and MERGEKIT_YAML.exists()
    if not use_mergekit and not args.no_mergekit:
        print("mergekit not installed (run with --setup-mergekit): skipped", file=sys.stderr)
    base = PRESETS[args.size]
    depths = [args.layers or base.layers]
    if args.memory_depth:
        depths = sorted({4, depths[0]}) if depths[0] != 4 else [4, PRESETS["0.95b"].layers]
    work: Path = args.work_dir.resolve()
    cli = capmerge_bin(args.capmerge)
    suite = functools.partial(run_suite, alpha=args.alpha, repeats=args.repeats, mergekit=use_mergekit, cli=cli,
                              mergekit_ties=args.mergekit_ties)  # fmt: skip

    tiny = PRESETS["tiny"]
    print("start-up (tiny preset)", file=sys.stderr)
    tiny_root = work / f"tiny-L{tiny.layers}"
    startup = suite(ensure_checkpoints(tiny_root, tiny), tiny_root / "out")
    by_depth: dict[int, list[dict[str, object]]] = {}
    for layers in depths:
        preset = Preset(**{**asdict(base), "layers": layers})
        label = args.size if layers == base.layers else f"{args.size}-L{layers}"
        root = work / f"{args.size}-L{layers}"
        if preset == tiny:
            cases = startup
        else:
            print(label, file=sys.stderr)
            cases = suite(ensure_checkpoints(root, preset), root / "out")
        for name in ("floor_diff", "floor_apply", "floor_merge", "floor_ties3"):
            cases[name].notes.append(f"{human(nbytes(root / 'P'))} per checkpoint")
        by_depth[layers] = make_rows(cases, startup, label)
        if not args.keep:
            clean(root / "out")
    if len(depths) == 2:  # --memory-depth: does anonymous memory grow with depth (it should not when streaming)?
        lo, hi = (by_depth[d] for d in depths)
        for r_lo, r_hi in zip(lo, hi, strict=True):
            a, b = r_lo["peak_rss_anon_mb"], r_hi["peak_rss_anon_mb"]
            if isinstance(a, float) and isinstance(b, float) and a > 0:
                ratio = f"RssAnon L{depths[1]}/L{depths[0]} = {b / a:.2f}x"
                r_hi["notes"] = "; ".join(x for x in (str(r_hi["notes"]), ratio) if x)
    rows = [r for d in depths for r in by_depth[d]]
    if not args.keep:
        clean(tiny_root / "out")
    print_table(rows)
    if not args.no_csv:
        append_csv(rows)
        print(f"appended {len(rows)} rows to {RESULTS.relative_to(REPO)}")
    print(f"total wall time {time.perf_counter() - t_start:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
