"""mergekit-yaml's (and mergekit-multi's) command-line options on ``capmerge run CONFIG.yml OUT``, so that a
mergekit command runs as typed.

``mergekit-yaml config.yml merged/ --cuda --copy-tokenizer --out-shard-size 1B --lazy-unpickle`` becomes
``capmerge run config.yml merged/ --cuda --copy-tokenizer --out-shard-size 1B --lazy-unpickle``. Each option of
mergekit 0.1.5 either does what it does in mergekit (:data:`EFFECTIVE`), changes nothing here and says so in one
``note:`` line (:data:`NO_EFFECT`: capmerge streams, runs on the CPU threads and writes safetensors anyway), or is
refused with one ``error:`` line (:data:`REFUSED`: it would change the output in a way capmerge does not do).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from capmerge.errors import UsageError

EFFECTIVE = {
    "--random-seed N": "the seed of the random methods (DARE, DELLA: counter-based masks of seed and tensor name)",
    "--out-shard-size SIZE": "the largest weight file: 1B = 10⁹ bytes, 500M, 5K or a number; 0: one file (default 5B). "
    "mergekit's help says parameters, but its writer counts bytes: so does capmerge",
    "--copy-tokenizer / --no-copy-tokenizer": "copy the base's (else the first model's) tokenizer when the "
    "configuration has no tokenizer_source (default: copy)",
    "--write-model-card / --no-write-model-card": "write README.md (default: write)",
    "--quiet / --no-quiet, -v": "no progress on stderr / the default (-v adds nothing)",
    "-j N, --num-threads N": "compute threads (as CAPMERGE_THREADS)",
    "--transformers-cache DIR": "the Hugging Face Hub cache the models are fetched into (HF_HUB_CACHE)",
    "-I DIR, --intermediate-dir DIR": "mergekit-multi's: where each merge with a name is written (DIR/NAME)",
    "--out-path DIR": "mergekit-multi's: the output of the merge without a name (as -o)",
    "--lazy / --no-lazy": "mergekit-multi's: keep a named merge whose directory holds a model already (default)",
}
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
        if re.fullmatch(r"-v+", word) or word in ("--verbose", "--no-quiet"):
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
        if name == "random-seed":
            opts.seed = _int(name, value, least=0)
        elif name == "out-shard-size":
            opts.shard_bytes = parse_shard_size(value)
        elif name == "num-threads":
            opts.threads = _int(name, value, least=1)
        elif name == "transformers-cache":
            opts.hub_cache = value
        elif name == "intermediate-dir":
            opts.intermediate_dir = value
        elif name == "out-path":
            opts.out_path = value
        elif name == "lazy":
            opts.lazy = value == "true"
        elif name == "copy-tokenizer":
            opts.copy_tokenizer = value == "true"
        elif name == "write-model-card":
            opts.model_card = value == "true"
        elif name == "quiet":
            opts.quiet = value == "true"
        elif value != "false" and NO_EFFECT.get(name):
            note = f"--{name} changes nothing here: {NO_EFFECT[name]}"
            if note not in opts.notes:
                opts.notes.append(note)
    return rest, opts
