"""The files beside the weights of a merged model, laid out as mergekit lays them out.

* ``config.json``: the base model's (else the first model's), with ``num_hidden_layers`` set to the output's layer
  count when slices change the depth, the dtype set when ``out_dtype`` is given, and ``tie_word_embeddings`` false
  when a head that config ties is written;
* the tokenizer files of ``tokenizer_source`` (``base``, or a model; ``union``: the base's, else the first model's,
  with the tokens the other models add appended, :mod:`~capmerge.merge.vocabulary`), by default the base's (else
  the first model's), and
  ``generation_config.json``; ``chat_template`` as text, a name (:mod:`~capmerge.merge.chat_templates`) or
  ``auto`` (the models' most common one);
* a sentence-transformers model's ``modules.json``, its module folders (``1_Pooling``, ...) and its two configs,
  from the base (else the first model), so that it loads with its pooling and normalisation;
* ``README.md``: a model card that includes the configuration, ``mergekit_config.yml`` (the configuration as
  written), and ``capmerge.json`` (what was merged, with fingerprints).

:func:`check` runs before any tensor is read (a bad ``tokenizer_source`` or ``chat_template`` writes nothing).
Everything here works on the :class:`~capmerge.merge.modelmerge.Planned` merge it is given (typed loosely: this
module sits below it).
"""

from __future__ import annotations

import collections
import json
import os
from pathlib import Path
from typing import Any

from capmerge.errors import UsageError
from capmerge.io.checkpoint import read_json_file
from capmerge.merge import chat_templates, vocabulary

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "vocab.txt", "spiece.model", "sentencepiece.bpe.model", "chat_template.jinja",
    "chat_template.json",
)  # fmt: skip
LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
ST_FILES = ("modules.json", "config_sentence_transformers.json", "sentence_bert_config.json")


def st_module_files(root: Path | None) -> dict[str, list[str]]:
    """A sentence-transformers model's module folders (the paths of modules.json other than the model's own
    directory) → their files, relative to ``root``; empty where there is no modules.json."""
    try:
        mods = read_json_file(root / "modules.json", "modules.json") if root is not None else None
    except (OSError, ValueError):
        return {}
    found: dict[str, list[str]] = {}
    for m in mods if isinstance(mods, list) else []:
        d = m.get("path") if isinstance(m, dict) else None
        if not isinstance(d, str) or not d or Path(d).is_absolute() or ".." in Path(d).parts:
            continue
        files = sorted(f for f in (root / d).rglob("*") if not any(x.startswith(".") for x in f.parts[-1:]))
        found[d] = [f.relative_to(root).as_posix() for f in files if f.is_file()]
    return found


def _root(p: Any, ref: str) -> Path | None:
    i = p.index.get(ref)
    root = p.inputs[i].ck.root if i is not None else None
    return Path(root) if root else None


def _models(p: Any) -> list[str]:
    spec = p.spec
    return [s.model for s in spec.models] or [s.model for sl in spec.slices for s in sl.sources]


def donor(p: Any) -> str:
    """The model whose config (and, by default, tokenizer) the output takes: the base, else the first model."""
    return p.spec.base if p.spec.base is not None else _models(p)[0]


def _where(p: Any, key: str) -> str | None:
    return p.spec.where.get(key)


def tokenizer_root(p: Any) -> Path | None:
    """The directory whose tokenizer files are copied (None: nothing to copy)."""
    src = p.spec.tokenizer_source
    if src is None:
        return _root(p, donor(p)) if getattr(p.spec, "copy_tokenizer", True) else None
    if src == "union":  # the donor's files (the tokens the others add are appended to them: vocabulary.py)
        return _root(p, donor(p))
    if src == "base":
        if p.spec.base is None:
            raise UsageError("tokenizer_source: base needs a base_model", _where(p, "tokenizer_source"))
        return _root(p, p.spec.base)
    if src in p.index:
        return _root(p, src)
    if os.path.isdir(src):
        return Path(src)
    raise UsageError(f"tokenizer_source {src!r} is neither base nor one of the models", _where(p, "tokenizer_source"))


