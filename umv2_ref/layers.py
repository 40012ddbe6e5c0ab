"""Memory layers as ``nn.Module``s: PKM, PEER, MemoryPlus, UltraMem (v1) and UltraMemV2.

Each layer maps ``x [..., d_model]`` to a :class:`MemoryOutput` carrying the output, the physical
value rows it read, their scores and a dict of *already weighted* auxiliary losses (add
``sum(out.aux_losses.values())`` to the training loss; an empty dict when all weights are 0).

Three retrieval modules serve all five layers:

* :class:`ProductKeyRetrieval` (PKM Sec. 3.2; PEER and Memory+ reuse it): multi-head queries,
  two sub-key sets per head, exact product-key top-k, softmax over the selected scores.
* :class:`TuckerRetrieval` (TDQKR + MCS, one head; UltraMemV2 adds separate queries per Tucker
  rank): per-rank row/column scores, c cores, rank-1 prefilter whose (u, v) buffers are refreshed
  by :func:`refresh_rank1` once per optimiser step, raw (no softmax) per-core scores.
* :class:`MultiHeadTuckerRetrieval` (UltraMem v1): the same search with H heads laid out as the
  official v1 code -- per-head keys, cores and prefilter, pairs of heads sharing one query.

Memory value tables are parameters named ``values`` / ``pre_values`` so that
:func:`umv2_ref.optim.param_groups` can give them their own learning rate.  Tables shared by
several layers (:class:`ValuePool` for UltraMemV2, :class:`ValueTable` for Memory+) are
registered once, by the model that owns them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import backend as backends
from .checks import require_positive_int
from .retrieval import key_balance_loss, product_key_topk, rank1_factors, tucker_rank_penalty
from .values import expanded_lookup, get_activation

NORM_KINDS = (None, "layer", "rms", "batch")


@dataclass
class MemoryOutput:
    """What every memory layer returns (no hidden side effects)."""

    output: Tensor  # [..., d_model]
    indices: Tensor  # [..., S] physical value rows read (S = heads*k or m)
    scores: Tensor  # [..., S] weights used, or [..., S, c] per-core scores
    aux_losses: dict[str, Tensor] = field(default_factory=dict)  # weighted, ready to add


def make_norm(kind: str | None, dim: int, gain: float = 1.0) -> nn.Module:
    """Query/key normalisation over the last dim with a learnable gain initialised to ``gain``."""
    if kind not in NORM_KINDS:
        raise ValueError(f"norm kind must be one of {NORM_KINDS}, got {kind!r}")
    if kind is None:
        return nn.Identity()
    norm = {"layer": nn.LayerNorm, "rms": nn.RMSNorm, "batch": nn.BatchNorm1d}[kind](dim)
    nn.init.constant_(norm.weight, gain)
    return norm


def _apply_norm(norm: nn.Module, x: Tensor) -> Tensor:
    """Apply a norm over the last dim; BatchNorm1d needs ``[tokens, channels]``."""
    if isinstance(norm, nn.BatchNorm1d):
        return norm(x.reshape(-1, x.shape[-1])).reshape(x.shape)
    return norm(x)


def _check_config(cfg: object, **positive: int) -> None:
    for name, value in positive.items():
        require_positive_int(f"{type(cfg).__name__}.{name}", value)


def _check_floats(cfg: object, *, positive: dict[str, float] | None = None,
                  non_negative: dict[str, float] | None = None) -> None:
    """Finite real numbers, > 0 (``positive``) or >= 0 (``non_negative``); errors name the field."""
    for bound, values in ((">", positive or {}), (">=", non_negative or {})):
        for name, value in values.items():
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not ok or (value <= 0 if bound == ">" else value < 0):
                raise ValueError(f"{type(cfg).__name__}.{name} must be a finite number {bound} 0, got {value!r}")


def _check_backend(cfg: object, backend: object) -> None:
    """``auto``, ``triton`` (registered when ``kernels`` is imported, possibly later) or a registered name."""
    allowed = sorted({"auto", "triton", *backends.available()})
    if backend not in allowed:
        raise ValueError(f"{type(cfg).__name__}.backend must be one of {allowed}, got {backend!r}")


def _check_input(x: object, d_model: int) -> None:
    """A layer input is a floating-point tensor ``[..., d_model]``."""
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 1 or x.shape[-1] != d_model:
        got = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must be a floating-point tensor [..., d_model={d_model}], got {got}")


# ---------------------------------------------------------------------------------------------
# Product-key retrieval: PKM, PEER, Memory+
# ---------------------------------------------------------------------------------------------


@dataclass
class PKMConfig:
    """Product-key memory (PKM, arXiv 1907.05242).  Also configures PEER and Memory+."""

    d_model: int
    n_keys: int = 32  # keys per axis n; N = n^2 slots
    d_key: int = 64  # query dim per head (two halves of d_key/2)
    heads: int = 4
    topk: int = 8  # k per head (per-axis candidates and final slots)
    query_norm: str | None = "batch"  # PKM used BatchNorm; 'layer'/'rms' or None also allowed
    key_norm: str | None = None  # normalise sub-keys too (Memory+ variant uses 'layer')
    d_value: int | None = None  # value width; None -> d_model (PKM, PEER)
    backend: str = "auto"  # value path: 'auto' | 'torch' | 'triton' (see umv2_ref.backend)

    def __post_init__(self) -> None:
        _check_config(self, d_model=self.d_model, n_keys=self.n_keys, d_key=self.d_key, heads=self.heads, topk=self.topk)
        if self.d_key % 2:
            raise ValueError(f"PKMConfig.d_key must be even (two halves), got {self.d_key}")
        if self.topk > self.n_keys:
            raise ValueError(f"PKMConfig.topk must be <= n_keys={self.n_keys}, got {self.topk}")
        if self.query_norm not in NORM_KINDS:
            raise ValueError(f"PKMConfig.query_norm must be one of {NORM_KINDS}, got {self.query_norm!r}")
        if self.key_norm not in NORM_KINDS or self.key_norm == "batch":
            raise ValueError(f"PKMConfig.key_norm must be one of {NORM_KINDS[:3]} (keys are not a batch), "
                             f"got {self.key_norm!r}")
        _check_backend(self, self.backend)
        self.d_value = self.d_model if self.d_value is None else self.d_value
        _check_config(self, d_value=self.d_value)

    @property
    def n_slots(self) -> int:
        return self.n_keys**2


class ProductKeyRetrieval(nn.Module):
    """Multi-head product-key search; returns softmax weights and flat slot ids per head."""

    def __init__(self, cfg: PKMConfig):
        super().__init__()
        self.cfg = cfg
        h, dk, n = cfg.heads, cfg.d_key, cfg.n_keys
        self.query = nn.Linear(cfg.d_model, h * dk)
        qdim = h * dk if cfg.query_norm == "batch" else dk
        self.query_norm = make_norm(cfg.query_norm, qdim)
        self.key_norm = make_norm(cfg.key_norm, dk // 2)
        bound = 1.0 / math.sqrt(dk // 2)  # "same initialisation as nn.Linear" (XLM)
        self.keys = nn.Parameter(torch.empty(h, 2, n, dk // 2).uniform_(-bound, bound))  # [H, 2, n, dk/2]

    def axis_scores(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Row and column sub-key scores, each ``[..., H, n]``."""
        cfg = self.cfg
        _check_input(x, cfg.d_model)
        q = self.query(x)  # [..., H*dk]
        if cfg.query_norm == "batch":
            q = _apply_norm(self.query_norm, q)
        q = q.unflatten(-1, (cfg.heads, cfg.d_key))  # [..., H, dk]
        if cfg.query_norm != "batch":
            q = _apply_norm(self.query_norm, q)
        q = q.unflatten(-1, (2, cfg.d_key // 2))  # [..., H, 2, dk/2]
        keys = self.key_norm(self.keys)  # [H, 2, n, dk/2] (normalised keys are the ones used)
        s_row = torch.einsum("...hd,hnd->...hn", q[..., 0, :], keys[:, 0])  # [..., H, n]
        s_col = torch.einsum("...hd,hnd->...hn", q[..., 1, :], keys[:, 1])  # [..., H, n]
        return s_row, s_col

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x ``[..., d]`` -> ``(weights, indices)``, both ``[..., H*k]`` (heads flattened)."""
        s_row, s_col = self.axis_scores(x)
        scores, indices = product_key_topk(s_row, s_col, self.cfg.topk)  # [..., H, k]
        return scores.softmax(-1).flatten(-2), indices.flatten(-2)


class PKM(nn.Module):
    """PKM layer: ``m(x) = sum_h sum_{i in I_h} softmax(s)_i V[i]`` (arXiv 1907.05242 Eq. 3-4)."""

    def __init__(self, cfg: PKMConfig):
        super().__init__()
        self.cfg = cfg
        self.retrieval = ProductKeyRetrieval(cfg)
        self.values = nn.Parameter(torch.randn(cfg.n_slots, cfg.d_value) * cfg.d_value**-0.5)  # [N, D]
        if cfg.d_value != cfg.d_model:
            raise ValueError(f"PKM needs d_value == d_model (no output projection); got {cfg.d_value} != {cfg.d_model}")

    def forward(self, x: Tensor) -> MemoryOutput:
        w, idx = self.retrieval(x)  # [..., H*k]
        weighted_sum = backends.get("weighted_sum", self.cfg.backend, x)
        return MemoryOutput(weighted_sum(self.values, idx, w), idx, w)  # [..., d]


class PEER(nn.Module):
    """PEER (arXiv 2407.04153): N single-neuron experts ``gelu(u_i . x) v_i`` routed by product keys.

    ``f(x) = sum_h sum_{i in I_h} softmax(s)_i * gelu(u_i . x) * v_i``.  Expert vectors are stored
    as ``pre_values`` (u) and ``values`` (v), initialised N(0, 1/d) explicitly (not N(0, 1)).
    """

    def __init__(self, cfg: PKMConfig, activation: str = "gelu"):
        super().__init__()
        get_activation(activation)  # refuse an unknown activation now, not at the first forward
        if cfg.d_value != cfg.d_model:
            raise ValueError(f"PEER needs PKMConfig.d_value == d_model (its experts' up vectors are d_model "
                             f"wide); got d_value={cfg.d_value}, d_model={cfg.d_model}")
        self.cfg, self.activation = cfg, activation
        self.retrieval = ProductKeyRetrieval(cfg)
        std = cfg.d_model**-0.5
        self.pre_values = nn.Parameter(torch.randn(cfg.n_slots, cfg.d_model) * std)  # [N, d] (u)
        self.values = nn.Parameter(torch.randn(cfg.n_slots, cfg.d_model) * std)  # [N, d] (v)

    def forward(self, x: Tensor) -> MemoryOutput:
        w, idx = self.retrieval(x)  # [..., H*k]
        peer_values = backends.get("peer_values", self.cfg.backend, x)
        out = peer_values(x, self.pre_values, self.values, idx, w, self.activation)  # [..., d]
        return MemoryOutput(out, idx, w)


class ValueTable(nn.Module):
    """One value table shared by several Memory+ layers (arXiv 2412.09764: "a shared pool of memory
    parameters" for all memory layers, the released code's ``mem_share_values``).

    Like :class:`ValuePool`, it is registered once by the model that owns it; the layers only
    reference it.  Init ``N(0, 1/D_v)`` as the Memory+ values.
    """

    def __init__(self, rows: int, d_value: int):
        super().__init__()
        self.values = nn.Parameter(torch.randn(rows, d_value) * d_value**-0.5)  # [N, D_v]


class MemoryPlus(nn.Module):
    """Memory+ (arXiv 2412.09764): PKM values through a SiLU-gated projection.

    ``y = EmbBag(I, w)``, ``out = W_2 (y * silu(W_1 x))`` with ``W_1: d -> D_v``, ``W_2: D_v -> d``.
    With ``table=None`` the layer owns its ``n_keys^2 x D_v`` values; with a shared
    :class:`ValueTable` (the paper's default: every memory layer reads one pool, each with its own
    query, keys and gating) it reads that table.
    """

    def __init__(self, cfg: PKMConfig, table: ValueTable | None = None):
        super().__init__()
        self.cfg = cfg
        self.retrieval = ProductKeyRetrieval(cfg)
        if table is None:
            self.values = nn.Parameter(torch.randn(cfg.n_slots, cfg.d_value) * cfg.d_value**-0.5)  # [N, D_v]
            self._table: list[ValueTable] = []
        else:
            if tuple(table.values.shape) != (cfg.n_slots, cfg.d_value):
                raise ValueError(f"MemoryPlus: shared table must be [n_keys^2, d_value] = {[cfg.n_slots, cfg.d_value]}, "
                                 f"got {list(table.values.shape)}")
            self._table = [table]  # not a submodule: the owning model registers the table once
        self.gate = nn.Linear(cfg.d_model, cfg.d_value)  # W_1
        self.out = nn.Linear(cfg.d_value, cfg.d_model)  # W_2
        for lin in (self.gate, self.out):
            nn.init.normal_(lin.weight, std=cfg.d_model**-0.5)
            nn.init.zeros_(lin.bias)

    def table(self) -> Tensor:
        """The ``[N, D_v]`` values this layer reads (its own or the shared table's)."""
        return self._table[0].values if self._table else self.values

    def forward(self, x: Tensor) -> MemoryOutput:
        w, idx = self.retrieval(x)  # [..., H*k]
        y = backends.get("weighted_sum", self.cfg.backend, x)(self.table(), idx, w)  # [..., D_v]
        return MemoryOutput(self.out(y * F.silu(self.gate(x))), idx, w)  # [..., d]


# ---------------------------------------------------------------------------------------------
# Tucker-decomposed retrieval: UltraMem, UltraMemV2
# ---------------------------------------------------------------------------------------------


@dataclass
class TuckerConfig:
    """TDQKR settings shared by UltraMem and UltraMemV2."""

    d_model: int
    n_keys: int = 32  # keys per axis n (virtual grid n x n)
    d_key: int = 32  # D_k
    rank: int = 2  # Tucker rank r
    cores: int = 2  # multi-core scoring c
    topm: int = 8  # m slots read per token
    prefilter_k: int | None = None  # candidates per axis (default m)
    prefilter_quadrants: int = 1  # 1: top-k of (a, b) as the papers; 2: also of (-a, -b) (retrieval.tucker_topk)
    per_rank_queries: bool = True  # UltraMemV2: separate queries per Tucker rank
    norm: str = "rms"  # query/key norm ('layer' as in the paper, 'rms' as the 1B/7B configs)
    norm_gain: float | None = None  # None -> D_k^-NORM_GAIN_EXPONENT (official code); see init.calibrate_norm_gain
    exact_topk: bool = False  # scan the full grid instead of the rank-1 prefilter (teaching/tests)
    tucker_penalty: float = 0.0  # alpha of UltraMem Eq. 17 (UltraMem: 0.001; UltraMemV2: 0)
    tucker_tau: float = 0.15
    balance_loss: float = 0.0  # beta of UltraMemV2 Eqs. 18-20 (0 = off)
    backend: str = "auto"  # 'auto' | 'torch' | 'triton' (see umv2_ref.backend)

    # Default query/key norm gain D_k^-x: the official V2 code initialises the norm weights to D_k^-0.4.
    NORM_GAIN_EXPONENT: ClassVar[float] = 0.4

    def __post_init__(self) -> None:
        _check_config(self, d_model=self.d_model, n_keys=self.n_keys, d_key=self.d_key, rank=self.rank,
                      cores=self.cores, topm=self.topm)
        if self.norm not in ("layer", "rms"):
            raise ValueError(f"{type(self).__name__}.norm must be 'layer' or 'rms', got {self.norm!r}")
        q = self.prefilter_quadrants
        if isinstance(q, bool) or not isinstance(q, int) or q not in (1, 2):
            raise ValueError(f"{type(self).__name__}.prefilter_quadrants must be 1 or 2, got {self.prefilter_quadrants!r}")
        k = self.topm if self.prefilter_k is None else self.prefilter_k
        if k > self.n_keys or k * k < self.topm:
            raise ValueError(
                f"{type(self).__name__}: prefilter_k={k} must satisfy k <= n_keys={self.n_keys} and k*k >= topm={self.topm}"
            )
        if self.norm_gain is None:
            self.norm_gain = self.d_key**-self.NORM_GAIN_EXPONENT
        _check_floats(self, positive={"norm_gain": self.norm_gain},
                      non_negative={"tucker_penalty": self.tucker_penalty, "tucker_tau": self.tucker_tau,
                                    "balance_loss": self.balance_loss})
        _check_backend(self, self.backend)


class TuckerRetrieval(nn.Module):
    """TDQKR with multi-core scoring (UltraMem Sec. 3; UltraMemV2 Sec. 3.3).

    ``S_row[..., i, rho] = q_row^(rho) . K_row[i, rho]`` (one query per rank when
    ``per_rank_queries``, else one query shared by all ranks), grid ``sum_c S_row^T C_c S_col``.
    """

    def __init__(self, cfg: TuckerConfig):
        super().__init__()
        self.cfg = cfg
        nq = cfg.rank if cfg.per_rank_queries else 1
        self.query = nn.Linear(cfg.d_model, 2 * nq * cfg.d_key, bias=False)
        nn.init.normal_(self.query.weight, std=math.sqrt(2 / (5 * cfg.d_model)))  # small init
        self.query_norm = make_norm(cfg.norm, cfg.d_key, cfg.norm_gain)
        self.key_norm = make_norm(cfg.norm, cfg.d_key, cfg.norm_gain)
        self.keys = nn.Parameter(torch.randn(2, cfg.n_keys, cfg.rank, cfg.d_key) * cfg.d_key**-0.5)  # [2, n, r, D_k]
        self.cores = nn.Parameter(torch.rand(cfg.cores, cfg.rank, cfg.rank))  # [c, r, r], U[0, 1]
        u, v = rank1_factors(self.cores)
        self.register_buffer("rank1_u", u)  # [r] refreshed once per optimiser step
        self.register_buffer("rank1_v", v)  # [r]

    @torch.no_grad()
    def refresh_rank1(self) -> None:
        """Recompute the prefilter's (u, v) from the current cores, sign-aligned with the old pair."""
        u, v = rank1_factors(self.cores, previous=(self.rank1_u, self.rank1_v))
        self.rank1_u.copy_(u)
        self.rank1_v.copy_(v)

    def axis_scores(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Per-rank row and column scores, each ``[..., n, r]``."""
        cfg = self.cfg
        _check_input(x, cfg.d_model)
        q = self.query(x).unflatten(-1, (2, -1, cfg.d_key))  # [..., 2, nq, D_k]
        q = self.query_norm(q)
        keys = self.key_norm(self.keys)  # [2, n, r, D_k] (normalised keys are the ones used)
        q = q.expand(*q.shape[:-2], cfg.rank, cfg.d_key)  # [..., 2, r, D_k] (shared query if nq = 1)
        s_row = torch.einsum("...rd,nrd->...nr", q[..., 0, :, :], keys[0])  # [..., n, r]
        s_col = torch.einsum("...rd,nrd->...nr", q[..., 1, :, :], keys[1])  # [..., n, r]
        return s_row, s_col

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """x ``[..., d]`` -> ``(scores [..., m, c], virtual slot ids [..., m], weighted aux losses)``."""
        s_row, s_col = self.axis_scores(x)
        return tucker_search(self.cfg, s_row, s_col, self.cores, (self.rank1_u, self.rank1_v))


def tucker_search(cfg: TuckerConfig, s_row: Tensor, s_col: Tensor, cores: Tensor,
                  rank1: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """One head's top-m search and its weighted auxiliary losses.

    s_row, s_col ``[..., n, r]``; cores ``[c, r, r]``; rank1 ``(u, v)`` each ``[r]`` ->
    ``(scores [..., m, c], virtual slot ids [..., m], aux)``.
    """
    if cfg.exact_topk:
        scores, idx = backends.get("tucker_topk", "torch", s_row)(s_row, s_col, cores, cfg.topm, exact=True)
    else:
        tucker_topk = backends.get("tucker_topk", cfg.backend, s_row)
        extra = {} if cfg.prefilter_quadrants == 1 else {"quadrants": cfg.prefilter_quadrants}  # 1: the default
        scores, idx = tucker_topk(s_row, s_col, cores, cfg.topm, k=cfg.prefilter_k, rank1=rank1, **extra)
    aux: dict[str, Tensor] = {}
    if cfg.tucker_penalty:
        aux["tucker_penalty"] = cfg.tucker_penalty * tucker_rank_penalty(cores, cfg.tucker_tau)
    if cfg.balance_loss:
        a, b = s_row @ rank1[0], s_col @ rank1[1]  # [..., n]
        n = cfg.n_keys
        flat = lambda t: t.reshape(-1, t.shape[-1])  # noqa: E731  [T, *]
        aux["key_balance"] = cfg.balance_loss * key_balance_loss(flat(a), flat(b), flat(idx // n), flat(idx % n))
    return scores, idx, aux


@dataclass
class UltraMemConfig(TuckerConfig):
    """UltraMem v1 (arXiv 2411.12364): TDQKR + MCS + implicit value expansion, no softmax, H heads."""

    per_rank_queries: bool = False  # v1 shares one query across ranks
    heads: int = 1  # H retrieval heads, each with its own keys and cores; heads 2g and 2g+1 share query g
    d_value: int = 32  # D_v of the physical values
    expand: int = 4  # E virtual blocks; physical rows N = n_keys^2 / E

    # The official v1 code initialises its query/key norm weights to D_k^-0.33 (V2 changed it to -0.4).
    NORM_GAIN_EXPONENT: ClassVar[float] = 0.33

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_config(self, heads=self.heads, d_value=self.d_value, expand=self.expand)
        if self.n_keys**2 % self.expand:
            raise ValueError(f"UltraMemConfig: n_keys^2={self.n_keys ** 2} must be divisible by expand={self.expand}")
        if self.d_value % self.cores:
            raise ValueError(f"UltraMemConfig: d_value={self.d_value} must be divisible by cores={self.cores}")

    @property
    def n_rows(self) -> int:
        return self.n_keys**2 // self.expand

    @property
    def query_groups(self) -> int:
        """Distinct queries: pairs of heads share one (the official code's ``nhead_share_query = 2``)."""
        return (self.heads + 1) // 2


class MultiHeadTuckerRetrieval(nn.Module):
    """UltraMem v1's TDQKR with H heads, laid out as the official v1 code.

    Each head h has its own row/column keys ``K_h [2, n, r, D_k]``, its own c Tucker cores
    ``C_h [c, r, r]`` and its own rank-1 prefilter (one SVD of ``sum_c C_{h,c}`` per head); heads
    2g and 2g+1 read the same query g (``query_groups = ceil(H / 2)`` queries of ``2 D_k``, or
    ``2 r D_k`` with ``per_rank_queries``).  One query norm and one key norm serve every head.
    Each head picks its own top-m slots of the *same* virtual grid; the H*m picks are concatenated
    (two heads may pick the same slot: the value paths then sum both contributions).
    """

    def __init__(self, cfg: UltraMemConfig):
        super().__init__()
        self.cfg = cfg
        H, G, n, r, dk = cfg.heads, cfg.query_groups, cfg.n_keys, cfg.rank, cfg.d_key
        nq = r if cfg.per_rank_queries else 1
        self.query = nn.Linear(cfg.d_model, G * 2 * nq * dk, bias=False)
        nn.init.normal_(self.query.weight, std=math.sqrt(2 / (5 * cfg.d_model)))  # small init
        self.query_norm = make_norm(cfg.norm, dk, cfg.norm_gain)
        self.key_norm = make_norm(cfg.norm, dk, cfg.norm_gain)
        self.keys = nn.Parameter(torch.randn(H, 2, n, r, dk) * dk**-0.5)  # [H, 2, n, r, D_k]
        self.cores = nn.Parameter(torch.rand(H, cfg.cores, r, r))  # [H, c, r, r], U[0, 1]
        u, v = zip(*(rank1_factors(core) for core in self.cores))
        self.register_buffer("rank1_u", torch.stack(u))  # [H, r] refreshed once per optimiser step
        self.register_buffer("rank1_v", torch.stack(v))  # [H, r]
        self.register_buffer("head_query", torch.arange(H) // 2, persistent=False)  # [H] query group of each head

    @torch.no_grad()
    def refresh_rank1(self) -> None:
        """Recompute every head's (u, v) from its cores, sign-aligned with the head's old pair."""
        for h, core in enumerate(self.cores):
            u, v = rank1_factors(core, previous=(self.rank1_u[h], self.rank1_v[h]))
            self.rank1_u[h].copy_(u)
            self.rank1_v[h].copy_(v)

    def axis_scores(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Per-head, per-rank row and column scores, each ``[..., H, n, r]``."""
        cfg = self.cfg
        _check_input(x, cfg.d_model)
        q = self.query(x).unflatten(-1, (cfg.query_groups, 2, -1, cfg.d_key))  # [..., G, 2, nq, D_k]
        q = self.query_norm(q).index_select(-4, self.head_query)  # [..., H, 2, nq, D_k]
        q = q.expand(*q.shape[:-2], cfg.rank, cfg.d_key)  # [..., H, 2, r, D_k] (shared query if nq = 1)
        keys = self.key_norm(self.keys)  # [H, 2, n, r, D_k]
        s_row = torch.einsum("...hrd,hnrd->...hnr", q[..., 0, :, :], keys[:, 0])  # [..., H, n, r]
        s_col = torch.einsum("...hrd,hnrd->...hnr", q[..., 1, :, :], keys[:, 1])  # [..., H, n, r]
        return s_row, s_col

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """x ``[..., d]`` -> ``(scores [..., H*m, c], virtual slot ids [..., H*m], aux)``, head-major.

        The auxiliary losses are averaged over heads (so H does not rescale their weights).
        """
        s_row, s_col = self.axis_scores(x)
        scores, idx, aux = [], [], {}
        for h in range(self.cfg.heads):
            sc, ix, head_aux = tucker_search(self.cfg, s_row[..., h, :, :], s_col[..., h, :, :], self.cores[h],
                                             (self.rank1_u[h], self.rank1_v[h]))  # [..., m, c], [..., m]
            scores.append(sc)
            idx.append(ix)
            for name, value in head_aux.items():
                aux[name] = aux.get(name, 0.0) + value / self.cfg.heads
        return torch.cat(scores, dim=-2), torch.cat(idx, dim=-1), aux


class UltraMem(nn.Module):
    """UltraMem v1 layer: ``o = sum_e W_e^T (sum_{k in block e} s_k V[row_k])`` (IVE, MCS slices).

    The sum runs over the H*m slots all heads picked (:class:`MultiHeadTuckerRetrieval`), read
    from one value table.  The E per-block projectors ``W_e: D_v -> d`` are one
    ``Linear(E * D_v, d)`` over the concatenated block sums.  Placement as a skip-layer (read at
    block a, add after block b) is the model's job.
    """

    def __init__(self, cfg: UltraMemConfig):
        super().__init__()
        self.cfg = cfg
        self.retrieval = MultiHeadTuckerRetrieval(cfg)
        self.values = nn.Parameter(torch.randn(cfg.n_rows, cfg.d_value) * 0.02)  # [N, D_v]
        self.register_buffer("shuffle", torch.randperm(cfg.n_keys**2))  # [E*N] virtual -> physical
        self.proj = nn.Linear(cfg.expand * cfg.d_value, cfg.d_model, bias=False)  # [W_1; ...; W_E]
        nn.init.normal_(self.proj.weight, std=(cfg.expand * cfg.d_value) ** -0.5)

    def forward(self, x: Tensor) -> MemoryOutput:
        scores, virtual, aux = self.retrieval(x)  # [..., H*m, c], [..., H*m]
        z = expanded_lookup(self.values, virtual, scores, self.shuffle, self.cfg.expand)  # [..., E, D_v]
        rows = self.shuffle[virtual] % self.cfg.n_rows  # [..., H*m]
        return MemoryOutput(self.proj(z.flatten(-2)), rows, scores, aux)  # [..., d]


class ValuePool(nn.Module):
    """One pre-value and value table shared by several UltraMemV2 layers (UltraMemV2 Sec. 4.2.8).

    Layer l reads the rows ``(offset_l + [0, window)) mod rows`` (a forward-looking ring window,
    as the official ``share_ratio`` code).  Build the layout with :func:`ring_layout`.
    """

    def __init__(self, rows: int, d_pre: int, d_value: int, std: float = 0.02):
        super().__init__()
        self.pre_values = nn.Parameter(torch.randn(rows, d_pre) * std)  # [A, D_p]
        self.values = nn.Parameter(torch.randn(rows, d_value) * std)  # [A, D_v]


def ring_layout(n_layers: int, knum: int, share_ratio: float) -> tuple[int, int, list[int]]:
    """The official ``share_ratio`` scheme: ``(pool rows A, keys per axis n_l, offsets)``.

    ``A = L * knum^2``; each layer addresses a window of ``n_l^2`` rows with
    ``n_l = floor(sqrt(share_ratio * A))`` starting at ``offset_l = l * knum^2`` (mod A).
    ``share_ratio = 1/L``: disjoint windows; ``1``: every layer sees the whole pool.
    """
    if not 0 < share_ratio <= 1:
        raise ValueError(f"share_ratio must be in (0, 1], got {share_ratio}")
    rows = n_layers * knum * knum
    n_l = math.isqrt(int(round(share_ratio * rows)))
    if n_l < 1:
        raise ValueError(f"share_ratio={share_ratio} is too small: each window would have {n_l} keys per axis "
                         f"(pool of {rows} rows)")
    return rows, n_l, [layer * knum * knum for layer in range(n_layers)]


@dataclass
class UltraMemV2Config(TuckerConfig):
    """UltraMemV2 (arXiv 2508.18756): TDQKR with per-rank queries + PEER-style FFN values."""

    d_pre: int = 32  # D_p pre-value width
    d_value: int = 32  # D_v value width (divisible by cores)
    key_expand: int = 1  # official mem_key_expand_time: grid n^2 addresses (n / key_expand)^2 rows
    activation: str | None = None  # on the pre-scores; the paper removes it (Eq. 15)
    value_std: float = 0.02  # sigma_V of values and pre-values (init.py computes Eq. 26)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_config(self, d_pre=self.d_pre, d_value=self.d_value, key_expand=self.key_expand)
        _check_floats(self, positive={"value_std": self.value_std})
        try:
            get_activation(self.activation)
        except ValueError as err:
            raise ValueError(f"UltraMemV2Config.{err}") from None
        if self.d_value % self.cores:
            raise ValueError(f"UltraMemV2Config: d_value={self.d_value} must be divisible by cores={self.cores}")
        if self.n_keys % self.key_expand:
            raise ValueError(f"UltraMemV2Config: n_keys={self.n_keys} must be divisible by key_expand={self.key_expand}")

    @property
    def window(self) -> int:
        """Physical rows this layer addresses."""
        return (self.n_keys // self.key_expand) ** 2


class UltraMemV2(nn.Module):
    """UltraMemV2 layer (Eq. 15): ``o = W_v sum_i (<P[i], W_pre x> * s_i) V[i]`` over the top-m slots.

    With ``pool=None`` the layer owns tables of ``cfg.window`` rows.  With a shared
    :class:`ValuePool` (not registered as a submodule here: the model that owns the pool registers
    it once) the layer reads rows ``(shuffle(v) mod window + offset) mod pool_rows``.
    """

    def __init__(self, cfg: UltraMemV2Config, pool: ValuePool | None = None, offset: int = 0):
        super().__init__()
        self.cfg, self.offset = cfg, offset
        self.retrieval = TuckerRetrieval(cfg)
        small = math.sqrt(2 / (5 * cfg.d_model))  # UltraMemV2 App. A small init
        self.pre_proj = nn.Linear(cfg.d_model, cfg.d_pre, bias=False)  # W_pre
        self.out_proj = nn.Linear(cfg.d_value, cfg.d_model, bias=False)  # W_v
        nn.init.normal_(self.pre_proj.weight, std=small)
        nn.init.normal_(self.out_proj.weight, std=small)
        self.register_buffer("shuffle", torch.randperm(cfg.n_keys**2))  # [n^2] virtual -> physical
        if pool is None:
            self.pre_values = nn.Parameter(torch.randn(cfg.window, cfg.d_pre) * cfg.value_std)  # [N, D_p]
            self.values = nn.Parameter(torch.randn(cfg.window, cfg.d_value) * cfg.value_std)  # [N, D_v]
            self._pool: list[ValuePool] = []
        else:
            if pool.values.shape[1] != cfg.d_value or pool.pre_values.shape[1] != cfg.d_pre:
                raise ValueError("pool widths must match cfg.d_pre and cfg.d_value")
            if cfg.window > pool.values.shape[0]:
                raise ValueError(f"window {cfg.window} exceeds the pool's {pool.values.shape[0]} rows")
            self._pool = [pool]

    def tables(self) -> tuple[Tensor, Tensor]:
        """``(pre_values [A, D_p], values [A, D_v])`` this layer reads from."""
        if self._pool:
            return self._pool[0].pre_values, self._pool[0].values
        return self.pre_values, self.values

    def physical_rows(self, virtual: Tensor) -> Tensor:
        """Virtual grid slot -> physical table row (shuffle, fold the expansion, shift by offset)."""
        rows = self.tables()[1].shape[0]
        return (self.shuffle[virtual] % self.cfg.window + self.offset) % rows

    def forward(self, x: Tensor) -> MemoryOutput:
        scores, virtual, aux = self.retrieval(x)  # [..., m, c], [..., m]
        rows = self.physical_rows(virtual)  # [..., m]
        pre_values, values = self.tables()
        peer_values = backends.get("peer_values", self.cfg.backend, x)
        z = peer_values(self.pre_proj(x), pre_values, values, rows, scores, self.cfg.activation)  # [..., D_v]
        return MemoryOutput(self.out_proj(z), rows, scores, aux)  # [..., d]


def refresh_rank1(model: nn.Module) -> None:
    """Refresh every TDQKR prefilter in ``model``; call once per optimiser step (after ``step()``)."""
    for module in model.modules():
        if isinstance(module, (TuckerRetrieval, MultiHeadTuckerRetrieval)):
            module.refresh_rank1()
