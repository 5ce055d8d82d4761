"""mergekit configurations, run unchanged: ``capmerge run CONFIG.yml -o OUT``.

A YAML file with a top-level ``merge_method`` is a mergekit configuration (anything else is a capmerge recipe).
It is read with line numbers and checked before any tensor is read: every unknown or unsupported key or value is
one error naming the key and ``file:line``. Method names and parameters (names, types, defaults) come from the
registry of model-centric methods, never from a list kept here. The merge itself is
:func:`capmerge.merge.modelmerge.run_merge`.

Supported: ``merge_method``, ``base_model``, ``models`` (``model``, ``parameters``), ``slices`` (``sources``:
``model``, ``layer_range``, ``parameters``; and the slice's ``parameters``), ``parameters``, ``dtype``,
``out_dtype``, ``tokenizer_source`` (``base``, a model, or ``union`` of the models' tokens; or the
``tokenizer:`` section: ``source``, ``tokens``, ``pad_to_multiple_of``), ``chat_template`` (a name, template text
or ``auto``). Model references are paths, Hub ids (``org/name@revision``) and ``MODEL+LORA``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from capmerge.errors import CapmergeError, UsageError
from capmerge.merge import chat_templates
from capmerge.merge.model_params import check_setting, kind_of
from capmerge.recipes import yaml_lines as _yaml
from capmerge.recipes.mergekit_cli import CommandOptions

if TYPE_CHECKING:  # the registry and the runner import torch: only when a configuration is loaded
    from capmerge.merge.methods.models import ModelMethod
    from capmerge.merge.modelmerge import MergeSpec, SliceSpec, SourceSpec

TOP_KEYS = ("merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype", "tokenizer_source",
            "tokenizer", "chat_template")  # fmt: skip
UNSUPPORTED = {
    "modules": "per-module merges (modules:) are not supported: use models or slices",
    "base_model@slice": "a slice's own base_model is not supported: set base_model at the top level",
    "residual_weight": "residual_weight is not supported",
}
DTYPE_NAMES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16", "fp32": "float32",
               "fp16": "float16", "bf16": "bfloat16", "half": "float16", "float": "float32"}  # fmt: skip


class ConfigError(UsageError):
    """A bad mergekit configuration: ``where`` is ``file:line: key``."""


def is_config(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a YAML file whose top level is a mapping with ``merge_method`` (a mergekit config)."""
    p = Path(path)
    if not p.is_file() or p.suffix.lower() not in (".yml", ".yaml"):
        return False
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    try:
        doc = _yaml.load(text)
    except Exception:  # noqa: BLE001 - broken YAML: a configuration if it says so at the top level (load reports it)
        return re.search(r"^merge_method\s*:", text, re.MULTILINE) is not None
    return isinstance(doc, dict) and ("merge_method" in doc or any(k in doc for k in OTHER_TOOLS))


