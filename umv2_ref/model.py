"""A tiny pre-norm decoder-only language model whose per-block feed-forward is pluggable.

One block (pre-norm, RMSNorm, rotary positions, causal SDPA attention, SwiGLU FFN)::

    h_l     = x_l + Attn(RMSNorm_1(x_l))
    xbar_l  = RMSNorm_2(h_l)                  # the "FFN input"; memory layers read it too
    x_{l+1} = h_l + FFN(xbar_l) [+ Mem(xbar_a) for every memory placed (a -> l)]

``ModelConfig.ffn`` picks what the blocks contain (``MODEL_KINDS``):

* ``dense``: SwiGLU FFN in every block.
* ``moe``: top-k mixture of SwiGLU experts in every block (:class:`MoE`, Switch/OLMoE style).
* ``pkm`` / ``memoryplus`` / ``peer``: the memory layer *replaces* the FFN of the blocks listed
  in ``memory_layers`` (XLM's ``--mem_enc_positions``), SwiGLU elsewhere.  Memory+ layers share one
  :class:`~umv2_ref.layers.ValueTable` (``mem_share_values``, the Memory+ paper's default).
* ``ultramem``: SwiGLU everywhere plus skip-layer memories ``"a:b"`` that read block a's FFN
  input and add their output after block b (UltraMem v1), each with ``mem_heads`` retrieval heads.
* ``ultramemv2``: a memory layer in *every* block, in parallel with a shrunk SwiGLU on the same
  normalised input: ``x_{l+1} = h_l + FFN(xbar_l) + Mem_l(xbar_l)`` (docs/references.md Sec. 6.2), optionally
  with one :class:`~umv2_ref.layers.ValuePool` shared by all layers (``share_ratio``, Sec. 6.8).

Memory sizes are flat ``mem_*`` fields mapped onto the layer configs by :func:`memory_config`.
Training loops must call :func:`umv2_ref.layers.refresh_rank1` after every optimiser step when
the model has UltraMem / UltraMemV2 layers (the rank-1 prefilter buffers).

Initialisation (:func:`init_weights_`): every attention / FFN / expert / router / embedding weight is
``N(0, 2/(5d))`` ("small init", Nguyen & Salazar 2019, UltraMemV2 App. A), and the output
projections (attention out, FFN down, expert down) are further scaled by ``1/sqrt(2L)``.  Memory
layers keep their own initialisation; UltraMemV2 layers use ``umv2_ref.init.init_ultramemv2_``
with ``scheme=cfg.mem_init`` (default ``"paper"``, Eq. 26); ``cfg.mem_value_std`` overrides sigma_V.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .checks import require_indices_in_range, require_positive_int
from .init import init_ultramemv2_
from .layers import (
    PEER,
    PKM,
    MemoryOutput,
    MemoryPlus,
    PKMConfig,
    UltraMem,
    UltraMemConfig,
    UltraMemV2,
    UltraMemV2Config,
    ValuePool,
    ValueTable,
    ring_layout,
)

MODEL_KINDS = ("dense", "moe", "pkm", "memoryplus", "peer", "ultramem", "ultramemv2")
MEMORY_KINDS = ("pkm", "memoryplus", "peer", "ultramem", "ultramemv2")
REPLACE_KINDS = ("pkm", "memoryplus", "peer")  # memory replaces the FFN of its block
MEM_INITS = ("paper", "official")  # ModelConfig.mem_init: umv2_ref.init.SCHEMES
CALIBRATION_TOKENS = 1024  # Monte-Carlo tokens per UltraMemV2 layer for the norm-gain calibration at init


def default_d_ff(d_model: int) -> int:
    """SwiGLU inner width ``8d/3`` rounded up to a multiple of 8 (3 matrices ~ a 4d GELU MLP)."""
    return 8 * math.ceil(8 * d_model / 3 / 8)


@dataclass
class ModelConfig:
    """Everything that defines a :class:`TinyLM`.  Zero-valued widths resolve to documented defaults."""

    vocab_size: int
    d_model: int = 64
    n_layers: int = 4
    n_heads: int = 4
    max_seq_len: int = 256
    ffn: str = "dense"  # one of MODEL_KINDS
    d_ff: int = 0  # SwiGLU inner width; 0 -> default_d_ff(d_model). For ultramemv2: the shrunk FFN
    rope_base: float = 10000.0
    # --- top-k MoE (ffn="moe") ---
    n_experts: int = 16
    moe_topk: int = 2
    d_expert: int = 0  # expert inner width; 0 -> d_ff // moe_topk (same activated width as dense)
    moe_aux_weight: float = 0.01  # load-balancing loss weight (Switch Transformer Eq. 4)
    # --- memory placement ---
    # pkm/memoryplus/peer: comma-separated blocks whose FFN is replaced ("2" or "1,3");
    # ultramem: comma-separated "a:b" (read block a's FFN input, add after block b, a <= b);
    # ultramemv2: must stay "" (a memory in every block).  "" -> the middle block / "L/2-1:L/2".
    memory_layers: str = ""
    # --- memory sizes (see memory_config for the mapping onto the layer configs) ---
    # mem_knum: keys per axis of one layer's value table (the official mem_knum): a layer owns knum^2
    # value rows; its retrieval grid has n_keys = knum (pkm/memoryplus/peer), knum * sqrt(mem_expand)
    # (ultramem) or knum * mem_key_expand (ultramemv2) keys per axis.  See memory_config.
    mem_knum: int = 16
    mem_topk: int = 8  # PKM-family: k per head; UltraMem/V2: m slots per token
    mem_heads: int = 2  # heads: product-key heads (pkm/memoryplus/peer), UltraMem v1 TDQKR heads; ultramemv2: 1
    mem_d_key: int = 32  # PKM-family: query dim per head; UltraMem/V2: D_k
    mem_d_value: int = 0  # 0 -> d_model; memoryplus/ultramem/ultramemv2 value width D_v
    mem_share_values: bool = True  # memoryplus: all its memory layers read one value table (False: one each)
    mem_d_pre: int = 0  # ultramemv2 pre-value width D_p; 0 -> mem_d_value
    mem_query_norm: str = "layer"  # PKM-family query norm ('batch' would leak future tokens)
    mem_rank: int = 2  # Tucker rank r
    mem_cores: int = 2  # Tucker cores c (multi-core scoring)
    mem_expand: int = 4  # ultramem: implicit value expansion E, a perfect square (grid keys = knum sqrt(E))
    mem_key_expand: int = 1  # ultramemv2: official mem_key_expand_time (grid keys = this x window keys)
    mem_norm: str = "rms"  # TDQKR query/key norm
    mem_prefilter_quadrants: int = 1  # ultramem/ultramemv2 rank-1 prefilter: 1 as the papers, 2 both sign quadrants
    mem_tucker_penalty: float = 0.0  # UltraMem Eq. 17 weight (0.001 in UltraMem)
    mem_balance_loss: float = 0.0  # UltraMemV2 key-balance weight (0 in the paper)
    share_ratio: float | None = None  # ultramemv2: None -> one table per layer; else ring_layout
    mem_init: str = "paper"  # ultramemv2 init: "paper" (App. A, Eq. 26) or "official" (released-code constants)
    mem_value_std: float | None = None  # ultramemv2: sigma_V of values and pre-values; None -> the scheme's
    backend: str = "auto"  # value-path backend for the memory layers

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len", "n_experts", "moe_topk"):
            require_positive_int(f"ModelConfig.{name}", getattr(self, name))
        if self.ffn not in MODEL_KINDS:
            raise ValueError(f"ModelConfig.ffn must be one of {MODEL_KINDS}, got {self.ffn!r}")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(f"ModelConfig.d_model={self.d_model} must split into n_heads={self.n_heads} "
                             "heads of even dim (rotary pairs)")
        if self.moe_topk > self.n_experts:
            raise ValueError(f"ModelConfig.moe_topk={self.moe_topk} must be <= n_experts={self.n_experts}")
        if self.share_ratio is not None and self.ffn != "ultramemv2":
            raise ValueError(f"ModelConfig.share_ratio is for ffn='ultramemv2' only, got ffn={self.ffn!r}")
        if self.mem_init not in MEM_INITS:
            raise ValueError(f"ModelConfig.mem_init must be one of {MEM_INITS}, got {self.mem_init!r}")
        if self.mem_value_std is not None and (isinstance(self.mem_value_std, bool) or not isinstance(
                self.mem_value_std, (int, float)) or not 0 < self.mem_value_std < math.inf):
            raise ValueError(f"ModelConfig.mem_value_std must be None or a positive finite float, got {self.mem_value_std!r}")
        if self.mem_prefilter_quadrants != 1 and self.ffn not in ("ultramem", "ultramemv2"):
            raise ValueError(f"ModelConfig.mem_prefilter_quadrants is for ffn='ultramem' or 'ultramemv2' only, "
                             f"got ffn={self.ffn!r}")
        if not self.mem_share_values and self.ffn != "memoryplus":
            raise ValueError(f"ModelConfig.mem_share_values=False is for ffn='memoryplus' only, got ffn={self.ffn!r}")
        self.d_ff = self.d_ff or default_d_ff(self.d_model)
        self.d_expert = self.d_expert or max(1, self.d_ff // self.moe_topk)
        self.mem_d_value = self.mem_d_value or self.d_model
        self.mem_d_pre = self.mem_d_pre or self.mem_d_value
        if memory_placements(self):  # validates memory_layers
            memory_config(self)  # validates the mem_* sizes (the layer configs raise)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


def memory_placements(cfg: ModelConfig) -> list[tuple[int, int]]:
    """``[(read_block, write_block), ...]`` for every memory layer, sorted by write block."""
    L, spec = cfg.n_layers, cfg.memory_layers.replace(" ", "")
    if cfg.ffn not in MEMORY_KINDS:
        if spec:
            raise ValueError(f"ModelConfig.memory_layers must be '' for ffn={cfg.ffn!r}, got {spec!r}")
        return []
    if cfg.ffn == "ultramemv2":
        if spec:
            raise ValueError(f"ModelConfig.memory_layers must be '' for ultramemv2 (every block), got {spec!r}")
        return [(layer, layer) for layer in range(L)]
    if not spec:
        spec = str(L // 2) if cfg.ffn in REPLACE_KINDS else f"{max(0, L // 2 - 1)}:{L // 2}"
    pairs = []
    for item in spec.split(","):
        parts = item.split(":")
        if cfg.ffn in REPLACE_KINDS and len(parts) != 1 or cfg.ffn == "ultramem" and len(parts) != 2:
            form = "'a' block indices" if cfg.ffn in REPLACE_KINDS else "'a:b' pairs"
            raise ValueError(f"ModelConfig.memory_layers for {cfg.ffn} takes comma-separated {form}, got {spec!r}")
        try:
            a, b = int(parts[0]), int(parts[-1])
        except ValueError:
            raise ValueError(f"ModelConfig.memory_layers has a non-integer entry {item!r}") from None
        if not 0 <= a <= b < L:
            raise ValueError(f"ModelConfig.memory_layers entry {item!r} needs 0 <= a <= b < n_layers={L}")
        pairs.append((a, b))
    if cfg.ffn in REPLACE_KINDS and len({a for a, _ in pairs}) != len(pairs):
        raise ValueError(f"ModelConfig.memory_layers lists a block twice: {spec!r}")
    return sorted(pairs, key=lambda p: (p[1], p[0]))


def memory_config(cfg: ModelConfig) -> PKMConfig | UltraMemConfig | UltraMemV2Config:
    """The layer config of one memory layer of ``cfg`` (all memory layers of a model share it).

    ``mem_knum`` is the official ``mem_knum``: one layer's value table has ``knum^2`` rows.  The
    layer config's ``n_keys`` counts the keys per axis of the *retrieval grid*: ``knum`` for the
    product-key memories; ``knum * sqrt(E)`` for UltraMem v1, whose grid of ``E knum^2`` virtual slots
    folds onto the ``knum^2`` rows (IVE, E = ``mem_expand``); ``n_l * mem_key_expand`` for UltraMemV2,
    whose value window has ``n_l = knum`` keys per axis, or with ``share_ratio`` ``n_l = floor(sqrt(
    share_ratio L knum^2))`` (:func:`~umv2_ref.layers.ring_layout`).
    """
    if cfg.ffn in REPLACE_KINDS:
        d_value = cfg.mem_d_value if cfg.ffn == "memoryplus" else cfg.d_model
        return PKMConfig(d_model=cfg.d_model, n_keys=cfg.mem_knum, d_key=cfg.mem_d_key, heads=cfg.mem_heads,
                         topk=cfg.mem_topk, query_norm=cfg.mem_query_norm, d_value=d_value, backend=cfg.backend)
    tucker = dict(d_model=cfg.d_model, d_key=cfg.mem_d_key, rank=cfg.mem_rank, cores=cfg.mem_cores,
                  topm=cfg.mem_topk, norm=cfg.mem_norm, prefilter_quadrants=cfg.mem_prefilter_quadrants,
                  tucker_penalty=cfg.mem_tucker_penalty,
                  balance_loss=cfg.mem_balance_loss, backend=cfg.backend)
    if cfg.ffn == "ultramem":
        side = math.isqrt(cfg.mem_expand) if cfg.mem_expand > 0 else 0
        if side * side != cfg.mem_expand:
            raise ValueError(f"ModelConfig.mem_expand must be a perfect square for ultramem (its grid has "
                             f"knum * sqrt(E) keys per axis), got {cfg.mem_expand!r}")
        return UltraMemConfig(**tucker, n_keys=cfg.mem_knum * side, heads=cfg.mem_heads, d_value=cfg.mem_d_value,
                              expand=cfg.mem_expand)
    if cfg.ffn == "ultramemv2":
        window_keys = cfg.mem_knum
        if cfg.share_ratio is not None:
            window_keys = ring_layout(cfg.n_layers, cfg.mem_knum, cfg.share_ratio)[1]
        return UltraMemV2Config(**tucker, n_keys=window_keys * cfg.mem_key_expand, d_pre=cfg.mem_d_pre,
                                d_value=cfg.mem_d_value, key_expand=cfg.mem_key_expand)
    raise ValueError(f"ffn={cfg.ffn!r} has no memory layer")


# ---------------------------------------------------------------------------------------------
# Attention with rotary positions
# ---------------------------------------------------------------------------------------------


def rotary_tables(head_dim: int, max_seq_len: int, base: float = 10000.0) -> tuple[Tensor, Tensor]:
    """``cos, sin`` of the RoPE angles ``t * base^(-2i/head_dim)``, each ``[T, head_dim/2]`` (RoFormer Eq. 34)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # [hd/2]
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)  # [T, hd/2]
    return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate channel pairs ``(i, i + hd/2)`` of ``x [B, H, T, hd]`` by the position's angles."""
    x1, x2 = x.chunk(2, dim=-1)  # [B, H, T, hd/2] each
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)  # [B, H, T, hd]


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention via ``F.scaled_dot_product_attention(is_causal=True)``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)  # output linear
        cos, sin = rotary_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_base)
        self.register_buffer("cos", cos, persistent=False)  # [T_max, hd/2]
        self.register_buffer("sin", sin, persistent=False)  # [T_max, hd/2]

    def forward(self, x: Tensor) -> Tensor:
        B, T, d = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)  # [B, H, T, hd] x3
        cos, sin = self.cos[:T].to(x.dtype), self.sin[:T].to(x.dtype)  # [T, hd/2]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)  # [B, H, T, hd]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, T, hd]
        return self.proj(y.transpose(1, 2).reshape(B, T, d))  # [B, T, d]


