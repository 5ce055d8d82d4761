"""Models of different vocabularies, merged as mergekit merges them once a tokenizer is chosen (``tokenizer_source``:
``union``, ``base`` or a model).

The chosen tokenizer decides the output's vocabulary: ``base`` or a model's is that tokenizer's; ``union`` is the
base's (else the first model's) with the tokens the other models add appended — their regular tokens first, each
model's in its id order, then their added tokens (special ones keep their settings) —, as transformers'
``add_tokens`` appends them. Each model's vocabulary tensors (its embeddings and head: the two-dimensional tensors
outside the layers with its config's ``vocab_size`` rows) are then read with one row per output token: the model's
own row for a token it has; for a token it lacks, a row made from the models that have it (mergekit's rules: the
one model that has it; else the base's row, where the base has it; else the mean of the rows of those that do;
zeros where none does). The method then merges these as any tensors. mergekit's ``tokenizer:`` section can set
a token's row (``tokens``: from a model, from another token or row of a model, zeros; ``force``: in every model,
also those that have the token; a token the vocabulary lacks is added) and pad the rows to a multiple
(``pad_to_multiple_of``: each model's padding rows its mean token row).

A vocabulary tensor streams as any other (:func:`streams`: each model's aligned rows in float32, a block at a time,
from runs of its rows in its file; the block kernels merge them), but where the rows are padded or an input has a
LoRA adapter: then it is read whole, once per model, and its method runs on the whole tensors in float32 (the ``fn``
path, :func:`read`: one such tensor per model in memory, 2.2 GB each for a 152k × 3584 embedding). Where every
model's vocabulary is the chosen one and the section asks nothing, nothing here applies
(:func:`capmerge.merge.model_side.fit_vocabulary` cuts padded rows by reading a prefix).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from capmerge.errors import UsageError
from capmerge.io.names import OUTPUT_EMBEDDINGS, ends_with

ADDED = ("single_word", "lstrip", "rstrip", "normalized", "special")  # an added token's settings
# the settings transformers' add_tokens gives a plain (not special) token
PLAIN = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": True, "special": False}


@dataclass(frozen=True)
class TokenSource:
    """mergekit's ``tokenizer.tokens`` entry of one token: where its row comes from — ``model`` (that model's row
    of the token), ``model_token`` (that model's row of ``token`` or of row ``token_id``), ``zero``, or ``rules``
    (no source: the rules of the module's docstring) —, and ``force``: every model takes that row, also one that
    has the token. ``where``: its place in the configuration."""

    kind: str
    model: str | None = None
    token: str | None = None
    token_id: int | None = None
    force: bool = False
    where: str | None = None


@dataclass
class Vocabulary:
    """The output's vocabulary and how each model's rows map onto it."""

    tokens: dict[str, int]  # output token -> id, 0 .. N - 1
    new: list[dict[str, Any]]  # added_tokens entries appended to the chosen tokenizer.json (union, tokens:)
    perm: dict[int, np.ndarray]  # input index -> its row of each output token (-1: it lacks the token)
    names: set[tuple[int, str]]  # the (input, tensor) pairs read aligned
    base: int | None  # the base's input index (its rows come first for a token some model lacks)
    rows: int = 0  # rows written: the tokens, padded to pad_to_multiple_of (the padding: each model's mean row)
    fixed: dict[int, tuple[str, int | None, int | None, bool]] = dataclasses.field(default_factory=dict)
    # token id -> ("zero" | "row" | "rules", input, its row, force): the tokenizer section's tokens

    def aligned(self, input_: int, name: str) -> bool:
        return (input_, name) in self.names

    @property
    def forced(self) -> set[int]:
        """The token ids the tokenizer section forces (every model takes the row it sets)."""
        return {j for j, f in self.fixed.items() if f[3]}


def token_ids(doc: dict[str, Any]) -> dict[str, int]:
    """A tokenizer.json's token → id: its model's vocabulary (a mapping, or Unigram's list of pieces, the id its
    position) and its added tokens, as transformers' ``get_vocab`` gives them. ValueError where there is none."""
    model = doc.get("model") if isinstance(doc.get("model"), dict) else {}
    vocab = model.get("vocab")
    if isinstance(vocab, dict):
        ids = {str(k): int(i) for k, i in vocab.items()}
    elif isinstance(vocab, list):
        ids = {str(e[0]): i for i, e in enumerate(vocab)}
    else:
        raise ValueError("no vocabulary")
    for t in doc.get("added_tokens") or []:
        ids[str(t["content"])] = int(t["id"])
    return ids


def _readable(doc: dict[str, Any], label: str, where: str | None) -> None:
    """Refuse a tokenizer.json whose tokens cannot be read (UsageError naming whose it is)."""
    try:
        token_ids(doc)
        _added(doc, 1 << 62)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        raise UsageError(f"tokenizer_source: cannot read the tokens of {label}'s tokenizer.json ({type(e).__name__}: "
                         f"{e})", where) from None  # fmt: skip


def _added(doc: dict[str, Any], rows: int) -> dict[str, dict[str, Any]]:
    """A tokenizer.json's added tokens below ``rows``, in id order: content → entry."""
    entries = sorted((t for t in doc.get("added_tokens") or [] if int(t["id"]) < rows), key=lambda t: int(t["id"]))
    return {str(t["content"]): t for t in entries}


def union(docs: list[tuple[dict[str, Any], int]]) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """The union of tokenizers (``docs``: each parsed tokenizer.json with its model's rows, the first the base):
    the first one's tokens, then the others' regular tokens it lacks (in model order, each model's in id order),
    then the added tokens it lacks (first settings seen); returns token → id and the new added-token entries."""
    first = {t: i for t, i in token_ids(docs[0][0]).items() if i < docs[0][1]}
    regular: dict[str, None] = {}
    added: dict[str, dict[str, Any]] = {}
    for doc, rows in docs:
        own = _added(doc, rows)
        for tok, i in sorted(token_ids(doc).items(), key=lambda kv: kv[1]):
            if i < rows and tok not in own:
                regular.setdefault(tok)
        for tok, entry in own.items():
            added.setdefault(tok, entry)
    tokens, new = dict(first), []
    for tok in [t for t in regular if t not in added] + list(added):
        if tok in tokens:
            continue
        entry = added.get(tok, PLAIN)
        tokens[tok] = len(tokens)
        new.append({"id": tokens[tok], "content": tok, **{k: entry.get(k, PLAIN[k]) for k in ADDED}})
    return tokens, new


def plan(p: Any, order: list[int], rows_of: list[int | None], tokenizers: list[dict[str, Any] | None],
         chosen: dict[str, Any] | None, where: str | None, sources: dict[str, TokenSource] | None = None,
         pad_to: int | None = None) -> Vocabulary | None:  # fmt: skip
    """The alignment of a planned merge ``p`` whose models' vocabularies differ from the chosen tokenizer's, or None
    where every model has that vocabulary. ``order``: the inputs, the base (else the first model) first; each
    input's tokenizer.json and config ``vocab_size`` in ``tokenizers`` and ``rows_of``; ``chosen``: the chosen
    tokenizer.json, None for ``union``; ``sources`` and ``pad_to``: the tokenizer section's ``tokens`` (those the
    vocabulary lacks are added) and ``pad_to_multiple_of``. A model without tokenizer.json is taken to have the
    first input's vocabulary (as mergekit assumes), one without
    ``vocab_size`` as many
    rows as its tokenizer has tokens. The vocabulary tensors' records are not touched: :meth:`Planned.info` gives
    their aligned shape."""
    from capmerge.merge.masks import layer_index

    first = tokenizers[order[0]]
    if first is None:
        return None  # nothing to align to (a union has every tokenizer.json: fit_vocabulary refuses one without)
    for doc, label in [(chosen, "the chosen tokenizer")] + [(tokenizers[i], p.inputs[i].ref) for i in order]:
        if doc is not None:
            _readable(doc, label, where)
    docs = {i: tokenizers[i] or first for i in order}
    rows = {i: rows_of[i] if rows_of[i] is not None else len(token_ids(docs[i])) for i in order}
    tokens, new = union([(docs[i], rows[i]) for i in order]) if chosen is None else (token_ids(chosen), [])
    sources = sources or {}
    for tok in sources:  # the section's tokens the vocabulary lacks: added as transformers' add_tokens adds them
        if tok not in tokens:
            tokens[tok] = len(tokens)
            new.append({"id": tokens[tok], "content": tok, **PLAIN})
    by_id = sorted(tokens, key=tokens.__getitem__)
    total = len(by_id) if not pad_to else -(-len(by_id) // pad_to) * pad_to
    perm = {}
    for i in order:
        own = {t: j for t, j in token_ids(docs[i]).items() if j < rows[i]}
        perm[i] = np.array([own.get(t, -1) for t in by_id], dtype=np.int64)
    if (
        not sources
        and total == len(by_id)
        and all(np.array_equal(perm[i], np.arange(len(by_id))) and rows[i] >= len(by_id) for i in order)
    ):
        return None  # one vocabulary: the padded rows, if any, are cut by reading a prefix
    fixed = {tokens[t]: _resolve(p, src, tokens[t], perm, docs, rows) for t, src in sources.items()}
    for i in order:
        if tokenizers[i] is None:
            p.warnings.append(f"tokenizer_source: {p.inputs[i].ref} has no readable tokenizer.json: taken to have the "
                              f"vocabulary of {p.inputs[order[0]].ref}, as mergekit takes it")  # fmt: skip
    nowhere = [j for j in np.flatnonzero(np.all(np.stack([perm[i] < 0 for i in order]), axis=0)) if j not in fixed]
    if len(nowhere):  # mergekit logs each
        shown = ", ".join(repr(by_id[j]) for j in nowhere[:5]) + (", ..." if len(nowhere) > 5 else "")
        p.warnings.append(f"{len(nowhere)} token(s) of the chosen tokenizer are in no model ({shown}): their "
                          "embedding and head rows are zeros")  # fmt: skip
    names: set[tuple[int, str]] = set()
    for i in order:
        m = p.inputs[i]
        found = [x for x, info in m.ck.tensors.items()
                 if layer_index(x) is None and len(info.shape) == 2 and info.shape[0] == rows[i]]  # fmt: skip
        if not found:
            raise UsageError(f"tokenizer_source: {m.ref} has no tensor of {rows[i]} rows (its vocab_size) outside "
                             "the layers to align to the chosen tokenizer's tokens", where)  # fmt: skip
        names.update((i, x) for x in found)
    return Vocabulary(tokens, new, perm, names, p.index[p.spec.base] if p.spec.base is not None else None, total,
                      fixed)  # fmt: skip


def _resolve(p: Any, src: TokenSource, j: int, perm: dict[int, np.ndarray], docs: dict[int, dict[str, Any]],
             rows: dict[int, int]) -> tuple[str, int | None, int | None, bool]:  # fmt: skip
    """A token source as (mode, input, row, force): the model and its row checked now (UsageError at its place)."""
    if src.kind in ("zero", "rules"):
        return src.kind, None, None, src.force
    i = p.index.get(src.model)
    if i is None or i not in perm:
        raise UsageError(f"tokenizer.tokens: {src.model} is not one of the models merged", src.where)
    if src.kind == "model":
        row = int(perm[i][j])
        if row < 0:
            raise UsageError(f"tokenizer.tokens: {src.model} has no such token", src.where)
        return "row", i, row, src.force
    row = token_ids(docs[i]).get(src.token, -1) if src.token is not None else src.token_id  # type: ignore[arg-type]
    if row is None or not 0 <= row < rows[i]:
        what = repr(src.token) if src.token is not None else f"row {src.token_id}"
        raise UsageError(f"tokenizer.tokens: {src.model} has no token {what}", src.where)
    return "row", i, row, src.force


def shape_of(v: Vocabulary, info: Any) -> Any:
    """A vocabulary tensor's record with one row per output token (and the padding)."""
    n, h = v.rows, info.shape[1]
    return dataclasses.replace(info, shape=(n, h), nbytes=n * h * info.itemsize)


def _made(v: Vocabulary, ins: list[int], row: Any, h: int) -> tuple[np.ndarray, Any]:
    """The rows made for the tokens some input of a tensor lacks, and for the forced ones: (their token ids, sorted;
    their float32 rows). ``ins``: the tensor's inputs, the base first where there is one; ``row(i, r)``: input i's
    row r in float32."""
    import torch

    have = np.stack([v.perm[i] >= 0 for i in ins])  # (inputs, tokens)
    made_for = sorted({int(j) for j in np.flatnonzero(have.sum(axis=0) < len(ins))} | v.forced)
    made = torch.zeros(len(made_for), h)
    for k, j in enumerate(made_for):
        mode, src, r, _ = v.fixed.get(j, ("rules", None, None, False))
        if mode == "zero":
            continue
        if mode == "row":
            made[k] = row(src, r)
            continue
        holders = [i for i, hv in zip(ins, have[:, j], strict=True) if hv]
        if not holders:
            continue  # no model has the token: zeros
        if len(holders) > 1 and v.base is not None and v.base in holders:
            holders = [v.base]
        acc = row(holders[0], int(v.perm[holders[0]][j])).clone()
        for i in holders[1:]:
            acc += row(i, int(v.perm[i][j]))
        made[k] = acc / len(holders) if len(holders) > 1 else acc
    return np.array(made_for, dtype=np.int64), made


def _taken(v: Vocabulary, i: int, made_at: np.ndarray, made: Any) -> tuple[np.ndarray, Any]:
    """The rows input i takes from the made ones (:func:`_made`'s ``made_at``, ``made``): the token ids it lacks and
    the forced ones (sorted), and their rows."""
    import torch

    take = np.array(sorted(set(np.flatnonzero(v.perm[i] < 0).tolist()) | v.forced), dtype=np.int64)
    return take, made[torch.from_numpy(np.searchsorted(made_at, take))]


def _name_in(p: Any, i: int, entries: list[Any]) -> str:
    """The name input ``i`` holds the output tensor of ``entries`` under: its entry's; for a token source model
    without an entry here, the tensor's own name, or the embedding it ties its head to where it saves no head."""
    name = next((e.name for e in entries if e.input == i), None)
    if name is not None:
        return name
    name = getattr(entries[0], "match", None) or entries[0].name  # a tied first entry reads its embedding in its place
    if name not in p.inputs[i].ck.tensors and ends_with(name, OUTPUT_EMBEDDINGS):
        name = p.tied_embedding(i) or name
    return name


def read(p: Any, entries: list[Any]) -> dict[int, Any]:
    """The aligned float32 tensors of ``entries`` (one output tensor's inputs, the base first where there is one),
    whole: input index → its rows of the output tokens, lacking ones made as the module says, then the padding rows
    (the mean of its token rows). Each input is read once. The path of the tensors :func:`streams` cannot give."""
    import torch

    v: Vocabulary = p.vocab
    raw: dict[int, Any] = {}
    for e in entries:
        if e.input not in raw:
            raw[e.input] = p.inputs[e.input].read(e.name).float()
    ins = list(raw)
    for _, i, _, _ in v.fixed.values():  # a model named by a token's source, not merged in this tensor
        if i is not None and i not in raw:
            raw[i] = p.inputs[i].read(_name_in(p, i, entries)).float()
    h = raw[ins[0]].shape[1]
    made_at, made = _made(v, ins, lambda i, r: raw[i][r], h)
    n = len(v.tokens)
    out = {}
    for i in ins:  # each model's rows in token order; its own tensor let go once they are made
        idx = torch.from_numpy(v.perm[i])
        t = torch.empty(v.rows, h)
        t[:n] = raw.pop(i)[idx.clamp(min=0)]
        take, rows = _taken(v, i, made_at, made)
        if len(take):
            t[torch.from_numpy(take)] = rows
        if v.rows > n:  # pad_to_multiple_of: the mean of the token rows
            t[n:] = torch.mean(t[:n], dim=0)
        out[i] = t
    return out


class AlignedRows:
    """A :class:`~capmerge.io.lazy.BlockSource`: one input's vocabulary tensor with one row per output token, in
    float32, a block at a time: its own rows read from its file in runs of consecutive rows, the made ones (shared,
    see :func:`_made`) copied in. The same values as :func:`read` gives, without the whole tensor in memory."""

    overflow = False

    def __init__(self, ck: Any, info: Any, perm: np.ndarray, take: np.ndarray, rows: Any, h: int) -> None:
        self.ck, self.info, self.h = ck, info, h
        self.own = perm.copy()
        self.own[take] = -1  # made rows: not read from the file
        self.take, self.rows = take, rows  # token ids (sorted) and their rows

    def fill(self, start: int, end: int, out: Any) -> None:
        import torch

        from capmerge._torch import as_tensor

        h, isz = self.h, self.info.itemsize
        r0, r1 = start // h, -(-end // h)
        whole = start == r0 * h and end == r1 * h  # whole rows: made in out itself
        blk = out.view(r1 - r0, h) if whole else torch.empty((r1 - r0, h))  # every row is read or made
        src = self.own[r0:r1]
        at = np.flatnonzero(src >= 0)
        if len(at):
            s = src[at]
            cut = np.flatnonzero((np.diff(at) != 1) | (np.diff(s) != 1)) + 1
            buf = bytearray(len(at) * h * isz)
            for a, b in zip(np.r_[0, cut], np.r_[cut, len(at)], strict=True):  # runs of consecutive rows
                part = memoryview(buf)[a * h * isz : b * h * isz]
                self.ck.read_into(self.info, int(s[a]) * h * isz, part)
                blk[at[a] : at[a] + b - a] = as_tensor(part, self.info.dtype, (b - a, h))
        lo, hi = np.searchsorted(self.take, [r0, r1])
        if hi > lo:
            blk[torch.from_numpy(self.take[lo:hi] - r0)] = self.rows[lo:hi]
        if not whole:
            out.copy_(blk.reshape(-1)[start - r0 * h : end - r0 * h])


def streams(p: Any, entries: list[Any]) -> dict[int, tuple[Any, Any]] | None:
    """The aligned inputs of one output tensor as block sources: input index → (a lazy checkpoint, its float32
    record of one row per output token) for each input read aligned; the others read as they are. None where the
    tensor needs :func:`read` instead: padding rows (each model's mean row needs its whole tensor) or a LoRA
    input. The made rows are built here, from single rows of the inputs' files."""
    from capmerge._torch import as_tensor
    from capmerge.io.checkpoint import TensorInfo
    from capmerge.io.lazy import LazyCheckpoint

    v: Vocabulary = p.vocab
    ins = list(dict.fromkeys(e.input for e in entries))
    sources = {i for _, i, _, _ in v.fixed.values() if i is not None}
    if v.rows > len(v.tokens) or any(p.inputs[i].lora is not None for i in {*ins, *sources}):
        return None
    names = {i: _name_in(p, i, entries) for i in {*ins, *sources}}  # a tied model's head is its embedding
    h = p.inputs[ins[0]].ck.tensors[names[ins[0]]].shape[1]

    def row(i: int, r: int) -> Any:
        info = p.inputs[i].ck.tensors[names[i]]
        buf = bytearray(h * info.itemsize)
        p.inputs[i].ck.read_into(info, r * h * info.itemsize, memoryview(buf))
        return as_tensor(buf, info.dtype, (h,)).float()

    made_at, made = _made(v, ins, row, h)
    out = {}
    for e in entries:
        if not v.aligned(e.input, e.name) or e.input in out:
            continue
        ck, info = p.inputs[e.input].ck, p.inputs[e.input].ck.tensors[e.name]
        take, rows = _taken(v, e.input, made_at, made)
        rec = TensorInfo(e.name, "F32", (v.rows, h), "", 0, v.rows * h * 4)

        def opener(ck: Any = ck, info: Any = info, i: int = e.input, take: Any = take, rows: Any = rows) -> Any:
            return AlignedRows(ck, info, v.perm[i], take, rows, h)

        stored = {"storage": "dense", "nbytes": info.nbytes, "dtype": info.dtype}  # what is read: its own tensor
        lazy = LazyCheckpoint(f"{p.inputs[e.input].ref} (aligned rows)", [], {e.name: rec}, {}, blocks={e.name: opener},
                              storages={e.name: stored})  # fmt: skip
        out[e.input] = (lazy, rec)
    return out


def write_tokenizer(v: Vocabulary, path_for: Any, json_text: Any) -> list[str]:
    """Append the union's new tokens to the copied tokenizer.json and to tokenizer_config.json's
    ``added_tokens_decoder`` (``path_for(name)``: where the output's file is; ``json_text(name, doc)`` writes it).
    Returns the files rewritten."""
    from capmerge.io.checkpoint import read_json_file

    done = []
    tj, tc = path_for("tokenizer.json"), path_for("tokenizer_config.json")
    if v.new and tj.is_file():
        doc = read_json_file(tj, "tokenizer.json")
        if not isinstance(doc, dict):
            raise UsageError("tokenizer_source: union: tokenizer.json is not a JSON object", str(tj))
        doc["added_tokens"] = list(doc.get("added_tokens") or []) + v.new
        json_text("tokenizer.json", doc)
        done.append("tokenizer.json")
    if v.new and tc.is_file():
        cfg = read_json_file(tc, "tokenizer_config.json")
        if isinstance(cfg, dict) and isinstance(cfg.get("added_tokens_decoder"), dict):
            for e in v.new:
                cfg["added_tokens_decoder"][str(e["id"])] = {"content": e["content"], **{k: e[k] for k in ADDED}}
            json_text("tokenizer_config.json", cfg)
            done.append("tokenizer_config.json")
    return done