class _Reader:
    """Walks a parsed configuration, raising :class:`ConfigError` with ``file:line: key`` on the first problem."""

    def __init__(self, file: str, lines: bool = True) -> None:
        self.file = file
        self.lines = lines

    def at(self, container: Any, key: Any, path: str) -> str:
        """Where ``key`` of ``container`` is: ``file:line: path``, or the key's path alone in a configuration given
        as a mapping (its lines would be those of a YAML text the caller never wrote)."""
        return f"{self.file}:{_yaml.line_of(container, key)}: {path}" if self.lines else path

    def fail(self, what: str, container: Any, key: Any, path: str) -> ConfigError:
        return ConfigError(what, self.at(container, key, path))

    def mapping(self, value: Any, parent: Any, key: Any, path: str, allowed: tuple[str, ...]) -> dict:
        if not isinstance(value, dict):
            raise self.fail(f"expected a mapping, got {value!r}", parent, key, path)
        for k in value:
            if k in UNSUPPORTED or f"{k}@slice" in UNSUPPORTED and path.startswith("slices"):
                raise self.fail(UNSUPPORTED.get(f"{k}@slice") or UNSUPPORTED[k], value, k, f"{path}.{k}".lstrip("."))
            if k not in allowed:
                raise self.fail(f"unknown key {k!r} (expected {', '.join(allowed)})", value, k,
                                f"{path}.{k}".lstrip("."))  # fmt: skip
        return value

    def model_ref(self, value: Any, parent: Any, key: Any, path: str) -> str:
        if isinstance(value, dict):  # mergekit's long form: {model: {path, revision}, lora: {path, revision}}
            self.mapping(value, parent, key, path, ("model", "lora"))
            parts = [self._path(value[k], value, k, f"{path}.{k}") for k in ("model", "lora") if k in value]
            if "model" not in value:
                raise self.fail("missing model:", parent, key, path)
            return "+".join(parts)
        if not isinstance(value, str) or not value.strip():
            raise self.fail(f"expected a model reference (a path or org/name), got {value!r}", parent, key, path)
        if value.count("+") > 1:
            raise self.fail(f"invalid model reference {value!r} (MODEL or MODEL+LORA)", parent, key, path)
        return value

    def _path(self, value: Any, parent: Any, key: Any, path: str) -> str:
        if isinstance(value, dict):
            self.mapping(value, parent, key, path, ("path", "revision"))
            if not isinstance(value.get("path"), str):
                raise self.fail("missing path:", parent, key, path)
            rev = value.get("revision")
            return f"{value['path']}@{rev}" if rev else value["path"]
        if not isinstance(value, str):
            raise self.fail(f"expected a path, got {value!r}", parent, key, path)
        return value

    def params(self, value: Any, parent: Any, key: Any, path: str, method: ModelMethod, *, per_model: bool,
               warnings: list[str]) -> dict[str, Any] | None:  # fmt: skip
        if value is None:
            return None
        known = {**method.params, **method.model_params}
        if not isinstance(value, dict):
            raise self.fail(f"expected a mapping of parameters, got {value!r}", parent, key, path)
        for k in value:
            if k not in known and k not in _other_methods_params():
                takes = f"it takes {', '.join(known)}" if known else "it takes none"
                raise self.fail(f"{method.name} has no parameter {k!r} ({takes})", value, k, f"{path}.{k}")
        out = {}
        for k, v in value.items():
            if k not in known:  # another method's (a configuration adapted from one): mergekit ignores it too
                warnings.append(f"{method.name} takes no parameter {k} (other methods do): it has no effect, as in "
                                f"mergekit ({self.at(value, k, f'{path}.{k}')})")  # fmt: skip
                continue
            if per_model and k in method.params and k not in method.model_params:
                warnings.append(f"{k} is a global parameter of {method.name}: set per model it has no effect "
                                f"({self.at(value, k, f'{path}.{k}')})")  # fmt: skip
                continue
            try:
                out[k] = check_setting(_yaml.plain(v), kind_of(known[k]), k)
            except ValueError as e:
                raise self.fail(str(e), value, k, f"{path}.{k}") from None
        return out

    def dtype(self, doc: dict, key: str) -> str | None:
        v = doc.get(key)
        if v is None:
            return None
        name = v.removeprefix("torch.") if isinstance(v, str) else v
        if name not in DTYPE_NAMES:
            raise self.fail(f"unsupported {key} {v!r} (choose from float32, bfloat16, float16)", doc, key, key)
        return DTYPE_NAMES[name]


def _other_methods_params() -> set[str]:
    """Every parameter some model method takes."""
    from capmerge.merge.methods.registry import MODEL_METHODS

    return {k for m in MODEL_METHODS.values() for k in (*m.params, *m.model_params)}


def _method(r: _Reader, doc: dict) -> ModelMethod:
    from capmerge.merge.methods.registry import MODEL_METHODS

    name = doc.get("merge_method")
    if not isinstance(name, str) or name not in MODEL_METHODS:
        raise r.fail(f"unknown merge_method {name!r} (choose from {', '.join(MODEL_METHODS)})", doc, "merge_method",
                     "merge_method")  # fmt: skip
    return MODEL_METHODS[name]


