"""Continual learning with memory layers: sparse memory finetuning and its baselines.

Lin et al., "Continual Learning via Sparse Memory Finetuning" (arXiv 2510.15103, Sec. 3) teach a
memory-layer LM new facts by updating, for every training batch, only the ``t`` memory rows that
this batch reads much more often than the pretraining data does.  The rows are ranked by TF-IDF
over row reads: a batch is a "document", a row is a "term".  The rest of the model stays frozen,
so whatever the other rows and the dense weights knew cannot be overwritten.  A follow-up
(Goyal et al., "Improving Sparse Memory Finetuning", arXiv 2604.05248) ranks rows by how much they
contribute to the KL divergence between the batch's read distribution and the background's.

The pieces, each small and tested (``tests/test_continual.py``):

* **read statistics** -- :func:`read_counts` (reads per row of one batch, per memory layer, from the
  ``MemoryOutput.indices`` the model returns: physical table rows, after UltraMem/UltraMemV2's row
  mapping) and :func:`slot_stats` (total reads and document frequency over a background corpus);
* **rankings** -- :func:`tfidf_scores`, :func:`kl_scores` and the selection :func:`top_t`;
* **freezing** -- :func:`value_tables` (the tables each layer's indices address), :func:`row_masks`,
  :func:`mask_gradients_` and :func:`step_keeping_rows`, which keeps every unselected row *bitwise*
  unchanged under any optimiser (see its docstring for why masking gradients is not enough);
* **LoRA** -- :class:`LoRALinear` and :func:`add_lora` (Hu et al., arXiv 2106.09685);
* **the loop** -- :class:`FinetuneConfig` and :func:`finetune`: full finetuning, LoRA, all memory
  values, or sparse memory finetuning, with SGD or AdamW.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .checks import require_positive_int
from .layers import MemoryOutput, MemoryPlus, UltraMemV2, refresh_rank1
from .metrics import slot_counts
from .optim import param_groups

METHODS = ("full", "lora", "values", "sparse")
OPTIMIZERS = ("sgd", "adamw")
RULES = ("tfidf", "kl")
LORA_TARGETS = ("attn.qkv", "attn.proj", "ffn.gate", "ffn.up", "ffn.down")
IGNORE = -100

# ---------------------------------------------------------------------------------------------
# Which tables a memory layer's indices address
# ---------------------------------------------------------------------------------------------


def value_tables(model: nn.Module) -> list[tuple[nn.Parameter | None, nn.Parameter]]:
    """``(pre_values or None, values)`` addressed by each memory layer's ``MemoryOutput.indices``.

    UltraMemV2 layers may share one :class:`~umv2_ref.layers.ValuePool` and Memory+ layers one
    :class:`~umv2_ref.layers.ValueTable`: then several entries hold the *same* parameters, and a
    row is one row of the shared table.
    """
    tables = []
    for layer in model.memory:
        if isinstance(layer, UltraMemV2):
            tables.append(layer.tables())
        elif isinstance(layer, MemoryPlus):
            tables.append((None, layer.table()))  # its own values or a shared ValueTable
        else:
            tables.append((getattr(layer, "pre_values", None), layer.values))
    if not tables:
        raise ValueError(f"model has no memory layer (ffn={model.cfg.ffn!r}); sparse memory finetuning needs one")
    return tables


def table_sizes(model: nn.Module) -> list[int]:
    """Rows of the value table of each memory layer."""
    return [values.shape[0] for _, values in value_tables(model)]


# ---------------------------------------------------------------------------------------------
# Read statistics
# ---------------------------------------------------------------------------------------------


def read_counts(memory: list[MemoryOutput], sizes: list[int], where: Tensor | None = None) -> list[Tensor]:
    """Reads per table row of one batch, per memory layer: ``[N_l]`` float64 each.

    ``memory`` is ``LMOutput.memory`` of a forward pass; every position of the batch counts (as
    in arXiv 2510.15103), or only the positions where the bool mask ``where [B, T]`` is True.
    """
    if len(memory) != len(sizes):
        raise ValueError(f"memory has {len(memory)} layer outputs but sizes lists {len(sizes)} tables")
    counts = []
    for out, n in zip(memory, sizes):
        idx = out.indices  # [B, T, S]
        if where is not None:
            if where.shape != idx.shape[:-1] or where.dtype != torch.bool:
                raise ValueError(f"where must be a bool tensor of shape {tuple(idx.shape[:-1])}, "
                                 f"got {where.dtype} {tuple(where.shape)}")
            idx = idx[where]  # [K, S]
        counts.append(slot_counts(idx, n))
    return counts


@torch.no_grad()
def batch_counts(model: nn.Module, tokens: Tensor, where: Tensor | None = None) -> list[Tensor]:
    """:func:`read_counts` of one forward pass of ``model`` (eval mode) over ``tokens [B, T]``."""
    was_training = model.training
    model.eval()
    out = model(tokens)
    model.train(was_training)
    return read_counts(out.memory, table_sizes(model), where)


@dataclass
class SlotStats:
    """Row reads of a background corpus of ``n_docs`` documents (batches), per memory layer."""

    counts: list[Tensor]  # [N_l] float64: total reads of each row
    doc_freq: list[Tensor]  # [N_l] float64: documents in which each row was read at least once
    n_docs: int

    def __post_init__(self) -> None:
        require_positive_int("n_docs", self.n_docs)
        if len(self.counts) != len(self.doc_freq):
            raise ValueError(f"counts and doc_freq list {len(self.counts)} and {len(self.doc_freq)} layers")
        for c, df in zip(self.counts, self.doc_freq):
            if c.shape != df.shape or c.dim() != 1:
                raise ValueError(f"counts and doc_freq must be matching 1-D tensors, got {tuple(c.shape)}, {tuple(df.shape)}")
            if bool((df > self.n_docs).any()) or bool((df > c).any()):
                raise ValueError("doc_freq cannot exceed n_docs nor the row's read count")


def slot_stats(model: nn.Module, batches: Iterable[Tensor]) -> SlotStats:
    """Read counts and document frequencies over ``batches`` (each ``[B, T]`` tokens is one document)."""
    sizes = table_sizes(model)
    counts = [torch.zeros(n, dtype=torch.float64) for n in sizes]
    doc_freq = [torch.zeros(n, dtype=torch.float64) for n in sizes]
    n_docs = 0
    for tokens in batches:
        for j, c in enumerate(batch_counts(model, tokens)):
            counts[j] += c
            doc_freq[j] += (c > 0).double()
        n_docs += 1
    if n_docs == 0:
        raise ValueError("batches is empty: the background corpus needs at least one document")
    return SlotStats(counts, doc_freq, n_docs)


# ---------------------------------------------------------------------------------------------
# Rankings: TF-IDF (arXiv 2510.15103) and the KL rule (arXiv 2604.05248)
# ---------------------------------------------------------------------------------------------


def _check_counts(name: str, counts: Tensor) -> None:
    if not isinstance(counts, Tensor) or counts.dim() != 1 or not counts.is_floating_point():
        raise ValueError(f"{name} must be a 1-D float tensor of per-row counts")
    if bool((counts < 0).any()):
        raise ValueError(f"{name} must be non-negative")


def tfidf_scores(batch: Tensor, doc_freq: Tensor, n_docs: int) -> Tensor:
    """TF-IDF of every row ``[N]`` (float64) for one batch of new data.

    ``tf(i) = c(i) / sum_j c(j)`` with ``c`` the batch's reads (``batch [N]``); ``idf(i) =
    log((n_docs + 1) / (df(i) + 1))`` with ``df(i)`` the number of background documents that read
    row i.  A row read by every background document scores 0 however often the batch reads it.
    """
    _check_counts("batch", batch)
    _check_counts("doc_freq", doc_freq)
    require_positive_int("n_docs", n_docs)
    if batch.shape != doc_freq.shape:
        raise ValueError(f"batch {tuple(batch.shape)} and doc_freq {tuple(doc_freq.shape)} must have the same shape")
    if batch.sum() <= 0:
        raise ValueError("batch has no reads")
    if bool((doc_freq > n_docs).any()):
        raise ValueError(f"doc_freq cannot exceed n_docs={n_docs}")
    tf = batch.double() / batch.double().sum()
    idf = torch.log((n_docs + 1) / (doc_freq.double() + 1))
    return tf * idf


def kl_scores(batch: Tensor, background: Tensor, smoothing: float = 1.0) -> Tensor:
    """Each row's term ``p(i) log(p(i) / q(i))`` of ``KL(p || q)``, ``[N]`` float64.

    ``p`` is the batch's read distribution, ``q`` the background's with ``smoothing`` added to
    every row's count (so a row the background never read has a finite, large surprise).  The terms
    sum to ``KL(p || q)``; rows the batch does not read contribute 0.  This is our reading of the
    KL slot selection of arXiv 2604.05248 (surprise of the batch's reads relative to the background).
    """
    _check_counts("batch", batch)
    _check_counts("background", background)
    if batch.shape != background.shape:
        raise ValueError(f"batch {tuple(batch.shape)} and background {tuple(background.shape)} must have the same shape")
    if not smoothing > 0:
        raise ValueError(f"smoothing must be positive, got {smoothing}")
    if batch.sum() <= 0:
        raise ValueError("batch has no reads")
    p = batch.double() / batch.double().sum()
    q = (background.double() + smoothing) / (background.double().sum() + smoothing * background.numel())
    return torch.where(p > 0, p * torch.log(p / q), torch.zeros_like(p))


def top_t(scores: Tensor, batch: Tensor, t: int) -> Tensor:
    """The ``min(t, #rows read)`` rows *read by the batch* with the highest scores, best first.

    Ties go to the lower row index (a stable sort), so the selection is deterministic.
    """
    require_positive_int("t", t)
    if scores.shape != batch.shape or scores.dim() != 1:
        raise ValueError(f"scores {tuple(scores.shape)} and batch {tuple(batch.shape)} must be matching 1-D tensors")
    read = batch > 0
    ranked = torch.where(read, scores.double(), torch.full_like(scores, -math.inf, dtype=torch.float64))
    order = torch.sort(ranked, descending=True, stable=True).indices
    return order[:min(t, int(read.sum()))]


def select_rows(batch: list[Tensor], background: SlotStats, t: int, rule: str = "tfidf",
                smoothing: float = 1.0) -> list[Tensor]:
    """The top-``t`` rows of every memory layer for one batch (``batch`` from :func:`read_counts`)."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if len(batch) != len(background.counts):
        raise ValueError(f"batch has {len(batch)} layers but background has {len(background.counts)}")
    rows = []
    for c, bg, df in zip(batch, background.counts, background.doc_freq):
        scores = tfidf_scores(c, df, background.n_docs) if rule == "tfidf" else kl_scores(c, bg, smoothing)
        rows.append(top_t(scores, c, t))
    return rows


# ---------------------------------------------------------------------------------------------
# Freezing every row outside the selection
# ---------------------------------------------------------------------------------------------


def row_masks(model: nn.Module, rows: list[Tensor], pre_values: bool = False) -> dict[nn.Parameter, Tensor]:
    """``{table: bool [N]}``: the rows allowed to change (values, and pre-values if asked).

    Layers sharing a table (a value pool) get the union of their selections.
    """
    tables = value_tables(model)
    if len(rows) != len(tables):
        raise ValueError(f"rows lists {len(rows)} layers, the model has {len(tables)} memory layers")
    masks: dict[nn.Parameter, Tensor] = {}
    for (pre, values), r in zip(tables, rows):
        for table in (values, pre if pre_values else None):
            if table is None:
                continue
            mask = masks.setdefault(table, torch.zeros(table.shape[0], dtype=torch.bool, device=table.device))
            mask[r] = True
    return masks


@torch.no_grad()
def mask_gradients_(masks: dict[nn.Parameter, Tensor]) -> None:
    """Zero the gradient of every row outside its table's mask (before clipping and stepping)."""
    for table, keep in masks.items():
        if table.grad is not None:
            table.grad[~keep] = 0


@contextmanager
def step_keeping_rows(optimizer: torch.optim.Optimizer, masks: dict[nn.Parameter, Tensor]) -> Iterator[None]:
    """Run ``optimizer.step()`` inside this block: rows outside the masks come out bitwise unchanged.

    Zeroing their gradients is enough for plain SGD, but not for AdamW (or SGD with momentum or
    weight decay): decoupled weight decay shrinks *every* row each step, and a row selected at an
    earlier step keeps moving on its first-moment estimate after it has left the selection.  So the
    unselected rows of each table -- and of its optimiser state tensors (moments, momentum) -- are
    copied before the step and written back after it: frozen rows keep their parameters *and* their
    optimiser state, like a lazily updated sparse optimiser.  (AdamW's step counter is shared by the
    whole table, so a row's bias correction counts every step of the run.)
    """
    saved = []
    for table, keep in masks.items():
        frozen = ~keep
        state = optimizer.state.get(table, {})
        tensors = [table] + [s for s in state.values() if isinstance(s, Tensor) and s.shape == table.shape]
        saved.append((frozen, [(x, x.detach()[frozen].clone()) for x in tensors]))
    yield
    with torch.no_grad():
        for frozen, copies in saved:
            for x, rows in copies:
                x[frozen] = rows


# ---------------------------------------------------------------------------------------------
# LoRA (Hu et al., arXiv 2106.09685)
# ---------------------------------------------------------------------------------------------


class LoRALinear(nn.Module):
    """``y = W x + (alpha / r) B A x`` with the base ``W`` frozen, ``A [r, in]`` random, ``B [out, r]`` zero.

    At initialisation the layer computes exactly what the base layer did (``B = 0``).
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        require_positive_int("rank", rank)
        self.base = base
        base.requires_grad_(False)
        self.scale = alpha / rank
        self.lora_a = nn.Parameter(torch.randn(rank, base.in_features) / math.sqrt(base.in_features))  # [r, in]
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))  # [out, r]

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + F.linear(F.linear(x, self.lora_a), self.lora_b) * self.scale  # [..., out]

    def merged_weight(self) -> Tensor:
        """The equivalent dense weight ``W + (alpha / r) B A``, ``[out, in]``."""
        return self.base.weight + self.scale * self.lora_b @ self.lora_a


def add_lora(model: nn.Module, rank: int = 4, alpha: float = 8.0, targets: tuple[str, ...] = LORA_TARGETS) -> list[nn.Parameter]:
    """Wrap every block's ``targets`` linears (attention and SwiGLU FFN) in :class:`LoRALinear`.

    Freezes every other parameter of the model and returns the LoRA parameters.
    """
    model.requires_grad_(False)
    params = []
    for block in model.blocks:
        for path in targets:
            parent_name, name = path.rsplit(".", 1)
            parent = getattr(block, parent_name, None)
            base = getattr(parent, name, None) if parent is not None else None
            if not isinstance(base, nn.Linear):
                continue  # e.g. a block whose FFN is a memory layer or an MoE
            lora = LoRALinear(base, rank, alpha)
            setattr(parent, name, lora)
            params += [lora.lora_a, lora.lora_b]
    if not params:
        raise ValueError(f"no nn.Linear found at {targets} in the model's blocks")
    return params


# ---------------------------------------------------------------------------------------------
# The finetuning loop
# ---------------------------------------------------------------------------------------------


@dataclass
class FinetuneConfig:
    """One finetuning run on new data.  ``lr`` is the (constant) learning rate."""

    method: str = "sparse"  # full | lora | values | sparse
    optimizer: str = "sgd"  # sgd (plain: no momentum, no weight decay) | adamw
    lr: float = 1.0
    steps: int = 100
    t: int = 64  # sparse: rows per memory layer updated per batch (the paper's top-t)
    rule: str = "tfidf"  # sparse: tfidf (arXiv 2510.15103) | kl (arXiv 2604.05248)
    kl_smoothing: float = 1.0
    pre_values: bool = True  # values / sparse: also update the pre-values (UltraMemV2, PEER)
    lora_rank: int = 4
    lora_alpha: float = 8.0
    weight_decay: float = 0.1  # AdamW only (decoupled; matrices and memory tables, as in pretraining)
    value_lr_mult: float = 1.0  # full + AdamW: the memory-table group's multiplier (as in pretraining)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    eval_every: int = 10

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"FinetuneConfig.method must be one of {METHODS}, got {self.method!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"FinetuneConfig.optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.rule not in RULES:
            raise ValueError(f"FinetuneConfig.rule must be one of {RULES}, got {self.rule!r}")
        for name in ("steps", "t", "lora_rank", "eval_every"):
            require_positive_int(f"FinetuneConfig.{name}", getattr(self, name))
        if not self.lr > 0:
            raise ValueError(f"FinetuneConfig.lr must be positive, got {self.lr}")


def trainable_parameters(model: nn.Module, cfg: FinetuneConfig) -> list[nn.Parameter]:
    """Set ``requires_grad`` for ``cfg.method`` (LoRA modules are inserted here) and return the trainable list."""
    if cfg.method == "lora":
        return add_lora(model, cfg.lora_rank, cfg.lora_alpha)
    if cfg.method == "full":
        model.requires_grad_(True)
        return list(model.parameters())
    model.requires_grad_(False)
    params: list[nn.Parameter] = []
    for pre, values in value_tables(model):
        for table in (values, pre if cfg.pre_values else None):
            if table is not None and all(table is not p for p in params):
                table.requires_grad_(True)
                params.append(table)
    return params


def make_optimizer(model: nn.Module, params: list[nn.Parameter], cfg: FinetuneConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr)
    if cfg.method == "full":  # the pretraining groups: decayed matrices, plain vectors, memory tables
        return torch.optim.AdamW(param_groups(model, cfg.lr, cfg.weight_decay, cfg.value_lr_mult), betas=cfg.betas)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas)


def finetune(model: nn.Module, cfg: FinetuneConfig, next_batch: Callable[[], tuple[Tensor, Tensor]],
             background: SlotStats | None = None, evaluate: Callable[[nn.Module], dict] | None = None,
             on_step: Callable[[int, list[Tensor] | None], None] | None = None) -> dict:
    """Finetune ``model`` in place on batches from ``next_batch()`` (``inputs, targets`` ``[B, T]``).

    ``background`` (from :func:`slot_stats`) is needed by ``method="sparse"``.  ``evaluate(model)``
    is called at step 0, every ``cfg.eval_every`` steps and at the end; ``on_step(step, rows)``
    after every step (``rows``: the rows per layer the step updated, or None).  Returns
    ``{"config", "history": [{"step", "loss", **evaluate}], "rows_touched": [distinct rows per
    layer], "rows_per_step": mean rows per layer per step}``.
    """
    if cfg.method == "sparse" and background is None:
        raise ValueError("method='sparse' needs background= (slot_stats over the pretraining data)")
    params = trainable_parameters(model, cfg)
    optimizer = make_optimizer(model, params, cfg)
    sizes = table_sizes(model) if cfg.method == "sparse" else []
    touched = [torch.zeros(n, dtype=torch.bool) for n in sizes]
    history, selected = [], []
    if evaluate is not None:
        history.append({"step": 0, "loss": float("nan"), **evaluate(model)})
    model.train()
    for step in range(1, cfg.steps + 1):
        x, y = next_batch()
        out = model(x)  # LMOutput; out.memory carries each layer's physical rows read
        loss = F.cross_entropy(out.logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE)
        loss = loss + sum(out.aux_losses.values(), loss.new_zeros(()))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()} at finetuning step {step} ({cfg.method}, lr {cfg.lr})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        rows, masks = None, {}
        if cfg.method == "sparse":
            rows = select_rows(read_counts(out.memory, sizes), background, cfg.t, cfg.rule, cfg.kl_smoothing)
            masks = row_masks(model, rows, cfg.pre_values)
            mask_gradients_(masks)
            for j, r in enumerate(rows):
                touched[j][r] = True
            selected.append(sum(len(r) for r in rows) / len(rows))
        nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        with step_keeping_rows(optimizer, masks):
            optimizer.step()
        refresh_rank1(model)
        if on_step is not None:
            on_step(step, rows)
        if evaluate is not None and (step % cfg.eval_every == 0 or step == cfg.steps):
            history.append({"step": step, "loss": loss.item(), **evaluate(model)})
            model.train()
    model.eval()
    return {"config": asdict(cfg), "history": history, "rows_touched": [int(t.sum()) for t in touched],
            "rows_per_step": sum(selected) / len(selected) if selected else None}
