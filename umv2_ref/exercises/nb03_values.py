"""Exercises of notebook 03 (value expansion: UltraMem IVE and UltraMemV2's shared projection).

* ``nb03_implicit_expansion``: UltraMem's ``o = sum_p W_p^T (V^T s_p)`` over E virtual blocks.
* ``nb03_shared_projection``: UltraMemV2 Eq. 12, one projector ``W`` for every block.
* ``nb03_v2_macs``: multiply-accumulates per token of an UltraMemV2 layer (docs/references.md Sec. 7.9).
"""
from __future__ import annotations

import torch

from ..costs import ultramemv2_cost
from ..values import expanded_lookup
from .harness import register


def _expansion_inputs(gen: torch.Generator):
    """(table [N, D], virtual [T, m], scores [T, m], shuffle [E*N], blocks E)."""
    blocks = int(torch.randint(2, 5, (), generator=gen))
    n_rows = int(torch.randint(5, 13, (), generator=gen))
    d = int(torch.randint(2, 6, (), generator=gen))
    t = int(torch.randint(2, 5, (), generator=gen))
    m = int(torch.randint(3, 9, (), generator=gen))
    table = torch.randn(n_rows, d, generator=gen)
    virtual = torch.randint(0, blocks * n_rows, (t, m), generator=gen)
    scores = torch.randn(t, m, generator=gen)
    shuffle = torch.randperm(blocks * n_rows, generator=gen)
    return table, virtual, scores, shuffle, blocks


# ----------------------------------------------------------------------------------------------
# nb03_implicit_expansion
# ----------------------------------------------------------------------------------------------


def _ive_inputs(gen: torch.Generator):
    table, virtual, scores, shuffle, blocks = _expansion_inputs(gen)
    d_out = int(torch.randint(2, 6, (), generator=gen))
    proj = torch.randn(blocks, table.shape[1], d_out, generator=gen)  # [E, D, d_out] one W_p per block
    return table, virtual, scores, shuffle, proj


def _ive_reference(table, virtual, scores, shuffle, proj):
    z = expanded_lookup(table, virtual, scores, shuffle, proj.shape[0])  # [T, E, D]
    return torch.einsum("ted,edo->to", z, proj)


def _ive_no_shuffle(table, virtual, scores, shuffle, proj):
    """Decomposes the virtual id itself, forgetting the shuffle pi(v)."""
    return _ive_reference(table, virtual, scores, torch.arange(shuffle.numel()), proj)


def _ive_block_row_swapped(table, virtual, scores, shuffle, proj):
    """Reads block = pi(v) % E and row = pi(v) // E: interleaved blocks instead of contiguous ones."""
    blocks = proj.shape[0]
    phys = shuffle[virtual]  # [T, m]
    rows, block = phys // blocks, phys % blocks
    w = torch.nn.functional.one_hot(block, blocks).to(scores.dtype) * scores[..., None]  # [T, m, E]
    z = torch.einsum("tme,tmd->ted", w, table[rows])
    return torch.einsum("ted,edo->to", z, proj)


def _ive_one_projector(table, virtual, scores, shuffle, proj):
    """Projects every block with W_1: that is UltraMemV2's shared projector, not UltraMem's E projectors."""
    return _ive_reference(table, virtual, scores, shuffle, proj[:1].expand_as(proj))


register(
    "nb03_implicit_expansion",
    _ive_reference,
    _ive_inputs,
    wrong=[_ive_no_shuffle, _ive_block_row_swapped, _ive_one_projector],
    description="UltraMem IVE: virtual slot v -> pi(v) = shuffle[v], block p = pi(v) // N, row pi(v) % N; "
    "o = sum_p W_p^T sum_{k in block p} s_k V[row_k]. Args table [N, D], virtual [T, m], scores [T, m], "
    "shuffle [E*N], proj [E, D, d_out]; returns [T, d_out].",
)


