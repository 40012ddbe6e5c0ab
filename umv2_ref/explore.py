"""Look inside a trained memory: per-token traces, what a slot stores, knock-outs, an explorer widget.

    python -m umv2_ref.explore --model ultramemv2 --text "def f(x):\\n    return x"   # per-layer table

* :func:`trace` runs a :class:`~umv2_ref.model.TinyLM` on one sequence and returns one
  :class:`LayerTrace` per memory layer: for every position the physical rows read, their grid cells
  (row key, column key), the scores (per core for TDQKR), the pre-scores (PEER, UltraMemV2), each
  slot's contribution to the layer output in model space, and the layer output.  The decomposition
  is exact: ``contributions.sum(1) + residual == output`` (the residual is an output bias, zeros
  where there is none), checked on every call against the layer's own forward.
* :func:`top_contexts`: which corpus positions read a given row most strongly (the PKM paper's
  look at what a memory slot stores, arXiv 1907.05242 Sec. 4.5).
* :func:`knockout` / :func:`knockout_eval`: evaluate with memory layers or FFNs zeroed -- where
  does the model keep what it knows?
* :func:`pretrained`: the small trained models of notebooks 06 and 08, trained once (quick size)
  and cached under ``build/models``, or loaded from ``data/models`` where the repository ships them.
* :func:`explorer`: an ipywidgets view (text, position, layer, slot) drawn by
  :func:`umv2_ref.viz.trace_panel`.

The decomposition uses only each layer's public pieces (its ``retrieval`` module, value tables and
projections), the same ones its ``forward`` uses.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .layers import PEER, PKM, MemoryOutput, MemoryPlus, UltraMem, UltraMemV2
from .model import MoE, TinyLM
from .synthetic import CAPACITY_FACTS, IGNORE
from .values import get_activation

LAYER_KINDS = {PKM: "pkm", PEER: "peer", MemoryPlus: "memoryplus", UltraMem: "ultramem", UltraMemV2: "ultramemv2"}
CACHE_DIR = Path("build") / "models"
SHIPPED_DIR = Path(__file__).resolve().parents[1] / "data" / "models"  # trained models shipped with the repository
CONTRACT_ATOL = 1e-4  # |sum of contributions + residual - layer output|, relative to the output's scale


# ---------------------------------------------------------------------------------------------
# The decomposition of one memory layer: slot contributions in model space
# ---------------------------------------------------------------------------------------------


@dataclass
class Decomposition:
    """A memory layer's output split into one term per read slot, for inputs ``x [..., d]``."""

    indices: Tensor  # [..., S] physical rows read
    grid_rows: Tensor  # [..., S] row key of each slot's grid cell
    grid_cols: Tensor  # [..., S] column key
    heads: Tensor | None  # [..., S] retrieval head of each slot (PKM family, UltraMem v1), None for UltraMemV2
    blocks: Tensor | None  # [..., S] UltraMem v1 virtual block (which projector), else None
    scores: Tensor  # [..., S] weights used, or [..., S, c] per-core scores
    pre_scores: Tensor | None  # [..., S] <pre-value, input> (PEER, UltraMemV2), else None
    contributions: Tensor  # [..., S, d] each slot's term of the output
    residual: Tensor  # [..., d] output bias (zeros where there is none)