# ---------------------------------------------------------------------------------------------
# Feed-forwards: SwiGLU and top-k MoE
# ---------------------------------------------------------------------------------------------


class SwiGLU(nn.Module):
    """``FFN(x) = W_down (silu(W_gate x) * W_up x)`` (Shazeer 2020, GLU variants)."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.gate = nn.Linear(d_model, d_ff, bias=False)
        self.up = nn.Linear(d_model, d_ff, bias=False)
        self.down = nn.Linear(d_ff, d_model, bias=False)  # output linear

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))  # [..., d]


def load_balancing_loss(probs: Tensor, expert_ids: Tensor) -> Tensor:
    """Switch Transformer Eq. 4 generalised to top-k: ``E * sum_i f_i * P_i``.

    ``f_i`` = fraction of the ``T*k`` (token, slot) assignments that go to expert i, ``P_i`` = mean
    router probability of expert i.  Equals 1 under perfectly uniform routing and probabilities.
    probs ``[T, E]`` (softmax, differentiable); expert_ids ``[T, k]``.
    """
    E = probs.shape[-1]
    counts = torch.bincount(expert_ids.reshape(-1), minlength=E).to(probs.dtype)  # [E]
    f = counts / expert_ids.numel()  # [E]
    return E * (f * probs.mean(0)).sum()


class MoE(nn.Module):
    """Top-k mixture of SwiGLU experts (Switch Transformer / OLMoE style).

    ``g = softmax(W_r x)``; the k largest ``g_e`` (not renormalised, as OLMoE) weight their experts:
    ``y = sum_{e in topk(g)} g_e SwiGLU_e(x)``.  Expert weights are stacked ``[E, d, d_e]`` so the
    dispatch is a handful of tensor ops: the ``T*k`` (token, slot) assignments are sorted by
    expert and packed into a zero-padded ``[E, C, d]`` buffer (C = the busiest expert's load, no
    token is dropped), every expert runs as one batched matmul, and results are scattered back.
    """

    def __init__(self, d_model: int, n_experts: int, topk: int, d_expert: int, aux_weight: float):
        super().__init__()
        self.topk, self.aux_weight = topk, aux_weight
        self.router = nn.Linear(d_model, n_experts, bias=False)
        self.w_gate = nn.Parameter(torch.empty(n_experts, d_model, d_expert))  # [E, d, d_e]
        self.w_up = nn.Parameter(torch.empty(n_experts, d_model, d_expert))  # [E, d, d_e]
        self.w_down = nn.Parameter(torch.empty(n_experts, d_expert, d_model))  # [E, d_e, d] output linear

    def route(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x ``[T, d]`` -> ``(probs [T, E], gates [T, k], expert_ids [T, k])``."""
        probs = self.router(x).softmax(-1)  # [T, E]
        gates, expert_ids = probs.topk(self.topk, dim=-1)  # [T, k]
        return probs, gates, expert_ids

    def experts(self, x: Tensor, expert_ids: Tensor) -> Tensor:
        """Run expert ``expert_ids[t, s]`` on token t for every slot s: ``[T, d], [T, k] -> [T, k, d]``."""
        T, k = expert_ids.shape
        E = self.w_gate.shape[0]
        flat = expert_ids.reshape(-1)  # [T*k] expert of each assignment
        order = flat.argsort(stable=True)  # [T*k] assignments grouped by expert
        counts = torch.bincount(flat, minlength=E)  # [E]
        starts = counts.cumsum(0) - counts  # [E] first packed position of each expert
        expert = flat[order]  # [T*k]
        pos = torch.arange(T * k, device=x.device) - starts[expert]  # [T*k] position inside its expert
        C = int(counts.max())
        packed = x.new_zeros(E * C, x.shape[-1]).index_copy(0, expert * C + pos, x[order // k])  # [E*C, d]
        packed = packed.view(E, C, -1)  # [E, C, d] zero rows are padding (SwiGLU(0) = 0)
        hidden = F.silu(torch.bmm(packed, self.w_gate)) * torch.bmm(packed, self.w_up)  # [E, C, d_e]
        out = torch.bmm(hidden, self.w_down).view(E * C, -1)  # [E*C, d]
        per_slot = out.new_empty(T * k, out.shape[-1]).index_copy(0, order, out[expert * C + pos])  # [T*k, d]
        return per_slot.view(T, k, -1)  # [T, k, d]

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """x ``[..., d]`` -> ``(y [..., d], {"moe_balance": weighted loss})``."""
        flat = x.reshape(-1, x.shape[-1])  # [T, d]
        probs, gates, expert_ids = self.route(flat)  # [T, E], [T, k], [T, k]
        y = torch.einsum("tk,tkd->td", gates, self.experts(flat, expert_ids))  # [T, d]
        aux = {"moe_balance": self.aux_weight * load_balancing_loss(probs, expert_ids)} if self.aux_weight else {}
        return y.view(x.shape), aux


# ---------------------------------------------------------------------------------------------
# Blocks and the model
# ---------------------------------------------------------------------------------------------


class Block(nn.Module):
    """Pre-norm block; ``ffn`` is a SwiGLU, a MoE, or None (a memory layer takes its place)."""

    def __init__(self, cfg: ModelConfig, ffn: nn.Module | None):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.d_model)
        self.ffn = ffn

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """x ``[B, T, d]`` -> ``(h + FFN(xbar), xbar, aux)``; xbar is the normalised FFN input."""
        h = x + self.attn(self.attn_norm(x))  # [B, T, d]
        xbar = self.ffn_norm(h)  # [B, T, d]
        if self.ffn is None:
            return h, xbar, {}
        if isinstance(self.ffn, MoE):
            y, aux = self.ffn(xbar)  # [B, T, d]
            return h + y, xbar, aux
        return h + self.ffn(xbar), xbar, {}


@dataclass
class LMOutput:
    logits: Tensor  # [B, T, V]
    aux_losses: dict[str, Tensor] = field(default_factory=dict)  # weighted, "<module>.<name>" keys
    memory: list[MemoryOutput] = field(default_factory=list)  # one per memory layer, in block order


def build_memories(cfg: ModelConfig) -> tuple[list[nn.Module], ValuePool | ValueTable | None]:
    """One memory layer per placement, and the value store they share, if any: the
    :class:`ValuePool` of ultramemv2 with ``share_ratio``, or the :class:`ValueTable` of memoryplus
    with ``mem_share_values``."""
    placements = memory_placements(cfg)
    if not placements:
        return [], None
    layer_cfg = memory_config(cfg)
    if cfg.ffn == "ultramemv2" and cfg.share_ratio is not None:
        rows, _, offsets = ring_layout(cfg.n_layers, cfg.mem_knum, cfg.share_ratio)
        pool = ValuePool(rows, layer_cfg.d_pre, layer_cfg.d_value, std=layer_cfg.value_std)
        return [UltraMemV2(layer_cfg, pool=pool, offset=offsets[a]) for a, _ in placements], pool
    if cfg.ffn == "memoryplus" and cfg.mem_share_values:
        table = ValueTable(layer_cfg.n_slots, layer_cfg.d_value)
        return [MemoryPlus(layer_cfg, table=table) for _ in placements], table
    layer_cls = {"pkm": PKM, "memoryplus": MemoryPlus, "peer": PEER, "ultramem": UltraMem, "ultramemv2": UltraMemV2}
    return [layer_cls[cfg.ffn](layer_cfg) for _ in placements], None


class TinyLM(nn.Module):
    """Decoder-only LM: token embedding, ``n_layers`` :class:`Block` s, memories, final RMSNorm, tied head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.placements = memory_placements(cfg)
        replaced = {a for a, _ in self.placements} if cfg.ffn in REPLACE_KINDS else set()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, None if i in replaced else self._make_ffn(cfg))
                                    for i in range(cfg.n_layers))
        memories, pool = build_memories(cfg)
        self.memory = nn.ModuleList(memories)
        self.value_pool = pool  # registered once here; the layers sharing it only reference it
        self.norm = nn.RMSNorm(cfg.d_model)
        init_weights_(self)

    @staticmethod
    def _make_ffn(cfg: ModelConfig) -> nn.Module:
        if cfg.ffn == "moe":
            return MoE(cfg.d_model, cfg.n_experts, cfg.moe_topk, cfg.d_expert, cfg.moe_aux_weight)
        return SwiGLU(cfg.d_model, cfg.d_ff)

    def forward(self, tokens: Tensor) -> LMOutput:
        """tokens ``[B, T]`` (T <= max_seq_len) -> :class:`LMOutput`."""
        if tokens.dim() != 2 or tokens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"tokens must be an int tensor [B, T], got {tuple(tokens.shape)} {tokens.dtype}")
        if tokens.shape[1] > self.cfg.max_seq_len:
            raise ValueError(f"tokens has T={tokens.shape[1]} > max_seq_len={self.cfg.max_seq_len}")
        if tokens.device.type == "cpu" and not torch.compiler.is_compiling():  # a free value check on CPU;
            # on CUDA the embedding kernel's own device assert catches it without a host sync
            require_indices_in_range("tokens", tokens, self.cfg.vocab_size, "the embedding, vocab_size")
        x = self.embed(tokens)  # [B, T, d]
        reads: dict[int, Tensor] = {}  # block -> its normalised FFN input
        aux: dict[str, Tensor] = {}
        memory_outputs: list[MemoryOutput] = []
        for i, block in enumerate(self.blocks):
            x, reads[i], block_aux = block(x)  # [B, T, d], [B, T, d]
            aux.update({f"block{i}.{name}": value for name, value in block_aux.items()})
            for j, (a, b) in enumerate(self.placements):
                if b == i:
                    out = self.memory[j](reads[a])  # MemoryOutput, output [B, T, d]
                    x = x + out.output  # [B, T, d]
                    aux.update({f"memory{j}.{name}": value for name, value in out.aux_losses.items()})
                    memory_outputs.append(out)
        logits = self.norm(x) @ self.embed.weight.T  # [B, T, V] tied head
        return LMOutput(logits, aux, memory_outputs)

    @torch.no_grad()
    def generate(self, tokens: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        """Sample ``max_new_tokens`` tokens after the prompt ``tokens [B, T]``; returns ``[B, T + new]``.

        Each step feeds the last ``max_seq_len`` tokens (the context is cropped, as nanoGPT does),
        divides the last position's logits by ``temperature``, keeps the ``top_k`` largest (all when
        None) and samples from their softmax with ``generator`` (a seeded generator makes the output
        reproducible).  ``temperature=0`` picks the most likely token (greedy).  The model's
        train/eval mode is left as it was; call ``.eval()`` first for a trained model.
        """
        if not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"tokens must be an int tensor [B, T], got "
                             f"{tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__}")
        if tokens.shape[0] == 0 or tokens.shape[1] == 0:
            raise ValueError(f"tokens must hold at least one token per row, got shape {tuple(tokens.shape)}")
        require_indices_in_range("tokens", tokens, self.cfg.vocab_size, "the embedding, vocab_size")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
                math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)
                                  or not 1 <= top_k <= self.cfg.vocab_size):
            raise ValueError(f"top_k must be None or an int in [1, vocab_size={self.cfg.vocab_size}], got {top_k!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        out = tokens.long()
        for _ in range(max_new_tokens):
            logits = self(out[:, -self.cfg.max_seq_len:]).logits[:, -1, :].float()  # [B, V]
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)  # [B, 1]
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = logits.topk(top_k, dim=-1).values[:, -1:]  # [B, 1]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = logits.softmax(-1)  # [B, V]
                nxt = torch.multinomial(probs, 1, generator=generator)  # [B, 1]
            out = torch.cat([out, nxt.to(out.device)], dim=1)  # [B, T + i + 1]
        return out


def lm_loss(out: LMOutput, targets: Tensor, ignore_index: int = -100) -> tuple[Tensor, dict[str, float]]:
    """Next-token cross-entropy plus every (already weighted) auxiliary loss.

    Returns ``(loss, parts)``; ``parts`` has ``ce``, ``aux`` (their sum), ``loss`` and one entry per
    auxiliary loss kind summed over layers (e.g. ``moe_balance``), as floats for logging.
    """
    logits = out.logits
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"targets must have shape {tuple(logits.shape[:-1])}, got {tuple(targets.shape)}")
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=ignore_index)
    aux = sum(out.aux_losses.values(), ce.new_zeros(()))
    parts = {"ce": ce.item(), "aux": aux.item()}
    for key, value in out.aux_losses.items():
        kind = key.split(".", 1)[1]
        parts[kind] = parts.get(kind, 0.0) + value.item()
    loss = ce + aux
    parts["loss"] = loss.item()
    return loss, parts


# ---------------------------------------------------------------------------------------------
# Initialisation
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def init_weights_(model: TinyLM) -> None:
    """Small init ``N(0, 2/(5d))`` for embeddings, attention, FFN, experts and router; output linears
    (attention ``proj``, FFN ``down``, expert ``w_down``) times ``1/sqrt(2L)``.  Memory layers keep
    their own init, except UltraMemV2 layers, which get :func:`umv2_ref.init.init_ultramemv2_` with
    ``scheme=cfg.mem_init`` (``"paper"``: App. A, calibrated norm gains, Eq. 26 value std, ``k_inner =
    d_ff / d``; ``CALIBRATION_TOKENS`` x m top-m scores estimate the mean score, ample for a mean of ~1;
    ``"official"``: the released code's constants, sigma_V = 0.02); a set ``cfg.mem_value_std`` then
    redraws the values and pre-values with that std.
    """
    cfg = model.cfg
    std = math.sqrt(2 / (5 * cfg.d_model))
    out_std = std / math.sqrt(2 * cfg.n_layers)
    nn.init.normal_(model.embed.weight, std=std)
    for block in model.blocks:
        nn.init.normal_(block.attn.qkv.weight, std=std)
        nn.init.normal_(block.attn.proj.weight, std=out_std)
        if isinstance(block.ffn, SwiGLU):
            for lin in (block.ffn.gate, block.ffn.up):
                nn.init.normal_(lin.weight, std=std)
            nn.init.normal_(block.ffn.down.weight, std=out_std)
        elif isinstance(block.ffn, MoE):
            for w in (block.ffn.router.weight, block.ffn.w_gate, block.ffn.w_up):
                nn.init.normal_(w, std=std)
            nn.init.normal_(block.ffn.w_down, std=out_std)
    for layer in model.memory:
        if isinstance(layer, UltraMemV2):
            init_ultramemv2_(layer, scheme=cfg.mem_init, n_layers=cfg.n_layers, k_inner=cfg.d_ff / cfg.d_model,
                             n_tokens=CALIBRATION_TOKENS)
            if cfg.mem_value_std is not None:  # sigma_V override (e.g. 0.02 with the paper's other choices)
                for table in layer.tables():
                    nn.init.normal_(table, std=cfg.mem_value_std)