# ----------------------------------------------------------------------------------------------
# nb03_shared_projection
# ----------------------------------------------------------------------------------------------


def _shared_inputs(gen: torch.Generator):
    table, virtual, scores, shuffle, blocks = _expansion_inputs(gen)
    d_out = int(torch.randint(2, 6, (), generator=gen))
    return table, virtual, scores, shuffle, blocks, torch.randn(table.shape[1], d_out, generator=gen)


def _shared_reference(table, virtual, scores, shuffle, blocks, w):
    return expanded_lookup(table, virtual, scores, shuffle, blocks).sum(-2) @ w


def _shared_mean_of_blocks(table, virtual, scores, shuffle, blocks, w):
    """Averages the block sums instead of adding them."""
    return expanded_lookup(table, virtual, scores, shuffle, blocks).mean(-2) @ w


def _shared_no_shuffle(table, virtual, scores, shuffle, blocks, w):
    """Folds the virtual id straight onto a row (v % N), forgetting the shuffle."""
    rows = virtual % table.shape[0]
    return torch.einsum("tm,tmd->td", scores, table[rows]) @ w


def _shared_first_block_only(table, virtual, scores, shuffle, blocks, w):
    """Keeps only block 0's pooled vector."""
    return expanded_lookup(table, virtual, scores, shuffle, blocks)[:, 0] @ w


register(
    "nb03_shared_projection",
    _shared_reference,
    _shared_inputs,
    wrong=[_shared_mean_of_blocks, _shared_no_shuffle, _shared_first_block_only],
    description="UltraMemV2 Eq. 12: o = W^T sum_p V^T s_p with one shared W. Args table [N, D], virtual [T, m], "
    "scores [T, m], shuffle [E*N], blocks E, w [D, d_out]; returns [T, d_out].",
)


# ----------------------------------------------------------------------------------------------
# nb03_v2_macs
# ----------------------------------------------------------------------------------------------


def _macs_inputs(gen: torch.Generator):
    """(d, n_keys, d_key, rank, cores, topm, d_pre, d_value) as Python ints."""
    def draw(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (), generator=gen))

    return draw(64, 1024), draw(32, 1200), draw(16, 256), draw(2, 4), draw(1, 3), draw(8, 64), draw(16, 256), \
        draw(16, 256)


def _macs_reference(d, n_keys, d_key, rank, cores, topm, d_pre, d_value):
    return ultramemv2_cost(d, n_keys, d_key, rank, cores, topm, d_pre, d_value).macs


def _macs_one_query(d, n_keys, d_key, rank, cores, topm, d_pre, d_value):
    """Counts one shared query (2 d D_k, UltraMem v1) instead of one per Tucker rank."""
    return ultramemv2_cost(d, n_keys, d_key, rank, cores, topm, d_pre, d_value, per_rank_queries=False).macs


def _macs_no_rescoring(d, n_keys, d_key, rank, cores, topm, d_pre, d_value):
    """Forgets the full-core rescoring of the m x m candidates, c (m r^2 + m^2 r)."""
    return _macs_reference(d, n_keys, d_key, rank, cores, topm, d_pre, d_value) - cores * (topm * rank**2 + topm**2 * rank)


def _macs_no_pre_projection(d, n_keys, d_key, rank, cores, topm, d_pre, d_value):
    """Forgets the pre-projection W_pre x (d D_p MACs)."""
    return _macs_reference(d, n_keys, d_key, rank, cores, topm, d_pre, d_value) - d * d_pre


register(
    "nb03_v2_macs",
    _macs_reference,
    _macs_inputs,
    wrong=[_macs_one_query, _macs_no_rescoring, _macs_no_pre_projection],
    description="MACs per token of one UltraMemV2 layer with per-rank queries and prefilter k = m: "
    "2 r d D_k + 2 n D_k r + 2 n r + c (m r^2 + m^2 r) + d D_p + m (D_p + D_v) + D_v d. Returns an int.",
)