def _sources(r: _Reader, items: Any, parent: Any, key: Any, path: str, method: ModelMethod, warnings: list[str],
             *, slice_source: bool) -> list[SourceSpec]:  # fmt: skip
    from capmerge.merge.modelmerge import SourceSpec

    if not isinstance(items, list) or not items:
        raise r.fail("expected a non-empty list", parent, key, path)
    out = []
    allowed = ("model", "layer_range", "parameters") if slice_source else ("model", "parameters")
    for i, item in enumerate(items):
        where = f"{path}[{i}]"
        r.mapping(item, items, i, where, allowed)
        if "model" not in item:
            raise r.fail("missing model:", items, i, where)
        ref = r.model_ref(item["model"], item, "model", f"{where}.model")
        rng = None
        if slice_source:
            rng = item.get("layer_range")
            ok = isinstance(rng, list) and len(rng) == 2 and all(type(x) is int and x >= 0 for x in rng)
            if not ok or rng[1] <= rng[0]:  # type: ignore[index]
                raise r.fail(f"layer_range must be [start, end) with 0 <= start < end, got {rng!r}",
                             item if "layer_range" in item else items, "layer_range" if "layer_range" in item else i,
                             f"{where}.layer_range")  # fmt: skip
            rng = (rng[0], rng[1])  # type: ignore[index]
        params = r.params(item.get("parameters"), item, "parameters", f"{where}.parameters", method, per_model=True,
                          warnings=warnings)  # fmt: skip
        loc = r.at(item, "model", f"{where}.model")
        out.append(SourceSpec(ref, params, rng, loc))
    return out


Config = str | os.PathLike[str] | Mapping[str, Any]
"""A mergekit configuration: its file, its YAML text (several lines), or the mapping ``yaml.safe_load`` gives."""


def _plain(x: Any) -> Any:
    """``x`` with paths as strings (a mapping written in Python may hold Path objects)."""
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    if isinstance(x, Mapping):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    return x


def _read(config: Config) -> tuple[str, str, bool]:
    """(YAML text, the name its errors give, whether they give its lines) of a configuration: a mapping's errors name
    the key alone (``models[0].model``), since its text is the one dumped here."""
    if isinstance(config, Mapping):
        return yaml.safe_dump(_plain(config), sort_keys=False), "<configuration>", False
    if isinstance(config, str) and "\n" in config:
        return config, "<configuration>", True
    file = os.fspath(config)
    try:
        return Path(file).read_text(encoding="utf-8"), file, True
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read configuration: {e}", file) from None


@dataclass
class Document:
    """One merge of a configuration: its spec, warnings and ``name`` (mergekit-multi's: other merges name it as a
    model)."""

    spec: MergeSpec
    warnings: list[str]
    name: str | None
    file: str  # the configuration's file (or <configuration>)
    line: int  # where the document starts
    notes: list[str] = field(default_factory=list)  # keys accepted that change nothing (int8_mask)


_DOC_START = re.compile(r"^---[ \t]*(?:#.*)?$", re.MULTILINE)
OTHER_TOOLS = {  # top-level keys of other mergekit tools' configurations -> what to say
    "experts": "a mergekit-moe configuration (experts:, gate_mode:) builds a mixture of experts; capmerge merges "
    "weights by arithmetic and does not build one",
    "genome": "a mergekit-evolve configuration (genome:, tasks:) searches merge parameters by evaluating models; "
    "capmerge runs merges, not that search",
}


def load_all(config: Config) -> list[Document]:
    """Read and check every document of a mergekit configuration (:data:`Config`; several documents, separated by
    ``---``, are mergekit-multi's stages): every problem of any document is raised before anything runs.

    Raises:
        ConfigError: the first problem, with ``file:line: key``.
    """
    text, file, lines = _read(config)
    marks = list(_DOC_START.finditer(text))
    bounds = zip([0, *(m.end() for m in marks)], [*(m.start() for m in marks), len(text)], strict=True)
    docs = []
    for a, b in bounds:
        piece = text[a:b]
        first = _first_content(piece)
        if first is not None:
            skip = text.count("\n", 0, a)
            docs.append(_load_doc("\n" * skip + piece, piece, _Reader(file, lines), skip + 1 + first))
    if not docs:
        raise ConfigError("the configuration is empty", f"{file}:1")
    return docs


def _first_content(piece: str) -> int | None:
    """The index of a document's first line that is neither blank nor a comment (the rest of a ``---`` line is
    line 0), or None for a document without content."""
    lines = piece.split("\n")
    return next((i for i, line in enumerate(lines) if line.strip() and not line.lstrip().startswith("#")), None)