def _sliced(rows: Tensor, weights: Tensor) -> Tensor:
    """Per-slot weighted rows: ``rows [..., S, D]`` times ``weights [..., S]`` or per-core ``[..., S, c]``
    (core c weights channel slice c, as :func:`umv2_ref.values.pool`) -> ``[..., S, D]``."""
    if weights.dim() == rows.dim() - 1:
        return rows * weights[..., None]
    c = weights.shape[-1]
    return (rows.unflatten(-1, (c, rows.shape[-1] // c)) * weights[..., None]).flatten(-2)


def _product_key_slots(layer: PKM | PEER | MemoryPlus, idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Grid cells and heads of PKM-family slot ids ``i * n + j`` ([..., H*k], heads flattened)."""
    n, k = layer.cfg.n_keys, layer.cfg.topk
    heads = torch.arange(layer.cfg.heads, device=idx.device).repeat_interleave(k).expand_as(idx)
    return idx // n, idx % n, heads


def decompose(layer: nn.Module, x: Tensor) -> Decomposition:
    """Split ``layer(x).output`` into per-slot contributions, for any of the five layer kinds.

    PKM: ``w_s V[i_s]``.  PEER: ``w_s act(<u_i, x>) v_i``.  Memory+: ``W_2 ((w_s V[i_s]) * silu(W_1 x))``
    plus the residual ``b_2`` (V: the layer's own or the shared table).  UltraMem v1: ``W_e (s_s .
    V[row_s])`` over the H*m slots of all heads, ``e`` the slot's virtual block.  UltraMemV2: ``W_v ((<P[i], W_pre x> s_s) . V[i])``; ``.`` weights core c's channel slice
    by the core's score.
    """
    if isinstance(layer, (PKM, PEER, MemoryPlus)):
        w, idx = layer.retrieval(x)  # [..., S]
        rows, cols, heads = _product_key_slots(layer, idx)
        pre = None
        if isinstance(layer, PKM):
            contrib = _sliced(layer.values[idx], w)  # [..., S, d]
            residual = x.new_zeros(x.shape)
        elif isinstance(layer, PEER):
            pre = torch.einsum("...sd,...d->...s", layer.pre_values[idx], x)  # [..., S]
            act = get_activation(layer.activation)
            contrib = _sliced(layer.values[idx], w * (act(pre) if act else pre))  # [..., S, d]
            residual = x.new_zeros(x.shape)
        else:
            gate = F.silu(layer.gate(x))  # [..., D_v]
            contrib = (_sliced(layer.table()[idx], w) * gate[..., None, :]) @ layer.out.weight.T  # [..., S, d]
            residual = layer.out.bias.expand(x.shape)  # [..., d]
        return Decomposition(idx, rows, cols, heads, None, w, pre, contrib, residual)
    if isinstance(layer, UltraMem):
        scores, virtual, _ = layer.retrieval(x)  # [..., H*m, c], [..., H*m] head-major
        n, n_rows, E = layer.cfg.n_keys, layer.cfg.n_rows, layer.cfg.expand
        heads = torch.arange(layer.cfg.heads, device=x.device).repeat_interleave(layer.cfg.topm)  # [H*m]
        physical = layer.shuffle[virtual]  # [..., H*m]
        rows, blocks = physical % n_rows, physical // n_rows  # [..., H*m]
        weighted = _sliced(layer.values[rows], scores)  # [..., H*m, D_v]
        proj = layer.proj.weight.view(layer.cfg.d_model, E, -1)  # [d, E, D_v] = [W_1 ... W_E]
        onehot = F.one_hot(blocks, E).to(weighted.dtype)  # [..., H*m, E]
        contrib = torch.einsum("...mv,...me,dev->...md", weighted, onehot, proj)  # [..., H*m, d]
        return Decomposition(rows, virtual // n, virtual % n, heads.expand_as(virtual), blocks, scores, None,
                             contrib, x.new_zeros(x.shape))
    if isinstance(layer, UltraMemV2):
        scores, virtual, _ = layer.retrieval(x)  # [..., m, c], [..., m]
        rows = layer.physical_rows(virtual)  # [..., m]
        pre_values, values = layer.tables()
        pre = torch.einsum("...mp,...p->...m", pre_values[rows], layer.pre_proj(x))  # [..., m]
        act = get_activation(layer.cfg.activation)
        weights = (act(pre) if act else pre)[..., None] * scores  # [..., m, c]
        contrib = _sliced(values[rows], weights) @ layer.out_proj.weight.T  # [..., m, d]
        n = layer.cfg.n_keys
        return Decomposition(rows, virtual // n, virtual % n, None, None, scores, pre, contrib, x.new_zeros(x.shape))
    raise TypeError(f"decompose: no decomposition for {type(layer).__name__}")


def check_contract(dec: Decomposition, output: Tensor, what: str = "memory layer") -> float:
    """Raise unless ``contributions.sum(-2) + residual`` equals ``output``; returns the max abs error."""
    total = dec.contributions.sum(-2) + dec.residual
    err = (total - output).abs().max().item() if output.numel() else 0.0
    scale = max(1.0, output.abs().max().item() if output.numel() else 1.0)
    if not err <= CONTRACT_ATOL * scale:
        raise RuntimeError(f"{what}: slot contributions do not add up to the layer output (max error {err:.3g}); "
                           "the layer's forward changed -- update umv2_ref.explore.decompose")
    return err


# ---------------------------------------------------------------------------------------------
# Hooks: what every block and memory layer saw and produced
# ---------------------------------------------------------------------------------------------


@dataclass
class Capture:
    """Inputs and outputs recorded during one forward (``[B, T, d]`` each)."""

    memory_in: dict[int, Tensor]  # memory layer j -> its input
    memory_out: dict[int, MemoryOutput]  # memory layer j -> its output
    ffn_out: dict[int, Tensor]  # block l -> FFN output (blocks with an FFN)
    stream: dict[int, Tensor]  # block l -> residual stream after attention (the FFN's un-normed input)
    final: Tensor | None = None  # the final norm's input x_L


@contextlib.contextmanager
def capture(model: TinyLM) -> Iterator[Capture]:
    """Record memory inputs/outputs, FFN outputs and residual streams of the forwards run inside."""
    cap = Capture({}, {}, {}, {})
    handles = []

    def on_memory(j):
        def hook(module, args, out):
            cap.memory_in[j], cap.memory_out[j] = args[0], out
        return hook

    def on_ffn(b):
        def hook(module, args, out):
            cap.ffn_out[b] = out[0] if isinstance(out, tuple) else out
        return hook

    def on_stream(b):
        def hook(module, args, out):
            cap.stream[b] = args[0]
        return hook

    def on_final(module, args, out):
        cap.final = args[0]

    try:
        for j, layer in enumerate(model.memory):
            handles.append(layer.register_forward_hook(on_memory(j)))
        for b, block in enumerate(model.blocks):
            handles.append(block.ffn_norm.register_forward_hook(on_stream(b)))
            if block.ffn is not None:
                handles.append(block.ffn.register_forward_hook(on_ffn(b)))
        handles.append(model.norm.register_forward_hook(on_final))
        yield cap
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------------------------------------
# trace: one record per memory layer for one sequence
# ---------------------------------------------------------------------------------------------


@dataclass
class LayerTrace:
    """What memory layer ``layer`` did at every position of one sequence of T tokens."""

    layer: int  # index into model.memory
    kind: str  # pkm | peer | memoryplus | ultramem | ultramemv2
    read_block: int  # the block whose normalised FFN input it reads
    write_block: int  # the block after which its output is added
    n_keys: int  # keys per grid axis (grid slots i * n + j)
    indices: Tensor  # [T, S] physical rows read
    grid_rows: Tensor  # [T, S] row key of each slot
    grid_cols: Tensor  # [T, S] column key
    heads: Tensor | None  # [T, S] retrieval head (PKM family, UltraMem v1) or None (one head)
    blocks: Tensor | None  # [T, S] UltraMem v1 virtual block or None
    scores: Tensor  # [T, S] or per-core [T, S, c]
    pre_scores: Tensor | None  # [T, S] (PEER, UltraMemV2) or None
    contributions: Tensor  # [T, S, d_model]
    residual: Tensor  # [T, d_model]
    output: Tensor  # [T, d_model] the layer's own output
    inputs: Tensor  # [T, d_model] what the layer read
    ffn_output: Tensor | None  # [T, d_model] FFN output of the write block (None if it has none)
    stream: Tensor  # [T, d_model] residual stream of the write block after attention
    final_rms: Tensor  # [T] RMS of the final residual stream (for direct logit attribution)
    axis_scores: tuple[Tensor, Tensor]  # row / column key scores: PKM [T, H, n]; UltraMem [T, H, n, r]; V2 [T, n, r]
    cores: Tensor | None  # Tucker cores: UltraMem [H, c, r, r]; UltraMemV2 [c, r, r]; None for product keys

    @property
    def slot_norms(self) -> Tensor:
        """``||contribution||`` of every read slot, ``[T, S]``."""
        return self.contributions.norm(dim=-1)

    def grid(self, t: int, head: int = 0) -> Tensor:
        """The ``[n, n]`` key-grid scores of ``head`` at position ``t`` (TDQKR: summed over cores)."""
        s_row, s_col = self.axis_scores
        if self.cores is None:
            return s_row[t, head][:, None] + s_col[t, head][None, :]
        if self.cores.dim() == 4:  # one set of keys and cores per head
            return torch.einsum("ia,cab,jb->ij", s_row[t, head], self.cores[head], s_col[t, head])
        return torch.einsum("ia,cab,jb->ij", s_row[t], self.cores, s_col[t])

    def norms(self, t: int) -> dict[str, float]:
        """RMS of the memory output, the FFN output and the residual stream at position ``t``."""
        rms = lambda v: v.pow(2).mean().sqrt().item()  # noqa: E731
        return {"memory": rms(self.output[t]), "ffn": rms(self.ffn_output[t]) if self.ffn_output is not None
                else float("nan"), "stream": rms(self.stream[t])}


def _as_sequence(tokens: Tensor) -> Tensor:
    if not isinstance(tokens, Tensor) or tokens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"tokens must be an int tensor [T] or [1, T], got {getattr(tokens, 'dtype', type(tokens))}")
    if tokens.dim() == 1:
        tokens = tokens[None]
    if tokens.dim() != 2 or tokens.shape[0] != 1 or tokens.shape[1] == 0:
        raise ValueError(f"tokens must be one non-empty sequence [T] or [1, T], got shape {tuple(tokens.shape)}")
    return tokens.long()


@torch.no_grad()
def trace(model: TinyLM, tokens: Tensor) -> list[LayerTrace]:
    """One :class:`LayerTrace` per memory layer (in ``model.memory`` order) for one sequence.

    tokens: ``[T]`` or ``[1, T]``, ``T <= max_seq_len``.  The model is run in eval mode (its mode is
    restored afterwards).  Raises if a layer's contributions do not add up to its output.
    """
    tokens = _as_sequence(tokens)
    was_training = model.training
    model.eval()
    try:
        with capture(model) as cap:
            model(tokens)
        records = []
        final_rms = _final_rms(model, cap.final[0])  # [T]
        for j, layer in enumerate(model.memory):
            a, b = model.placements[j]
            x, out = cap.memory_in[j][0], cap.memory_out[j].output[0]  # [T, d]
            dec = decompose(layer, x)
            check_contract(dec, out, f"memory layer {j} ({type(layer).__name__})")
            retrieval = layer.retrieval
            cores = getattr(retrieval, "cores", None)
            records.append(LayerTrace(
                layer=j, kind=LAYER_KINDS[type(layer)], read_block=a, write_block=b, n_keys=retrieval.cfg.n_keys,
                indices=dec.indices, grid_rows=dec.grid_rows, grid_cols=dec.grid_cols, heads=dec.heads,
                blocks=dec.blocks, scores=dec.scores, pre_scores=dec.pre_scores, contributions=dec.contributions,
                residual=dec.residual, output=out, inputs=x, ffn_output=cap.ffn_out[b][0] if b in cap.ffn_out else None,
                stream=cap.stream[b][0], final_rms=final_rms, axis_scores=retrieval.axis_scores(x),
                cores=cores.detach() if cores is not None else None))
        return records
    finally:
        model.train(was_training)


def _final_rms(model: TinyLM, final: Tensor) -> Tensor:
    """``rms(x_L)`` over the last axis, with the final RMSNorm's eps: ``[..., d] -> [...]``."""
    return final.pow(2).mean(-1).add(model.norm.eps or torch.finfo(final.dtype).eps).sqrt()


def _logit_directions(model: TinyLM, targets: Tensor) -> Tensor:
    """``g . E[target]``: the model-space direction of each target's logit behind the final norm, ``[..., d]``."""
    return model.embed.weight[targets] * model.norm.weight


def direct_logits(model: TinyLM, record: LayerTrace, targets: Tensor) -> Tensor:
    """Each slot's direct effect on the logit of ``targets [T]``: ``(c / rms(x_L)) * g . E[target]``, ``[T, S]``.

    The final RMSNorm is linearised at each position's own scale ``rms(x_L)`` (what the other
    branches leave it at), so the terms of one position add up to the memory's direct share of
    that logit; later blocks may still transform the memory output (that indirect path is not counted).
    """
    direction = _logit_directions(model, targets)  # [T, d]
    return torch.einsum("tsd,td->ts", record.contributions, direction) / record.final_rms[:, None]


@torch.no_grad()
def fact_slots(model: TinyLM, inputs: Tensor, targets: Tensor, batch_size: int = 32) -> list[dict]:
    """For every scored position (a fact query ``... e1 e2`` whose target is the attribute ``a``):
    the memory slot with the largest direct effect on the logit of ``a`` (:func:`direct_logits`).

    inputs, targets ``[N, T]`` (targets ``-100`` where nothing is scored).  Returns one dict per scored
    position: ``seq, pos, query`` (the two tokens before the target), ``target``, ``predicted``,
    ``layer, row`` (of the strongest slot), ``effect`` (its direct logit effect), ``memory_effect``
    (all memory slots of all layers together) and ``share`` (``effect / memory_effect``).
    """
    if inputs.shape != targets.shape or inputs.dim() != 2:
        raise ValueError(f"inputs and targets must both be [N, T], got {tuple(inputs.shape)}, {tuple(targets.shape)}")
    if not len(model.memory):
        raise ValueError("fact_slots needs a model with memory layers")
    was_training = model.training
    model.eval()
    found = []
    try:
        for start in range(0, inputs.shape[0], batch_size):
            x, y = inputs[start:start + batch_size].long(), targets[start:start + batch_size]
            with capture(model) as cap:
                logits = model(x).logits  # [b, T, V]
            mask = y != IGNORE  # [b, T]
            if not mask.any():
                continue
            safe = y.clamp(min=0)  # [b, T]
            direction = _logit_directions(model, safe)  # [b, T, d]
            rms = _final_rms(model, cap.final)  # [b, T]
            effects, rows = [], []
            for j, layer in enumerate(model.memory):
                dec = decompose(layer, cap.memory_in[j])
                effects.append(torch.einsum("btsd,btd->bts", dec.contributions, direction) / rms[..., None])
                rows.append(dec.indices)
            effect = torch.stack(effects, 2)  # [b, T, L, S]
            row = torch.stack(rows, 2)  # [b, T, L, S]
            flat = effect.flatten(2)  # [b, T, L*S]
            best = flat.argmax(-1)  # [b, T]
            S = effect.shape[-1]
            for b, t in mask.nonzero().tolist():
                k = int(best[b, t])
                total = float(flat[b, t].sum())
                found.append({"seq": start + b, "pos": t, "query": x[b, max(0, t - 1):t + 1].tolist(),
                              "target": int(y[b, t]), "predicted": int(logits[b, t].argmax()),
                              "layer": k // S, "row": int(row[b, t].flatten()[k]), "effect": float(flat[b, t, k]),
                              "memory_effect": total, "share": float(flat[b, t, k]) / total if total else float("nan")})
    finally:
        model.train(was_training)
    return found


# ---------------------------------------------------------------------------------------------
# What a slot stores: the contexts that read it most strongly
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def slot_reads(model: TinyLM, layer: int, tokens: Tensor, batch_size: int = 32) -> tuple[Tensor, Tensor]:
    """Rows read by memory layer ``layer`` at every position of ``tokens [N, T]`` and how strongly.

    Returns ``(indices [N, T, S], strength [N, T, S])``; strength is the norm of the slot's
    contribution to the layer output.
    """
    if not 0 <= layer < len(model.memory):
        raise ValueError(f"layer must be in [0, {len(model.memory)}), got {layer}")
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [N, T], got shape {tuple(tokens.shape)}")
    was_training = model.training
    model.eval()
    idx, strength = [], []
    try:
        for start in range(0, tokens.shape[0], batch_size):
            with capture(model) as cap:
                model(tokens[start:start + batch_size].long())
            dec = decompose(model.memory[layer], cap.memory_in[layer])  # [b, T, S, ...]
            idx.append(dec.indices)
            strength.append(dec.contributions.norm(dim=-1))
    finally:
        model.train(was_training)
    return torch.cat(idx), torch.cat(strength)


def top_contexts(model: TinyLM, layer: int, row: int, tokens: Tensor, k: int = 8, width: int = 16,
                 decode: Callable[[Tensor], str] | None = None, reads: tuple[Tensor, Tensor] | None = None) -> list[dict]:
    """The ``k`` corpus positions that read physical row ``row`` of memory layer ``layer`` most strongly.

    tokens ``[N, T]`` (e.g. validation windows); ``reads`` = a precomputed :func:`slot_reads`.  Each
    result: ``{"seq", "pos", "strength", "context"}`` with the ``width`` tokens up to and including
    the position, decoded by ``decode`` (default: the token ids).
    """
    indices, strength = reads if reads is not None else slot_reads(model, layer, tokens)
    hits = (indices == row)  # [N, T, S]
    per_pos = torch.where(hits, strength, torch.zeros_like(strength)).amax(-1)  # [N, T]
    flat = per_pos.flatten()
    n_hits = int((flat > 0).sum())
    order = flat.topk(min(k, n_hits)).indices if n_hits else flat.new_zeros(0, dtype=torch.long)
    T = tokens.shape[1]
    out = []
    for f in order.tolist():
        seq, pos = divmod(f, T)
        window = tokens[seq, max(0, pos - width + 1):pos + 1]
        context = decode(window) if decode is not None else " ".join(map(str, window.tolist()))
        out.append({"seq": seq, "pos": pos, "strength": float(flat[f]), "context": context})
    return out


# ---------------------------------------------------------------------------------------------
# Knock-outs: evaluate with memory layers or FFNs zeroed
# ---------------------------------------------------------------------------------------------


def _select(which, n: int, what: str) -> list[int]:
    if which is None:
        return []
    if which == "all":
        return list(range(n))
    items = [which] if isinstance(which, int) else list(which)
    bad = [i for i in items if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n]
    if bad:
        raise ValueError(f"{what} must be None, 'all', or indices in [0, {n}); got {which!r}")
    return items


@contextlib.contextmanager
def knockout(model: TinyLM, memory=None, ffn=None) -> Iterator[None]:
    """Zero the outputs of memory layers (indices into ``model.memory``) and/or FFNs (block indices).

    ``memory`` / ``ffn``: None, ``"all"``, an index or a list.  The routing still runs (indices and
    scores stay available); only the branch's contribution to the residual stream becomes 0.
    """
    mem = _select(memory, len(model.memory), "memory")
    with_ffn = [b for b, block in enumerate(model.blocks) if block.ffn is not None]
    blocks = _select(ffn, len(model.blocks), "ffn")
    if ffn == "all":
        blocks = with_ffn
    missing = [b for b in blocks if b not in with_ffn]
    if missing:
        raise ValueError(f"ffn: blocks {missing} have no FFN (a memory layer replaces it)")

    def zero_memory(module, args, out):
        return dataclasses.replace(out, output=torch.zeros_like(out.output))

    def zero_ffn(module, args, out):
        if isinstance(module, MoE):
            return torch.zeros_like(out[0]), out[1]
        return torch.zeros_like(out)

    handles = [model.memory[j].register_forward_hook(zero_memory) for j in mem]
    handles += [model.blocks[b].ffn.register_forward_hook(zero_ffn) for b in blocks]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def evaluate(model: TinyLM, batches: list[tuple[Tensor, Tensor]]) -> dict[str, float]:
    """Mean cross-entropy and accuracy over the scored targets (``!= -100``) of all batches."""
    was_training = model.training
    model.eval()
    ce, correct, count = 0.0, 0, 0
    try:
        for x, y in batches:
            logits = model(x).logits
            mask = y != IGNORE
            ce += F.cross_entropy(logits[mask].float(), y[mask], reduction="sum").item()
            correct += (logits[mask].argmax(-1) == y[mask]).sum().item()
            count += int(mask.sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("batches hold no scored targets")
    return {"loss": ce / count, "acc": correct / count}


def knockout_eval(model: TinyLM, batches: list[tuple[Tensor, Tensor]], memory=None, ffn=None) -> dict[str, float]:
    """:func:`evaluate` under :func:`knockout` (``memory=None, ffn=None``: the intact model)."""
    with knockout(model, memory=memory, ffn=ffn):
        return evaluate(model, batches)


# ---------------------------------------------------------------------------------------------
# Small trained models, trained once and cached (notebooks 06 and 08, the CLI)
# ---------------------------------------------------------------------------------------------


CLI_MODELS = {"ultramemv2": "umv2-tiny", "moe": "moe-2of16", "dense": "dense"}  # notebook 06's three models
QUICK = {  # TrainConfig fields of the cached sizes
    "text": {"task": "text", "steps": 200, "batch_size": 16, "eval_every": 40, "eval_batches": 4},
    "smoke": {"task": "text", "steps": 20, "batch_size": 8, "eval_every": 10, "eval_batches": 1, "eval_batch_size": 16},
    "facts": {"task": "facts", "task_overrides": CAPACITY_FACTS, "steps": 400, "batch_size": 32, "eval_every": 100},
    "facts-smoke": {"task": "facts", "task_overrides": CAPACITY_FACTS, "steps": 20, "batch_size": 8, "eval_every": 10,
                    "eval_batches": 1, "eval_batch_size": 32},
}


def _run_config(recipe: str, size: str, progress: bool, fields: dict):
    """The :class:`~umv2_ref.train.TrainConfig` of a :func:`pretrained` run and its directory name."""
    from .experiments.compare import RECIPES
    from .train import TrainConfig

    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {tuple(RECIPES)}, got {recipe!r}")
    if size not in QUICK:
        raise ValueError(f"size must be one of {tuple(QUICK)}, got {size!r}")
    settings = {**QUICK[size], **RECIPES[recipe].train_fields(), **fields}
    settings["task_overrides"] = dict(settings.get("task_overrides", {}))  # never share the preset's dict
    cfg = TrainConfig(progress=progress, **settings)
    key = hashlib.sha256(json.dumps(dataclasses.asdict(cfg) | {"progress": None}, sort_keys=True,
                                    default=str).encode()).hexdigest()[:10]
    return cfg, f"{recipe}-{cfg.task}-{key}"


def run_name(recipe: str = "ultramemv2", size: str = "text", **fields) -> str:
    """The directory name :func:`pretrained` gives this run (``<recipe>-<task>-<hash of its config>``)."""
    return _run_config(recipe, size, False, fields)[1]


def pretrained(recipe: str = "ultramemv2", size: str = "text", cache_dir: str | Path | None = CACHE_DIR,
               progress: bool = True, shipped: bool = True, **fields) -> tuple[TinyLM, dict]:
    """A trained model of ``recipe`` (a :data:`umv2_ref.experiments.compare.RECIPES` name) and its results.

    ``size``: a :data:`QUICK` preset (``"text"``: 200 steps of 16 x 64 bytes of the bundled corpus;
    ``"facts"``: 400 steps of batch 32 on the capacity-limited facts of the head-to-head; ``"smoke"``,
    ``"facts-smoke"``: 20 tiny steps); ``fields`` override any :class:`~umv2_ref.train.TrainConfig`
    field (e.g. ``lr=1e-2, seed=1``).  The first call trains and saves the run under
    ``cache_dir/<recipe>-<hash of the run config>``; later calls load it in about a second.  A cache
    entry that no longer loads (the code changed) is retrained, with a message.  ``cache_dir=None``
    trains into a temporary directory (nothing kept).  A run not in the cache but shipped with the
    repository under ``data/models/<same name>`` (weights only, made by ``tools/ship_model.py``; its
    name holds the hash of its configuration, so a changed recipe never loads a stale model) is
    loaded from there unless ``shipped=False``.  Returns ``(model in eval mode, metrics.json)``;
    the metrics carry ``train_wall_s``, the seconds this call spent training (0 when loaded), and
    ``shipped``, the shipped directory it came from (or ``None``).
    """
    from .train import CheckpointError, load_model, train

    def load(directory: Path, what: str) -> tuple[TinyLM, dict] | None:
        """The finished run in ``directory``, or None (with a message when it exists but no longer loads)."""
        if not (directory / "pretrained.json").exists():  # written once training has finished
            return None
        try:
            model, results = load_model(directory), json.loads((directory / "metrics.json").read_text())
        except (CheckpointError, OSError, ValueError) as err:  # damaged, or the model code changed since
            print(f"{what} model {directory} does not load ({type(err).__name__}: {err}); not using it",
                  file=sys.stderr)
            return None
        return model, results | {"train_wall_s": 0.0, "shipped": str(directory) if what == "shipped" else None}

    cfg, name = _run_config(recipe, size, progress, fields)
    found = (load(Path(cache_dir) / name, "cached") if cache_dir is not None else None) \
        or (load(SHIPPED_DIR / name, "shipped") if shipped else None)
    if found:
        return found
    root = Path(tempfile.mkdtemp(prefix="umv2-")) if cache_dir is None else Path(cache_dir)
    directory = root / name
    done = directory / "pretrained.json"
    if progress:
        print(f"training {recipe} on {cfg.task} for {cfg.steps} steps (once; cached in {directory})", file=sys.stderr)
    cfg.out = str(directory)
    cfg.resume = (directory / "checkpoint.pt").exists()  # an interrupted first training continues
    cfg.overwrite = not cfg.resume
    start = time.perf_counter()
    try:
        results = train(cfg)
    except CheckpointError:  # a checkpoint from an older configuration: start afresh
        cfg.resume, cfg.overwrite = False, True
        results = train(cfg)
    if results["interrupted"]:
        raise KeyboardInterrupt(f"training of {recipe} was interrupted; call pretrained() again to continue it")
    done.write_text(json.dumps({"recipe": recipe, "train_wall_s": time.perf_counter() - start,
                                "config": dataclasses.asdict(cfg)}, indent=1, default=str))
    results = json.loads((directory / "metrics.json").read_text()) | {"train_wall_s": time.perf_counter() - start,
                                                                       "shipped": None}
    model = load_model(directory)
    if cache_dir is None:  # nothing is kept
        shutil.rmtree(root, ignore_errors=True)
    return model, results


# ---------------------------------------------------------------------------------------------
# Text rendering: the per-layer table of the CLI
# ---------------------------------------------------------------------------------------------


def _show_token(tok: int, decode: Callable[[Tensor], str] | None) -> str:
    if decode is None:
        return str(tok)
    return repr(decode(torch.tensor([tok])))[1:-1][:6]


def layer_table(record: LayerTrace, tokens: Tensor, top: int = 3, decode: Callable[[Tensor], str] | None = None,
                positions: list[int] | None = None) -> str:
    """Plain-text table of one layer: per position the ``top`` slots by contribution norm
    (row id, grid cell, score, pre-score, norm) and the RMS of memory output, FFN and residual stream."""
    tokens = _as_sequence(tokens)[0]
    norms = record.slot_norms  # [T, S]
    scores = record.scores.sum(-1) if record.scores.dim() == 3 else record.scores  # [T, S]
    head = (f"memory layer {record.layer} ({record.kind}, reads block {record.read_block}, "
            f"writes after block {record.write_block}; {record.indices.shape[1]} slots per token)")
    lines = [head, f"{'pos':>4} {'token':>6} | {'|mem|':>6} {'|ffn|':>6} {'|h|':>6} | top slots: row (i,j) score"
             + (" pre" if record.pre_scores is not None else "") + " |contribution|"]
    for t in positions if positions is not None else range(len(tokens)):
        n = record.norms(t)
        cells = []
        for s in norms[t].argsort(descending=True)[:top].tolist():
            cell = (f"{int(record.indices[t, s])} ({int(record.grid_rows[t, s])},{int(record.grid_cols[t, s])}) "
                    f"{float(scores[t, s]):+.2f}")
            if record.pre_scores is not None:
                cell += f" {float(record.pre_scores[t, s]):+.2f}"
            cells.append(cell + f" {float(norms[t, s]):.3f}")
        lines.append(f"{t:>4} {_show_token(int(tokens[t]), decode):>6} | {n['memory']:6.3f} {n['ffn']:6.3f} "
                     f"{n['stream']:6.3f} | " + "; ".join(cells))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The ipywidgets explorer
# ---------------------------------------------------------------------------------------------


def _byte_codec():
    from .data import decode, encode

    return encode, decode


def show(model: TinyLM, tokens: Tensor, position: int, layer: int = 0, slot: int = 0,
         corpus: Tensor | None = None, decode: Callable[[Tensor], str] | None = None, records=None, reads=None):
    """Draw the view of one (position, layer): :func:`umv2_ref.viz.trace_panel` plus the top corpus
    contexts of the ``slot``-th strongest slot there.  Returns ``(figure, text)``."""
    from .viz import trace_panel

    records = records if records is not None else trace(model, tokens)
    rec = records[layer]
    T = rec.indices.shape[0]
    if not 0 <= position < T:
        raise ValueError(f"position must be in [0, {T}), got {position}")
    order = rec.slot_norms[position].argsort(descending=True)
    s = int(order[min(slot, len(order) - 1)])
    row = int(rec.indices[position, s])
    tokens = _as_sequence(tokens)[0]
    shown = decode(tokens[max(0, position - 24):position + 1]) if decode else str(tokens[:position + 1].tolist())
    fig = trace_panel(rec.grid(position, int(rec.heads[position, s]) if rec.heads is not None else 0),
                      rec.grid_rows[position], rec.grid_cols[position], rec.scores[position],
                      rec.pre_scores[position] if rec.pre_scores is not None else None, rec.slot_norms[position],
                      rec.norms(position), highlight=s,
                      title=f"layer {rec.layer} ({rec.kind}) at position {position}: …{shown[-24:]!r}")
    text = [f"slot #{slot + 1} by contribution: row {row} = grid cell ({int(rec.grid_rows[position, s])}, "
            f"{int(rec.grid_cols[position, s])})"]
    if corpus is not None:
        text.append(f"corpus positions that read row {row} most strongly (context up to the position):")
        for hit in top_contexts(model, layer, row, corpus, k=6, decode=decode, reads=reads):
            text.append(f"  {hit['strength']:.3f}  {hit['context']!r}")
    return fig, "\n".join(text)


def explorer(model: TinyLM, text: str = "def greet(name):\n    return 'hello ' + name", corpus: Tensor | None = None,
             encode: Callable[[str], Tensor] | None = None, decode: Callable[[Tensor], str] | None = None):
    """An ipywidgets explorer: a text box, a position slider, a layer and a slot choice.

    Shows the selected cells on the key grid, scores, pre-scores and contributions of the read
    slots, the memory branch's RMS against the FFN and the residual stream, and (with ``corpus
    [N, T]``) the contexts that read the chosen slot most strongly.  Byte-level text by default
    (``encode``/``decode``).  Returns the widget (display it, or let it be a cell's last value).
    """
    import ipywidgets as W
    import matplotlib.pyplot as plt
    from IPython.display import display

    if not len(model.memory):
        raise ValueError("explorer needs a model with memory layers")
    if encode is None or decode is None:
        encode, decode = _byte_codec()
    box = W.Textarea(value=text, description="text", layout=W.Layout(width="95%", height="4em"))
    pos = W.IntSlider(description="position", min=0, max=1, value=0, continuous_update=False)
    layer = W.Dropdown(description="layer", options=list(range(len(model.memory))), value=0)
    slot = W.IntSlider(description="slot rank", min=0, max=7, value=0, continuous_update=False)
    out = W.Output()
    state: dict = {}
    cache: dict[int, tuple] = {}

    def retrace(*_):
        tokens = encode(box.value)[-model.cfg.max_seq_len:].long()
        if tokens.numel() == 0:
            tokens = encode(" ").long()
        state["tokens"], state["records"] = tokens, trace(model, tokens)
        pos.max = len(tokens) - 1
        pos.value = min(pos.value, pos.max) if pos.value else pos.max
        redraw()

    def redraw(*_):
        reads = None
        if corpus is not None:
            if layer.value not in cache:
                cache[layer.value] = slot_reads(model, layer.value, corpus)
            reads = cache[layer.value]
        out.clear_output(wait=True)
        with out:
            fig, info = show(model, state["tokens"], pos.value, layer.value, slot.value, corpus, decode,
                             state["records"], reads)
            display(fig)
            plt.close(fig)
            print(info)

    box.observe(retrace, "value")
    for w in (pos, layer, slot):
        w.observe(redraw, "value")
    retrace()
    return W.VBox([box, W.HBox([pos, layer, slot]), out])


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m umv2_ref.explore",
                                description="Per-layer table of what each memory layer reads for a text.")
    p.add_argument("--model", default="ultramemv2", help="a recipe of umv2_ref.experiments.compare, trained once at "
                   "the quick text size and cached under build/models (the models of notebook 06: "
                   + ", ".join(f"{k} = {v}" for k, v in CLI_MODELS.items()) + "), unless --checkpoint is given")
    p.add_argument("--checkpoint", help="a run directory or checkpoint file (umv2_ref.train.load_model)")
    p.add_argument("--untrained", action="store_true", help="use a freshly initialised model (no training)")
    p.add_argument("--text", default="def greet(name):\n    return 'hello ' + name")
    p.add_argument("--top", type=int, default=3, help="slots shown per position")
    p.add_argument("--layers", help="comma-separated memory layers (default: all)")
    args = p.parse_args(argv)
    encode, decode = _byte_codec()
    if args.checkpoint:
        from .train import load_model

        model = load_model(args.checkpoint)
    elif args.untrained:
        from .experiments.compare import RECIPES
        from .configs import get_config

        name = CLI_MODELS.get(args.model, args.model)
        if name not in RECIPES:
            p.error(f"--model must be one of {tuple(CLI_MODELS)} or {tuple(RECIPES)}")
        recipe = RECIPES[name]
        model = TinyLM(get_config(recipe.config, **dict(recipe.model_overrides))).eval()
    else:
        model, _ = pretrained(CLI_MODELS.get(args.model, args.model))
    tokens = encode(args.text)[-model.cfg.max_seq_len:].long()
    if tokens.numel() == 0:
        p.error("--text must not be empty")
    if not len(model.memory):
        p.error(f"the model has no memory layers (ffn={model.cfg.ffn!r})")
    records = trace(model, tokens)
    chosen = range(len(records)) if not args.layers else [int(v) for v in args.layers.split(",")]
    for j in chosen:
        if not 0 <= j < len(records):
            p.error(f"--layers: {j} is not in [0, {len(records)})")
        print(layer_table(records[j], tokens, top=args.top, decode=decode))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