def _tokenizer_json(root: Path | None) -> dict[str, Any] | None:
    """The parsed ``tokenizer.json`` of ``root`` (None when there is none, or it cannot be read)."""
    if root is None or not (root / "tokenizer.json").is_file():
        return None
    try:
        doc = read_json_file(root / "tokenizer.json", "tokenizer.json")
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def check(p: Any) -> None:
    """Refuse, before anything is read, what the side files cannot honour."""
    tokenizer_root(p)  # a tokenizer_source that is neither base nor a model nor a directory: refused
    tmpl = p.spec.chat_template
    why = None if tmpl is None else chat_templates.problem(tmpl)
    if why:
        raise UsageError(why, _where(p, "chat_template"))
    from capmerge.io.writer import is_weight_file

    for d, files in st_module_files(_root(p, donor(p))).items():
        if any(is_weight_file(f) or f.endswith((".bin", ".pt", ".pth")) for f in files):
            p.warnings.append(f"sentence-transformers module {d} of {donor(p)} holds weights of its own: copied as "
                              "they are, not merged")  # fmt: skip


def _vocab_key(cfg: dict[str, Any]) -> tuple[dict[str, Any], str] | None:
    """The mapping holding a config's ``vocab_size`` (the config, else its ``text_config``) and the key."""
    if isinstance(cfg.get("vocab_size"), int):
        return cfg, "vocab_size"
    text = cfg.get("text_config")
    return (text, "vocab_size") if isinstance(text, dict) and isinstance(text.get("vocab_size"), int) else None


def _config_rows(root: Path | None) -> int | None:
    """``vocab_size`` of the config.json in ``root`` (or of its ``text_config``); None without one."""
    cfg = read_config(root)
    found = _vocab_key(cfg) if cfg is not None else None
    return found[0][found[1]] if found else None


def _chosen(p: Any) -> bool:
    """Whether a tokenizer is chosen and there to read (not another merge's output before it is made: check())."""
    src = p.spec.tokenizer_source
    return src is not None and (src in ("base", "union") or src in p.index or os.path.isdir(src))


def _check_ids(root: Path, doc: dict[str, Any], rows: int | None, where: str | None) -> None:
    """Refuse a chosen tokenizer whose token count is not what its tokenizer.json says: ids that are not 0 .. N − 1,
    ids past its model's ``vocab_size`` ``rows`` (mergekit removes those tokens from the tokenizer it writes;
    capmerge copies tokenizers as they are), special tokens that transformers would add to the file's."""
    tokens = vocabulary.token_ids(doc)
    ids = set(tokens.values())
    missing = sorted(t for t in _special_tokens(root) if t not in tokens)
    if missing:  # transformers adds the declared special tokens a tokenizer.json lacks
        raise UsageError(f"tokenizer_source: the tokenizer in {root} declares special tokens its tokenizer.json "
                         f"lacks ({', '.join(missing[:3])}): transformers adds them, so its vocabulary size is not "
                         "that of tokenizer.json", where)  # fmt: skip
    past = sorted(i for i in ids if rows is not None and i >= rows)
    if past:
        raise UsageError(f"tokenizer_source: the tokenizer in {root} has {len(past)} token(s) at ids >= vocab_size "
                         f"{rows} (first {past[0]}): mergekit removes them from the tokenizer it writes; capmerge "
                         "copies tokenizers as they are", where)  # fmt: skip
    if ids != set(range(len(ids))):
        raise UsageError(f"tokenizer_source: the token ids of {root / 'tokenizer.json'} are not 0 .. {len(ids) - 1} "
                         "(mergekit renumbers them; capmerge does not)", where)  # fmt: skip


def _special_tokens(root: Path) -> set[str]:
    """The special tokens ``tokenizer_config.json`` and ``special_tokens_map.json`` declare."""
    found: set[str] = set()
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        try:
            cfg = read_json_file(root / name, name)
        except (OSError, ValueError):
            continue
        if not isinstance(cfg, dict):
            continue
        keys = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
        values = [cfg.get(k) for k in keys] + list(cfg.get("additional_special_tokens") or [])
        for v in values:
            v = v.get("content") if isinstance(v, dict) else v
            if isinstance(v, str):
                found.add(v)
    return found