def _load_doc(text: str, own_text: str, r: _Reader, line: int) -> Document:
    """One document; ``text`` is padded with blank lines so that its lines count from the file's start."""
    from capmerge.merge.modelmerge import MergeSpec

    try:
        doc = _yaml.load(text)
    except yaml.YAMLError as e:
        raise ConfigError(_yaml.error_message(e), f"{r.file}:{_yaml.error_line(e, text) or 1}") from None
    if isinstance(doc, dict) and "merge_method" not in doc:
        for key, what in OTHER_TOOLS.items():
            if key in doc:
                raise r.fail(what, doc, key, key)
    r.mapping(doc, doc, "merge_method", "", (*TOP_KEYS, "name"))
    name = doc.get("name")
    if "name" in doc and (not isinstance(name, str) or not name.strip() or "+" in name):
        raise r.fail(f"expected a merge name (a string without '+'), got {name!r}", doc, "name", "name")
    method = _method(r, doc)
    warnings: list[str] = []
    spec = MergeSpec(method.name, config_text=own_text.strip("\n") + "\n")
    spec.where = {k: r.at(doc, k, k) for k in doc}
    if doc.get("base_model") is not None:
        spec.base = r.model_ref(doc["base_model"], doc, "base_model", "base_model")
    if ("models" in doc) == ("slices" in doc):
        raise r.fail("give exactly one of models or slices", doc, "merge_method", "models")
    if "models" in doc:
        spec.models = _sources(r, doc["models"], doc, "models", "models", method, warnings, slice_source=False)
    else:
        spec.slices = _slices(r, doc, method, warnings)
    spec.parameters = r.params(doc.get("parameters"), doc, "parameters", "parameters", method, per_model=False,
                               warnings=warnings) or {}  # fmt: skip
    spec.out_dtype = r.dtype(doc, "out_dtype") or r.dtype(doc, "dtype")
    _tokenizer(r, doc, spec)
    _check_required(r, doc, spec, method)
    return Document(spec, warnings, name, r.file, line, _int8_notes(r, doc, spec))


def _int8_notes(r: _Reader, doc: dict, spec: MergeSpec) -> list[str]:
    """A note where ``int8_mask`` is set true (mergekit's example configurations set it): it has no effect here."""
    scopes = [(doc.get("parameters"), "parameters", spec.parameters)]
    scopes += [(item.get("parameters"), f"slices[{i}].parameters", sl.parameters)
               for i, (item, sl) in enumerate(zip(doc.get("slices") or [], spec.slices, strict=False))
               if isinstance(item, dict)]  # fmt: skip
    return [
        f"int8_mask has no effect ({r.at(raw, 'int8_mask', f'{path}.int8_mask')}): mergekit "
        "stores its sign masks as int8 to save memory, capmerge keeps them as bits; the output is the same"
        for raw, path, got in scopes
        if isinstance(raw, dict) and (got or {}).get("int8_mask") is True
    ]


def _slices(r: _Reader, doc: dict, method: ModelMethod, warnings: list[str]) -> list[SliceSpec]:
    from capmerge.merge.modelmerge import SliceSpec

    items = doc["slices"]
    if not isinstance(items, list) or not items:
        raise r.fail("expected a non-empty list of slices", doc, "slices", "slices")
    out = []
    for i, item in enumerate(items):
        where = f"slices[{i}]"
        r.mapping(item, items, i, where, ("sources", "parameters"))
        if "sources" not in item:
            raise r.fail("missing sources:", items, i, where)
        sources = _sources(r, item["sources"], item, "sources", f"{where}.sources", method, warnings,
                           slice_source=True)  # fmt: skip
        params = r.params(item.get("parameters"), item, "parameters", f"{where}.parameters", method, per_model=False,
                          warnings=warnings)  # fmt: skip
        out.append(SliceSpec(sources, params))
    return out


