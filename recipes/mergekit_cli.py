"""mergekit-yaml's (and mergekit-multi's) command-line options on ``capmerge run CONFIG.yml OUT``, so that a
mergekit command runs as typed.

``mergekit-yaml config.yml merged/ --cuda --copy-tokenizer --out-shard-size 1B --lazy-unpickle`` becomes
``capmerge run config.yml merged/ --cuda --copy-tokenizer --out-shard-size 1B --lazy-unpickle``. Each option of
mergekit 0.1.5 either does what it does in mergekit (:data:`_SET`), changes nothing here and says so in one
``note:`` line (:data:`NO_EFFECT`: capmerge streams, runs on the CPU threads and writes safetensors anyway), or is
refused with one ``error:`` line (:data:`REFUSED`: it would change the output in a way capmerge does not do).
docs/mergekit.md has the table.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from capmerge.errors import UsageError

_GPU = "capmerge merges models on the CPU (docs/benchmarks.md: its times against mergekit's)"
NO_EFFECT = {  # option -> why it changes nothing here
    "cuda": _GPU,
    "device": _GPU,
    "gpu-rich": _GPU,
    "read-to-gpu": _GPU,
    "multi-gpu": _GPU,
    "low-cpu-memory": "capmerge keeps nothing but fixed buffers in memory",
    "lazy-unpickle": "capmerge reads every input tensor by tensor (pickles through torch.load(mmap=True))",
    "async-write": "capmerge always writes on its own thread while it computes",
    "write-threads": "capmerge always writes on its own thread while it computes",
    "clone-tensors": "capmerge writes each output tensor from its own buffer",
    "allow-crimes": "capmerge merges any models whose tensors match by name and shape",
    "trust-remote-code": "capmerge never runs a model's code",
    "lora-merge-cache": "capmerge applies LoRA adapters while it reads, without a merged copy on disk",
    "lora-merge-dtype": "capmerge applies LoRA adapters in float32",
    "safe-serialization": "",  # the default: capmerge writes safetensors
}
REFUSED = {
    "no-safe-serialization": "--no-safe-serialization is not supported: capmerge writes safetensors only",
    "unsafe-truncate-embeddings": "--unsafe-truncate-embeddings is not supported: give the models the same "
    "vocabulary size (or use tokenizer_source with models whose vocabularies match)",
}
_VALUED = {"random-seed", "out-shard-size", "num-threads", "transformers-cache", "device", "write-threads",
           "lora-merge-cache", "lora-merge-dtype", "intermediate-dir", "out-path"}  # fmt: skip
_FLAGS = {"copy-tokenizer", "write-model-card", "quiet", "cuda", "gpu-rich", "read-to-gpu", "multi-gpu",
          "low-cpu-memory", "lazy-unpickle", "async-write", "clone-tensors", "allow-crimes", "trust-remote-code",
          "safe-serialization", "unsafe-truncate-embeddings", "lazy"}  # fmt: skip
_UNITS = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9}


@dataclass
class CommandOptions:
    """What mergekit-yaml options given after ``capmerge run CONFIG`` ask for (None / True: the default)."""

    seed: int | None = None
    shard_bytes: int = 5 * 10**9
    copy_tokenizer: bool = True
    model_card: bool = True
    quiet: bool = False
    threads: int | None = None
    hub_cache: str | None = None
    intermediate_dir: str | None = None
    out_path: str | None = None
    lazy: bool = True
    notes: list[str] = field(default_factory=list)


def parse_shard_size(text: str) -> int:
    """mergekit's ``--out-shard-size``: ``1B`` = 10⁹, ``500M``, ``5K`` or a plain number; mergekit's writer compares
    it with each file's bytes (its help says parameters). 0: no limit (mergekit writes one file)."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMB]?)\s*", text, flags=re.IGNORECASE)
    n = int(m.group(1)) * _UNITS[m.group(2).upper()] if m else -1
    if n < 0 or n >= 2**62:
        raise UsageError(f"--out-shard-size: invalid size {text!r} (e.g. 5B, 500M, 5K: bytes per weight file)")
    return n if n else 2**62


def _int(name: str, text: str, *, least: int) -> int:
    try:
        n = int(text)
    except ValueError:
        n = least - 1
    if n < least:
        raise UsageError(f"--{name}: expected an integer of at least {least}, got {text!r}")
    return n


def _flag(value: str) -> bool:
    return value == "true"


_SET: dict[str, tuple[str, Callable[[str], Any]]] = {  # the options that take effect: -> (attribute, its value)
    "random-seed": ("seed", lambda v: _int("random-seed", v, least=0)),  # DARE's and DELLA's masks
    "out-shard-size": ("shard_bytes", parse_shard_size),
    "num-threads": ("threads", lambda v: _int("num-threads", v, least=1)),  # as CAPMERGE_THREADS
    "transformers-cache": ("hub_cache", str),  # as HF_HUB_CACHE
    "intermediate-dir": ("intermediate_dir", str),  # mergekit-multi's
    "out-path": ("out_path", str),  # mergekit-multi's
    "lazy": ("lazy", _flag),  # mergekit-multi's
    "copy-tokenizer": ("copy_tokenizer", _flag),
    "write-model-card": ("model_card", _flag),
    "quiet": ("quiet", _flag),
}


def split_options(args: list[str]) -> tuple[list[str], CommandOptions]:
    """Split mergekit-yaml's options off ``args`` (the words after ``capmerge run CONFIG``): returns the other
    words, in order, and the options. An option that is neither mergekit's nor capmerge's is one UsageError."""
    rest: list[str] = []
    opts = CommandOptions()
    i = 0
    while i < len(args):
        word = args[i]
        i += 1
        if not word.startswith("-") or word == "-":
            rest.append(word)
            continue
        if re.fullmatch(r"-v+", word) or word == "--verbose":
            continue
        if word in ("-j", "-I"):
            word = "--num-threads" if word == "-j" else "--intermediate-dir"
        name, eq, value = word[2:].partition("=") if word.startswith("--") else ("", "", "")
        negated = name.startswith("no-") and name[3:] in _FLAGS
        if name in REFUSED:
            raise UsageError(REFUSED[name])
        if name in _VALUED:
            if not eq:
                if i >= len(args):
                    raise UsageError(f"--{name} needs a value")
                value, i = args[i], i + 1
        elif (name in _FLAGS or negated) and not eq:
            value = "false" if negated else "true"
            name = name[3:] if negated else name
        else:
            known = ", ".join(f"--{n}" for n in sorted(_VALUED | _FLAGS))
            raise UsageError(f"no such option: {word} (a mergekit configuration also takes mergekit-yaml's: {known})")
        if name in _SET:
            attr, parse = _SET[name]
            setattr(opts, attr, parse(value))
        elif value != "false" and NO_EFFECT.get(name):
            note = f"--{name} changes nothing here: {NO_EFFECT[name]}"
            if note not in opts.notes:
                opts.notes.append(note)
    return rest, opts