def fit_vocabulary(p: Any) -> None:
    """Give the vocabulary tensors one row per token of the chosen tokenizer (``tokenizer_source``), as mergekit
    writes them; each input's tokenizer.json and config are read once here. Where some model's vocabulary differs
    from it (or the tokenizer section sets tokens or padding), their rows are aligned to its tokens
    (:mod:`~capmerge.merge.vocabulary`, ``p.vocab``). Else, where some model's embeddings have more rows than the
    tokenizer has tokens (padded, e.g. Qwen2's, or not resized after tokens were dropped), the two-dimensional
    tensors outside the layers with its ``vocab_size`` rows are read as their first rows (a prefix of their bytes,
    so they still stream): only plain safetensors inputs without an adapter on those tensors. Refused: a ``union``
    without every model's tokenizer.json, and a chosen tokenizer :func:`_check_ids` refuses."""
    if not _chosen(p):
        return  # no tokenizer chosen, or another merge's output that is not made yet (planned again once it is)
    src, where = p.spec.tokenizer_source, _where(p, "tokenizer_source")
    tokens_of, pad_to = p.spec.tokenizer_tokens, p.spec.pad_to_multiple_of  # the tokenizer section's
    roots = [Path(m.ck.root) if m.ck.root else None for m in p.inputs]
    rows_of = [_config_rows(r) for r in roots]  # each model's vocab_size
    tokenizers = [_tokenizer_json(r) for r in roots]
    order = [p.index[r] for r in dict.fromkeys(([p.spec.base] if p.spec.base is not None else []) + _models(p))]
    root = tokenizer_root(p)
    if src == "union":
        lacking = next((i for i in order if tokenizers[i] is None), None)
        if lacking is not None:
            raise UsageError(f"tokenizer_source: union: {p.inputs[lacking].ref} has no readable tokenizer.json to "
                             "read its tokens from (the union is built from every model's tokenizer.json)",
                             where)  # fmt: skip
        chosen, owner = None, p.index[donor(p)]
    else:
        owner = p.index.get(p.spec.base if src == "base" else src)
        chosen = tokenizers[owner] if owner is not None and roots[owner] == root else _tokenizer_json(root)
        asked = [k for k, v in (("tokens", tokens_of), ("pad_to_multiple_of", pad_to)) if v]
        if chosen is None and asked:  # the section's settings would be dropped without a word
            raise UsageError(f"tokenizer: the section's {' and '.join(asked)} need the chosen tokenizer.json, and "
                             f"{root if root is not None else src} has none that can be read (a JSON object)",
                             where)  # fmt: skip
        if chosen is None:
            return  # no tokenizer.json to go by: the tensors keep their rows
    doc = chosen if chosen is not None else tokenizers[owner]
    v = vocabulary.plan(p, order, rows_of, tokenizers, chosen, where, tokens_of, pad_to)
    if v is not None:
        _check_ids(root, doc, rows_of[owner] if owner is not None else None, where)  # type: ignore[arg-type]
        p.vocab, p.vocab_tokens = v, v.rows
        return
    at = p.index.get(donor(p))  # one vocabulary: the padded rows, if any, cut to the tokenizer's tokens
    rows = rows_of[at] if at is not None else None
    try:
        tokens = len(set(vocabulary.token_ids(doc).values()))  # type: ignore[arg-type]
    except (ValueError, TypeError, KeyError, AttributeError):
        return
    if rows is None or tokens >= max(r for r in rows_of if r is not None):
        return
    _check_ids(root, doc, rows, where)  # type: ignore[arg-type]
    p.vocab_tokens = tokens
    import dataclasses

    from capmerge.io.checkpoint import Checkpoint
    from capmerge.merge.masks import layer_index

    for m, rows in zip(p.inputs, rows_of, strict=True):
        ck = m.ck
        if rows is None or rows <= tokens:
            continue
        for name, info in list(ck.tensors.items()):
            if layer_index(name) is not None or len(info.shape) != 2 or info.shape[0] != rows:
                continue
            if not ck.direct or type(ck).read_into is not Checkpoint.read_into or (m.lora and name in m.lora.tensors):
                raise UsageError(f"tokenizer_source: {name} would keep {tokens} of its {rows} rows (one per token, "
                                 "as mergekit writes it); capmerge does that for safetensors inputs without an adapter "
                                 "on the tensor", m.ref)  # fmt: skip
            ck.tensors[name] = dataclasses.replace(info, shape=(tokens, info.shape[1]),
                                                   nbytes=tokens * info.shape[1] * info.itemsize)  # fmt: skip