def _tokenizer(r: _Reader, doc: dict, spec: MergeSpec) -> None:
    src, at, key, path = doc.get("tokenizer_source"), doc, "tokenizer_source", "tokenizer_source"
    section = doc.get("tokenizer")
    if "tokenizer" in doc:  # mergekit's tokenizer: section (its source: union unless given)
        r.mapping(section, doc, "tokenizer", "tokenizer", ("source", "tokens", "pad_to_multiple_of"))
        if "tokenizer_source" in doc:
            raise r.fail("give tokenizer_source or tokenizer:, not both", doc, "tokenizer", "tokenizer")
        src, at, key, path = section.get("source", "union"), section, "source", "tokenizer.source"
        spec.where["tokenizer_source"] = r.at(
            *((section, "source") if "source" in section else (doc, "tokenizer")), "tokenizer.source"
        )
        pad = section.get("pad_to_multiple_of")
        if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or pad < 1):
            raise r.fail(f"pad_to_multiple_of must be a positive integer, got {pad!r}", section,
                         "pad_to_multiple_of", "tokenizer.pad_to_multiple_of")  # fmt: skip
        spec.pad_to_multiple_of = pad
        if section.get("tokens") is not None:
            spec.tokenizer_tokens = _token_sources(r, section)
    if src is not None:
        keyword = src in ("base", "union")  # union: every model's tokens (capmerge.merge.vocabulary)
        spec.tokenizer_source = src if keyword else r.model_ref(src, at, key, path)
        if src == "base" and spec.base is None:
            raise r.fail(f"{path}: base needs a base_model", at, key, path)
    tmpl = doc.get("chat_template")
    if tmpl is not None:
        why = chat_templates.problem(tmpl)
        if why:
            raise r.fail(why, doc, "chat_template", "chat_template")
        spec.chat_template = tmpl


def _token_sources(r: _Reader, section: dict) -> dict[str, Any]:
    """mergekit's ``tokenizer.tokens``: token → ``{source, force}``, ``source`` a model (its row of the token),
    ``{kind: model_token, model, token | token_id}``, ``{kind: zero}``, or absent (the default rules)."""
    from capmerge.merge.vocabulary import TokenSource

    tokens = section["tokens"]
    if not isinstance(tokens, dict):
        raise r.fail(f"expected a mapping of tokens, got {tokens!r}", section, "tokens", "tokenizer.tokens")
    out = {}
    for tok, cfg in tokens.items():
        path = f"tokenizer.tokens.{tok}"
        cfg = {} if cfg is None else cfg
        r.mapping(cfg, tokens, tok, path, ("source", "force"))
        where = r.at(tokens, tok, path)
        force = cfg.get("force", False)
        if not isinstance(force, bool):
            raise r.fail(f"force must be true or false, got {force!r}", cfg, "force", f"{path}.force")
        src = cfg.get("source")
        if src is None:
            out[str(tok)] = TokenSource("rules", force=force, where=where)
        elif isinstance(src, dict) and src.get("kind") == "zero":
            r.mapping(src, cfg, "source", f"{path}.source", ("kind",))
            out[str(tok)] = TokenSource("zero", force=force, where=where)
        elif isinstance(src, dict) and src.get("kind") == "model_token":
            r.mapping(src, cfg, "source", f"{path}.source", ("kind", "model", "token", "token_id"))
            if ("token" in src) == ("token_id" in src):
                raise r.fail("give token or token_id", cfg, "source", f"{path}.source")
            tid = src.get("token_id")
            if tid is not None and (isinstance(tid, bool) or not isinstance(tid, int)):
                raise r.fail(f"token_id must be an integer, got {tid!r}", src, "token_id", f"{path}.source.token_id")
            model = r.model_ref(src.get("model"), src, "model", f"{path}.source.model")
            token = src.get("token")
            out[str(tok)] = TokenSource("model_token", model, None if token is None else str(token), tid, force,
                                        where)  # fmt: skip
        elif isinstance(src, dict) and "kind" in src:
            raise r.fail(f"unknown source kind {src['kind']!r} (model_token or zero)", src, "kind",
                         f"{path}.source.kind")  # fmt: skip
        else:
            out[str(tok)] = TokenSource("model", r.model_ref(src, cfg, "source", f"{path}.source"), force=force,
                                        where=where)  # fmt: skip
    return out


