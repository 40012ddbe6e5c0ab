"""Cost accounting per layer type: parameters, activated parameters, MACs and parameter reads.

Closed-form formulas (docs/references.md Sec. 7.8-7.9) for every feed-forward kind the tiny models use,
one function each, plus :func:`module_cost` (reads the sizes off a built module) and
:func:`model_costs` (a whole :class:`~umv2_ref.model.TinyLM`).  Tests check that every formula's
parameter count equals ``sum(p.numel())`` of the real module.

Conventions (per token, per layer):

* ``params``: parameters the layer owns.  ``active``: parameters one token uses -- the dense part
  (queries, keys, norms, projections, router) plus the sparse units it picks (k experts, or m value
  rows).  Keys count as active: every token scores against all of them.
* ``macs``: multiply-accumulates; norms, softmax and top-k comparisons are not counted, the
  product-key candidate grid (``H k^2`` additions) and Tucker rescoring are (as docs/references.md Sec. 7.9).
* Decode reads: one step of ``B`` tokens reads ``step_params`` once (dense weights and the *full*
  key tables, whatever B) plus every *distinct* sparse unit hit, ``N (1 - (1 - e/N)^B)`` units of
  ``unit_params`` each under uniform routing (docs/references.md Sec. 7.9): whole experts for MoE, single
  value rows for memory layers (``~ B m`` rows while ``B m << N``).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch.nn as nn

from .layers import PEER, PKM, MemoryPlus, PKMConfig, UltraMem, UltraMemV2, ValuePool, ValueTable
from .model import CausalSelfAttention, MoE, SwiGLU, TinyLM


@dataclass(frozen=True)
class Cost:
    """Costs of one layer, counted in parameters (multiply by bytes per parameter for bytes)."""

    params: int  # parameters the layer owns
    active: int  # parameters used per token
    macs: int  # multiply-accumulates per token
    step_params: int  # parameters read once per decode step, whatever the batch
    units: int = 0  # sparse units to pick from (experts or value rows); 0 for dense layers
    unit_params: int = 0  # parameters per unit
    picks: int = 0  # units picked per token

    def params_read(self, batch: int) -> float:
        """Parameters read by one decode step of ``batch`` tokens (step part + expected distinct units)."""
        return self.step_params + expected_distinct(self.units, self.picks, batch) * self.unit_params


def expected_distinct(units: int, picks: int, batch: int) -> float:
    """Expected distinct units hit by ``batch`` tokens picking ``picks`` each, uniformly: ``N (1 - (1 - e/N)^B)``."""
    if batch <= 0:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    if units == 0:
        return 0.0
    return units * (1.0 - (1.0 - picks / units) ** batch)


def dense_cost(params: int, macs: int | None = None) -> Cost:
    """A dense layer: every parameter is active and read once per step."""
    return Cost(params, params, params if macs is None else macs, params)


# ---------------------------------------------------------------------------------------------
# Closed forms, one per layer type
# ---------------------------------------------------------------------------------------------


def attention_cost(d: int) -> Cost:
    """Fused QKV + output projection: ``4 d^2`` parameters and MACs.

    MACs count the projections only; the ``2 T d`` score/value MACs depend on the context length
    T and are identical for every feed-forward variant.
    """
    return dense_cost(4 * d * d)


def swiglu_cost(d: int, d_ff: int) -> Cost:
    """SwiGLU FFN: gate, up and down, ``3 d d_ff`` parameters and MACs."""
    return dense_cost(3 * d * d_ff)


def moe_cost(d: int, n_experts: int, topk: int, d_expert: int) -> Cost:
    """Top-e MoE of SwiGLU experts: ``3 d D_e N_e + d N_e`` params, ``d N_e + 3 e d D_e`` MACs (Sec. 7.8-7.9)."""
    expert = 3 * d * d_expert
    router = d * n_experts
    return Cost(params=expert * n_experts + router, active=router + topk * expert, macs=router + topk * expert,
                step_params=router, units=n_experts, unit_params=expert, picks=topk)


def _norm_params(kind: str | None, dim: int) -> int:
    return {None: 0, "rms": dim, "layer": 2 * dim, "batch": 2 * dim}[kind]


def product_key_retrieval_cost(d: int, n_keys: int, heads: int, d_key: int, topk: int,
                               query_norm: str | None = "layer", key_norm: str | None = None) -> Cost:
    """PKM queries and sub-keys: params ``d H d_q + H d_q`` (biased query) ``+ H n d_q`` (keys) + norms;
    MACs ``d H d_q + H n d_q + H k^2`` (query, sub-key scores, candidate grid; PKM Sec. 3.2)."""
    q_norm = _norm_params(query_norm, heads * d_key if query_norm == "batch" else d_key)
    params = d * heads * d_key + heads * d_key + heads * n_keys * d_key + q_norm + _norm_params(key_norm, d_key // 2)
    macs = d * heads * d_key + heads * n_keys * d_key + heads * topk * topk
    return Cost(params, params, macs, params)


def _with_values(retrieval: Cost, extra_dense: int, extra_macs: int, rows: int, row_params: int, picks: int) -> Cost:
    """Add dense projections and a sparse value table read ``picks`` rows at a time."""
    step = retrieval.step_params + extra_dense
    return Cost(params=step + rows * row_params, active=step + picks * row_params,
                macs=retrieval.macs + extra_macs, step_params=step, units=rows, unit_params=row_params, picks=picks)


def pkm_cost(d: int, n_keys: int, heads: int, d_key: int, topk: int, query_norm: str | None = "layer",
             key_norm: str | None = None) -> Cost:
    """PKM (Sec. 7.9): MACs ``d H d_q + H n d_q + H k^2 + H k D_v``, values ``n^2 D_v`` with ``D_v = d``."""
    ret = product_key_retrieval_cost(d, n_keys, heads, d_key, topk, query_norm, key_norm)
    return _with_values(ret, 0, heads * topk * d, n_keys**2, d, heads * topk)


def memoryplus_cost(d: int, n_keys: int, heads: int, d_key: int, topk: int, d_value: int,
                    query_norm: str | None = "layer", key_norm: str | None = None, owns_values: bool = True) -> Cost:
    """Memory+: PKM read of ``D_v``-wide values, then ``W_2 (y * silu(W_1 x))``: ``2 d D_v`` (+ biases) more.
    ``owns_values=False`` for a layer reading a shared :class:`ValueTable` (the table is counted once)."""
    ret = product_key_retrieval_cost(d, n_keys, heads, d_key, topk, query_norm, key_norm)
    gates = 2 * d * d_value + d_value + d
    cost = _with_values(ret, gates, heads * topk * d_value + 2 * d * d_value, n_keys**2, d_value, heads * topk)
    return cost if owns_values else replace(cost, params=cost.step_params)


def peer_cost(d: int, n_keys: int, heads: int, d_key: int, topk: int, query_norm: str | None = "layer",
              key_norm: str | None = None) -> Cost:
    """PEER: each picked slot is a one-neuron expert ``gelu(u_i . x) v_i``: ``2d`` params and MACs per pick."""
    ret = product_key_retrieval_cost(d, n_keys, heads, d_key, topk, query_norm, key_norm)
    return _with_values(ret, 0, heads * topk * 2 * d, n_keys**2, 2 * d, heads * topk)


def tucker_retrieval_cost(d: int, n_keys: int, d_key: int, rank: int, cores: int, topm: int,
                          per_rank_queries: bool, prefilter_k: int | None = None, norm: str = "rms",
                          heads: int = 1, quadrants: int = 1) -> Cost:
    """TDQKR with H heads (pairs of heads share a query, ``G = ceil(H/2)`` queries):
    params ``2 G r d D_k`` (or ``2 G d D_k`` with one query per axis) ``+ H (2 n' D_k r + c r^2)`` + the two
    shared norms; MACs ``2 G r d D_k + H (2 n' D_k r + 2 n' r + Q c (m_rc r^2 + m_rc^2 r))``
    (Sec. 7.9; ``m_rc`` = prefilter k, Q = prefilter quadrants).  H = 1 is UltraMemV2's single head."""
    nq = rank if per_rank_queries else 1
    groups = (heads + 1) // 2
    k = topm if prefilter_k is None else prefilter_k
    query = 2 * groups * nq * d * d_key
    rescore = quadrants * cores * (k * rank**2 + k * k * rank)
    params = query + heads * (2 * n_keys * d_key * rank + cores * rank * rank) + 2 * _norm_params(norm, d_key)
    macs = query + heads * (2 * n_keys * d_key * rank + 2 * n_keys * rank + rescore)
    return Cost(params, params, macs, params)


def ultramem_cost(d: int, n_keys: int, d_key: int, rank: int, cores: int, topm: int, d_value: int, expand: int,
                  prefilter_k: int | None = None, norm: str = "rms", heads: int = 1,
                  per_rank_queries: bool = False, quadrants: int = 1) -> Cost:
    """UltraMem v1 (Sec. 7.9): H-head TDQKR with one query per axis and head pair, ``n'^2 / E``
    physical rows of ``D_v`` (H m read per token), E projectors ``E D_v d``; MACs add ``H m D_v + E D_v d``."""
    ret = tucker_retrieval_cost(d, n_keys, d_key, rank, cores, topm, per_rank_queries, prefilter_k, norm, heads,
                                quadrants)
    proj = expand * d_value * d
    return _with_values(ret, proj, heads * topm * d_value + proj, n_keys**2 // expand, d_value, heads * topm)


def ultramemv2_cost(d: int, n_keys: int, d_key: int, rank: int, cores: int, topm: int, d_pre: int, d_value: int,
                    window: int | None = None, per_rank_queries: bool = True, prefilter_k: int | None = None,
                    norm: str = "rms", owns_values: bool = True, quadrants: int = 1) -> Cost:
    """UltraMemV2 (Sec. 7.8-7.9): TDQKR + ``W_pre`` (``d D_p``) + ``W_v`` (``D_v d``) + ``window`` rows of
    ``D_p + D_v``; MACs add ``d D_p + m (D_p + D_v) + D_v d``.  ``window`` defaults to ``n'^2``;
    ``owns_values=False`` for a layer reading a shared :class:`ValuePool` (the pool is counted once)."""
    ret = tucker_retrieval_cost(d, n_keys, d_key, rank, cores, topm, per_rank_queries, prefilter_k, norm,
                                quadrants=quadrants)
    window = n_keys**2 if window is None else window
    dense = d * d_pre + d_value * d
    cost = _with_values(ret, dense, dense + topm * (d_pre + d_value), window, d_pre + d_value, topm)
    return cost if owns_values else replace(cost, params=cost.step_params)


def value_pool_cost(rows: int, d_pre: int, d_value: int) -> Cost:
    """A shared pool (or a shared :class:`ValueTable`, ``d_pre = 0``): owns ``rows (D_p + D_v)``
    parameters; its reads are charged to the layers."""
    return Cost(rows * (d_pre + d_value), 0, 0, 0)


# ---------------------------------------------------------------------------------------------
# Built modules and whole models
# ---------------------------------------------------------------------------------------------


def count_params(module: nn.Module) -> int:
    """Parameters of a real module (each shared tensor once)."""
    return sum(p.numel() for p in module.parameters())


def _pk_args(cfg: PKMConfig) -> tuple:
    return cfg.d_model, cfg.n_keys, cfg.heads, cfg.d_key, cfg.topk


def module_cost(module: nn.Module) -> Cost:
    """The closed-form :class:`Cost` of a built layer, with the sizes read off the module."""
    if isinstance(module, CausalSelfAttention):
        return attention_cost(module.proj.in_features)
    if isinstance(module, SwiGLU):
        return swiglu_cost(module.gate.in_features, module.gate.out_features)
    if isinstance(module, MoE):
        E, d, d_e = module.w_gate.shape
        return moe_cost(d, E, module.topk, d_e)
    if isinstance(module, (PKM, PEER, MemoryPlus)):
        c = module.cfg
        norms = dict(query_norm=c.query_norm, key_norm=c.key_norm)
        if isinstance(module, MemoryPlus):
            return memoryplus_cost(*_pk_args(c), c.d_value, **norms, owns_values=not module._table)
        return (peer_cost if isinstance(module, PEER) else pkm_cost)(*_pk_args(c), **norms)
    if isinstance(module, UltraMem):
        c = module.cfg
        return ultramem_cost(c.d_model, c.n_keys, c.d_key, c.rank, c.cores, c.topm, c.d_value, c.expand,
                             c.prefilter_k, c.norm, c.heads, c.per_rank_queries, c.prefilter_quadrants)
    if isinstance(module, UltraMemV2):
        c = module.cfg
        return ultramemv2_cost(c.d_model, c.n_keys, c.d_key, c.rank, c.cores, c.topm, c.d_pre, c.d_value, c.window,
                               c.per_rank_queries, c.prefilter_k, c.norm, owns_values=not module._pool,
                               quadrants=c.prefilter_quadrants)
    if isinstance(module, ValuePool):
        return value_pool_cost(*module.pre_values.shape, module.values.shape[1])
    if isinstance(module, ValueTable):
        return value_pool_cost(module.values.shape[0], 0, module.values.shape[1])
    raise ValueError(f"module_cost has no formula for {type(module).__name__}")


@dataclass
class ModelCosts:
    """Per-component :class:`Cost` s of a model, and their totals."""

    parts: dict[str, Cost]

    @property
    def params(self) -> int:
        return sum(c.params for c in self.parts.values())

    @property
    def active(self) -> int:
        return sum(c.active for c in self.parts.values())

    @property
    def macs(self) -> int:
        return sum(c.macs for c in self.parts.values())

    def bytes_per_token(self, batch: int, bytes_per_param: int = 2) -> float:
        """Parameter bytes read per token in a decode step of ``batch`` tokens (bf16 by default)."""
        return bytes_per_param * sum(c.params_read(batch) for c in self.parts.values()) / batch


def model_costs(model: TinyLM) -> ModelCosts:
    """Costs of every component of a built :class:`TinyLM`, in forward order.

    The tied embedding counts once (``V d`` params) and is fully active: the output head multiplies
    by all of it (``V d`` MACs per token).  Attention MACs exclude the context-dependent scores.
    """
    cfg = model.cfg
    d, V = cfg.d_model, cfg.vocab_size
    parts = {"embedding": dense_cost(V * d)}
    for i, block in enumerate(model.blocks):
        parts[f"block{i}.norms"] = dense_cost(2 * d, macs=0)  # the two RMSNorm gains
        parts[f"block{i}.attn"] = module_cost(block.attn)
        if block.ffn is not None:
            parts[f"block{i}.ffn"] = module_cost(block.ffn)
    for j, layer in enumerate(model.memory):
        parts[f"memory{j}"] = module_cost(layer)
    if model.value_pool is not None:
        parts["value_pool"] = module_cost(model.value_pool)
    parts["norm"] = dense_cost(d, macs=0)
    return ModelCosts(parts)


def format_count(n: float) -> str:
    """``1234567 -> '1.23M'``, ``12345 -> '12.3k'``."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            digits = 3 - len(str(int(abs(n) // scale)))
            return f"{n / scale:.{max(0, digits)}f}{unit}"
    return f"{n:.0f}"