def untie(cfg: dict[str, Any]) -> None:
    """Set ``tie_word_embeddings`` false in a config (in its ``text_config`` where that one holds the key): the
    output has a head of its own beside the embeddings."""
    text = cfg.get("text_config")
    target = text if isinstance(text, dict) and "tie_word_embeddings" in text else cfg
    target["tie_word_embeddings"] = False


def read_config(root: Path | None) -> dict[str, Any] | None:
    if root is None or not (root / "config.json").is_file():
        return None
    cfg = read_json_file(root / "config.json", "config.json")  # one error naming the file, whatever is wrong
    return cfg if isinstance(cfg, dict) else None


def _config(p: Any) -> dict[str, Any] | None:
    cfg = read_config(_root(p, donor(p)))
    if cfg is None:
        return None
    tokens = p.vocab_tokens
    found = _vocab_key(cfg) if tokens else None
    if found and (found[0][found[1]] > tokens or getattr(p, "vocab", None) is not None):
        found[0][found[1]] = tokens
    if p.spec.slices:
        target = cfg
        if not any(k in cfg for k in LAYER_KEYS) and isinstance(cfg.get("text_config"), dict):
            target = cfg["text_config"]
        key = next((k for k in LAYER_KEYS if k in target), "num_hidden_layers")
        target[key] = p.n_layers
    if getattr(p, "untied", False):  # a head written beside embeddings the donor's config ties
        untie(cfg)
    if p.spec.out_dtype:
        for k in [k for k in ("torch_dtype", "dtype") if k in cfg] or ["torch_dtype"]:
            cfg[k] = p.spec.out_dtype
    return cfg


def _jinja_text(path: Path) -> str:
    """A model's ``chat_template.jinja``, stripped; one error naming the file where it is not UTF-8 text."""
    try:
        return path.read_bytes().decode("utf-8").strip()
    except UnicodeDecodeError:
        raise UsageError("chat_template: auto: chat_template.jinja is not valid UTF-8", str(path)) from None
    except OSError as e:
        raise UsageError(
            f"chat_template: auto: cannot read chat_template.jinja: {e.strerror or e}", str(path)
        ) from None


def _template(p: Any) -> str | None:
    tmpl = p.spec.chat_template
    if tmpl != "auto":
        return None if tmpl is None else chat_templates.resolve(tmpl)
    found = []
    for ref in _models(p):
        root = _root(p, ref)
        if root is None:
            continue
        if (root / "chat_template.jinja").is_file():
            found.append(_jinja_text(root / "chat_template.jinja"))
            continue
        try:
            cfg = read_json_file(root / "tokenizer_config.json", "tokenizer_config.json")
        except (OSError, ValueError):
            continue
        t = cfg.get("chat_template") if isinstance(cfg, dict) else None
        if isinstance(t, list):  # several named templates (transformers' list form): the one named default
            t = next((d.get("template") for d in t if isinstance(d, dict) and d.get("name") == "default"), None)
        if isinstance(t, str) and t.strip():
            found.append(t.strip())
    return collections.Counter(found).most_common(1)[0][0] if found else None