def _check_required(r: _Reader, doc: dict, spec: MergeSpec, method: ModelMethod) -> None:
    if method.base == "required" and spec.base is None:
        raise r.fail(f"{method.name} needs a base_model", doc, "merge_method", "base_model")
    for sl in spec.slices or [None]:
        for src in sl.sources if sl is not None else spec.models:
            if method.base != "unused" and src.model == spec.base:
                continue  # the base listed among the models (as mergekit's examples do): its parameters go unused
            for k in (k for k, d in method.model_params.items() if d is None):
                scopes = (src.parameters, sl.parameters if sl is not None else None, spec.parameters)
                if not any(sc and k in sc for sc in scopes):
                    raise ConfigError(f"missing parameter {k} for model {src.model} ({method.name} needs one per "
                                      "model)", src.where)  # fmt: skip
    required = [k for k, d in method.params.items() if d is None]
    for k in required:
        given = k in spec.parameters or any(sl.parameters and k in sl.parameters for sl in spec.slices)
        if not given:
            raise r.fail(f"{method.name} needs the parameter {k} (under parameters:)", doc, "merge_method",
                         "parameters")  # fmt: skip


def _run_one(doc: Document, output: str | os.PathLike[str], *, force: bool, allow_nonfinite: bool,
             progress: Callable[[int, int], None] | None, options: CommandOptions | None) -> Any:  # fmt: skip
    from capmerge.merge.modelmerge import run_merge

    spec, opts = doc.spec, options or CommandOptions()
    if opts.seed is not None:
        spec.seed = opts.seed
    spec.copy_tokenizer, spec.model_card = opts.copy_tokenizer, opts.model_card
    summary = run_merge(spec, output, force=force, allow_nonfinite=allow_nonfinite, progress=progress,
                        shard_size=opts.shard_bytes)  # fmt: skip
    summary.warnings[:0] = doc.warnings
    summary.notes[:0] = doc.notes
    return summary


def _exists(d: Path) -> bool:
    """Whether ``d`` holds a merged model (a config and weights), as mergekit-multi's lazy check has it."""
    weights = ("model.safetensors", "model.safetensors.index.json")
    return (d / "config.json").is_file() and any((d / n).is_file() for n in weights)


def stages(config: Config, output: str | os.PathLike[str] | None, intermediate_dir: str | os.PathLike[str] | None,
           ) -> list[tuple[Document, str]]:  # fmt: skip
    """The merges of a configuration in the order they run, each with its output: mergekit-multi's rules — a merge
    with ``name: N`` goes to ``intermediate_dir/N``, where the others find it as the model ``N``; the one merge
    without a name goes to ``output``. One document without ``intermediate_dir`` is a plain configuration."""
    docs = load_all(config)
    file = docs[0].file
    if len(docs) == 1 and intermediate_dir is None:
        if output is None:
            raise UsageError("missing option -o/--output (the output directory)")
        return [(docs[0], os.fspath(output))]
    by_name: dict[str, Document] = {}
    unnamed = [d for d in docs if d.name is None]
    for d in docs:
        if d.name is not None:
            if d.name in by_name:
                raise ConfigError(f"two merges named {d.name!r}", d.spec.where.get("name", f"{file}:{d.line}"))
            by_name[d.name] = d
    if len(unnamed) > 1:
        raise ConfigError("more than one merge without a name: give every merge but the final one a name:",
                          f"{file}:{unnamed[1].line}")  # fmt: skip
    if unnamed and output is None:
        raise UsageError("missing option -o/--output: the configuration's merge without a name is written there")
    if not unnamed and output is not None:
        raise UsageError("-o/--output: every merge of the configuration has a name (each goes to the intermediate "
                         "directory); leave the final merge without a name to write it to the output")  # fmt: skip
    if by_name and intermediate_dir is None:
        raise UsageError("merges with a name (mergekit-multi's stages) need -I/--intermediate-dir DIR, where each "
                         "is written as DIR/NAME")  # fmt: skip
    inter = os.fspath(intermediate_dir) if intermediate_dir is not None else ""
    needs: dict[int, set[str]] = {}
    for i, d in enumerate(docs):
        needs[i] = _use_stages(d.spec, by_name, inter)
        if d.name is not None and d.name in needs[i]:
            raise ConfigError(f"the merge {d.name!r} takes itself as a model", d.spec.where.get("name", file))
    order: list[int] = []
    done: set[str] = set()
    while len(order) < len(docs):
        ready = [i for i in range(len(docs)) if i not in order and needs[i] <= done]
        if not ready:
            stuck = [str(docs[i].name) for i in range(len(docs)) if i not in order and docs[i].name is not None]
            raise ConfigError(f"merges that take each other as models (a cycle): {', '.join(stuck)}", file)
        order.append(ready[0])
        name = docs[ready[0]].name
        if name is not None:
            done.add(name)
    out = os.fspath(output) if output is not None else ""
    return [(docs[i], os.path.join(inter, docs[i].name) if docs[i].name is not None else out) for i in order]


def _use_stages(spec: MergeSpec, by_name: Mapping[str, Document], inter: str) -> set[str]:
    """Point the model references of ``spec`` that name another merge at its directory; returns those names."""
    used: set[str] = set()

    def swap(ref: str | None) -> str | None:
        if ref is None:
            return None
        model, plus, lora = ref.partition("+")
        if model in by_name:
            used.add(model)
            return os.path.join(inter, model) + plus + lora
        return ref

    spec.base = swap(spec.base)
    for src in [*spec.models, *(s for sl in spec.slices for s in sl.sources)]:
        src.model = swap(src.model) or src.model
    if spec.tokenizer_source not in (None, "base", "union"):
        spec.tokenizer_source = swap(spec.tokenizer_source)
    return used


def _check_inputs(todo: list[tuple[Document, str]]) -> None:
    """Before the first merge of several: plan each merge that takes no other merge's output (names, shapes,
    parameters: headers only), and open the other merges' own inputs, so that a missing or mismatched model of a
    later merge is reported before an earlier one is written."""
    from capmerge.merge.modelmerge import ModelInput, plan

    staged = {out for doc, out in todo if doc.name is not None}  # where the references to other merges now point
    for doc, _ in todo:
        spec = doc.spec
        refs = [(spec.base, spec.where.get("base_model"))] if spec.base is not None else []
        refs += [(src.model, src.where) for src in [*spec.models, *(s for sl in spec.slices for s in sl.sources)]]
        own: dict[str, str | None] = {}  # each input from outside the file, where it is first named
        for ref, where in refs:
            if ref.partition("+")[0] not in staged:
                own.setdefault(ref, where)
        if len(own) == len({ref for ref, _ in refs}):
            plan(spec).close()
            continue
        for ref, where in own.items():
            try:
                ModelInput(ref, {}).close()
            except CapmergeError as e:
                e.where = f"{e.where}; {where}" if e.where and where else (where or e.where)
                raise


def run_configs(
    config: Config,
    output: str | os.PathLike[str] | None,
    *,
    intermediate_dir: str | os.PathLike[str] | None = None,
    lazy: bool = True,
    force: bool = False,
    allow_nonfinite: bool = False,
    progress: Callable[[int, int], None] | None = None,
    options: CommandOptions | None = None,
) -> list[tuple[str, Any]]:
    """Run every merge of a configuration (:func:`stages`), in order: (output, its Summary), or (output, None) for
    a named merge whose directory already holds a model (``lazy``, as mergekit-multi's default). Every document is
    checked before the first merge starts; the merges to intermediate directories replace what is there."""
    todo = stages(config, output, intermediate_dir)
    if len(todo) > 1:
        _check_inputs(todo)
    ran = []
    for doc, out in todo:
        if doc.name is not None and lazy and _exists(Path(out)):
            ran.append((out, None))
            continue
        named = doc.name is not None
        ran.append((out, _run_one(doc, out, force=force or named, allow_nonfinite=allow_nonfinite, progress=progress,
                                  options=options)))  # fmt: skip
    return ran