def write(p: Any, out: Any, skipped: dict[str, str] | None = None) -> list[str]:
    """Write the side files into the output directory ``out`` (an :class:`~capmerge.io.writer.Output`). Copied files
    follow ``apply``'s rules (:meth:`~capmerge.io.writer.Output.copy_side_file`): a symlink leading outside its
    checkpoint, or anything not a regular file, is not copied and lands in ``skipped`` (name → why)."""
    written = []
    skipped = {} if skipped is None else skipped
    cfg = _config(p)
    if cfg is not None:
        out.write_text("config.json", json.dumps(cfg, indent=2) + "\n")
        written.append("config.json")
    copies = []
    donor_root = _root(p, donor(p))
    if donor_root is not None:
        copies.append((donor_root, "generation_config.json"))
        # a sentence-transformers model's modules (pooling, normalisation): without them it loads as another model
        copies += [(donor_root, name) for name in ST_FILES]
        copies += [(donor_root, f) for files in st_module_files(donor_root).values() for f in files]
    root = tokenizer_root(p)
    copies += [(root, name) for name in TOKENIZER_FILES] if root is not None else []
    for src_root, name in copies:
        if not os.path.lexists(src_root / name):
            continue
        why = out.copy_side_file(src_root, name)
        if why is None:
            written.append(name)
        else:
            skipped[name] = why
    if getattr(p, "vocab", None) is not None:  # a union's new tokens, appended to the copied tokenizer
        vocabulary.write_tokenizer(p.vocab, out.path_for,
                                   lambda name, doc: out.write_text(name, json.dumps(doc, indent=2, ensure_ascii=False)
                                                                    + "\n"))  # fmt: skip
    tmpl = _template(p)
    if tmpl:
        out.write_text("chat_template.jinja", tmpl)
        if "chat_template.jinja" not in written:
            written.append("chat_template.jinja")
        tc = out.path_for("tokenizer_config.json")
        if tc.is_file():  # the template of the copied tokenizer config would hide the chosen one
            doc = read_json_file(tc, "tokenizer_config.json")
            if isinstance(doc, dict) and "chat_template" in doc:
                doc["chat_template"] = tmpl
                out.write_text("tokenizer_config.json", json.dumps(doc, indent=2) + "\n")
    if p.spec.model_card:
        out.write_text("README.md", card(p, os.path.basename(out.out)))
        written.append("README.md")
    if p.spec.config_text is not None:
        out.write_text("mergekit_config.yml", p.spec.config_text)
        written.append("mergekit_config.yml")
    out.write_text("capmerge.json", json.dumps(record(p), indent=2) + "\n")
    written.append("capmerge.json")
    return written


def card(p: Any, name: str) -> str:
    """A model card: front matter (the models, tags), how the model was merged, and the configuration."""
    from capmerge.io.hub import parse_ref

    models = list(dict.fromkeys(([p.spec.base] if p.spec.base else []) + _models(p)))
    hub = []
    for m in models:
        try:
            h = parse_ref(m.partition("+")[0])
        except Exception:  # noqa: BLE001 - a card never fails a merge
            h = None
        if h is not None:
            hub.append(h.repo_id)
    lines = ["---"]
    lines += ["base_model:", *(f"- {h}" for h in hub)] if hub else []
    lines += ["library_name: transformers", "tags:", "- merge", "- capmerge", "---", f"# {name}", ""]
    lines += [f"This model was merged with capmerge using the `{p.method.name}` method"
              + (f", with {p.spec.base} as the base model." if p.spec.base else "."), ""]  # fmt: skip
    lines += ["## Models merged", "", *(f"* {m}" for m in models if m != p.spec.base), ""]
    text = p.spec.config_text
    if text:
        lines += ["## Configuration", "", "The following configuration was used to produce this model:", "",
                  "```yaml", text.rstrip("\n"), "```", ""]  # fmt: skip
    elif p.spec.command:
        lines += ["## Command", "", "```", p.spec.command, "```", ""]
    return "\n".join(lines)


def record(p: Any) -> dict[str, Any]:
    """What ``capmerge.json`` records: method, base, models with their fingerprints, layers, dtype, seed."""
    from capmerge._version import __version__

    return {
        "capmerge_version": __version__,
        "command": "merge",
        "method": p.method.name,
        "base": p.spec.base,
        "models": [{"ref": m.ref, "fingerprint": m.ck.fingerprint()} for m in p.inputs],
        "n_layers": p.n_layers,
        "out_dtype": p.spec.out_dtype,
        "seed": p.spec.seed,
        "warnings": p.warnings,
    }