def run_mergekit(
    config: Config,
    output: str | os.PathLike[str] | None,
    *,
    intermediate_dir: str | os.PathLike[str] | None = None,
    lazy: bool = True,
    seed: int | None = None,
    shard_size: int | str = "5GB",
    copy_tokenizer: bool = True,
    model_card: bool = True,
    force: bool = False,
    allow_nonfinite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Any:
    """Run a mergekit configuration from Python, as ``capmerge run CONFIG -o OUT`` does; ``config``: a file, YAML
    text, or a mapping (``{"merge_method": "slerp", "base_model": "A", "models": [{"model": "B"}], "parameters":
    {"t": 0.5}}``). ``seed``: of DARE's and DELLA's masks (default: the configuration's merge, seed 0);
    ``shard_size``: the largest weight file (``5GB``, ``500MB``, bytes); ``copy_tokenizer``: without
    ``tokenizer_source``, copy the base's (else the first model's) tokenizer; ``model_card``: write README.md.
    Several documents (``---``) are mergekit-multi's stages: a merge with ``name: N`` goes to
    ``intermediate_dir/N`` (kept if a model is there already, ``lazy``) and is the model ``N`` of the later ones;
    the merge without a name goes to ``output``; then the result is a list of Summaries (None for a kept stage).

    Returns the :class:`~capmerge.merge.summary.Summary` (its ``warnings`` hold the configuration's). Raises a
    :class:`~capmerge.errors.CapmergeError` (``ConfigError`` naming the key and line) before anything is written."""
    from capmerge.io.writer import parse_size

    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise UsageError(f"seed must be a non-negative integer, got {seed!r}")
    opts = CommandOptions(seed=seed, shard_bytes=parse_size(shard_size), copy_tokenizer=copy_tokenizer,
                          model_card=model_card)  # fmt: skip
    ran = run_configs(config, output, intermediate_dir=intermediate_dir, lazy=lazy, force=force,
                      allow_nonfinite=allow_nonfinite, progress=progress, options=opts)  # fmt: skip
    return ran[0][1] if len(ran) == 1 and intermediate_dir is None else [summary for _, summary in ran]


def split_parameters(m: ModelMethod, parameters: Mapping[str, Any], refs: list[str] | None,
                     base: str | None) -> tuple[list[dict[str, Any]], dict[str, Any]]:  # fmt: skip
    """``merge_models``' parameters as one mapping per model and the global ones: ``weights`` read as ``weight``, a
    name the method does not take refused, a per-model one given once or once per model (UsageError). ``refs``
    None: the models are not known yet (a recipe step's output): the names are checked, not the counts."""
    from capmerge.merge.model_params import check_param, per_model

    own: list[dict[str, Any]] = [{} for _ in refs or []]
    glob: dict[str, Any] = {}
    for key, value in parameters.items():
        key = "weight" if key == "weights" else key
        check_param(m, key)
        if key in m.model_params and refs is not None:
            vals = list(value) if isinstance(value, list | tuple) else [value]
            for d, v in zip(own, per_model(key, vals, refs, base), strict=True):
                d[key] = v
        elif key not in m.model_params:
            glob[key] = list(value) if isinstance(value, tuple) else value
    return own, glob


def merge_models(
    models: list[str | os.PathLike[str]],
    output: str | os.PathLike[str],
    *,
    method: str = "linear",
    base: str | os.PathLike[str] | None = None,
    dtype: str | None = None,
    tokenizer_source: str | None = None,
    chat_template: str | None = None,
    seed: int = 0,
    shard_size: int | str = "5GB",
    force: bool = False,
    allow_nonfinite: bool = False,
    progress: Callable[[int, int], None] | None = None,
    **parameters: Any,
) -> Any:
    """``capmerge merge MODEL... [--base B] --method NAME ... -o OUT`` from Python: whole models merged, optionally
    relative to ``base``. ``parameters``: the method's (``weight``/``weights``, ``density``, ``t`` ...); a per-model
    parameter takes one value or a list of one per model, a global one a value or a list (a gradient over the
    layers); ``chat_template``: a name, the template text or ``auto``, as the configuration key. The merge runs as
    the mergekit configuration it amounts to (written into the output's
    ``mergekit_config.yml`` and model card). Returns the :class:`~capmerge.merge.summary.Summary`."""
    from capmerge.merge.methods.registry import get_model_method

    m = get_model_method(method)
    if not models:
        raise UsageError("no models given")
    refs = [os.fspath(x) for x in models]
    own, glob = split_parameters(m, parameters, refs, os.fspath(base) if base is not None else None)
    doc: dict[str, Any] = {"merge_method": m.name}
    if base is not None:
        doc["base_model"] = os.fspath(base)
    doc["models"] = [{"model": x, **({"parameters": d} if d else {})} for x, d in zip(refs, own, strict=True)]
    if glob:
        doc["parameters"] = glob
    if dtype is not None:
        doc["dtype"] = dtype
    if tokenizer_source is not None:
        doc["tokenizer_source"] = tokenizer_source
    if chat_template is not None:
        doc["chat_template"] = chat_template
    return run_mergekit(doc, output, seed=seed, shard_size=shard_size, force=force, allow_nonfinite=allow_nonfinite,
                        progress=progress)  # fmt: skip
