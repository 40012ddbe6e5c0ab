"""Exercises of notebook 02 (Tucker-decomposed query-key retrieval, UltraMem TDQKR).

* ``nb02_tucker_grid``: the summed grid ``sum_c S_row C_c S_col^T`` (UltraMemV2 Eqs. 6-7, MCS).
* ``nb02_prefilter_topk``: the rank-1 prefilter + full-core rescoring (UltraMem Eqs. 6-10).
* ``nb02_tucker_penalty``: the Tucker-core penalty (UltraMem; written as UltraMemV2 Eq. 17).
"""
from __future__ import annotations

import torch

from ..retrieval import rank1_factors, tucker_grid, tucker_rank_penalty, tucker_topk
from .harness import register


def _axis_inputs(gen: torch.Generator, n_lo: int = 4, n_hi: int = 12):
    """(s_row [B, n, r], s_col [B, n, r], cores [c, r, r]) with continuous values."""
    b = int(torch.randint(1, 4, (), generator=gen))
    n = int(torch.randint(n_lo, n_hi + 1, (), generator=gen))
    r = int(torch.randint(2, 4, (), generator=gen))
    c = int(torch.randint(1, 3, (), generator=gen))
    s_row = torch.randn(b, n, r, generator=gen)
    s_col = torch.randn(b, n, r, generator=gen)
    cores = torch.rand(c, r, r, generator=gen)  # U[0, 1] like the layers' init
    return s_row, s_col, cores


# ----------------------------------------------------------------------------------------------
# nb02_tucker_grid
# ----------------------------------------------------------------------------------------------


def _grid_reference(s_row, s_col, cores):
    return tucker_grid(s_row, s_col, cores).sum(-3)


def _grid_core_transposed(s_row, s_col, cores):
    """Contracts the row scores with the core's *second* index: S_row C^T S_col^T."""
    return torch.einsum("bia,cba,bjb->bij", s_row, cores, s_col)


def _grid_diagonal_only(s_row, s_col, cores):
    """Pairs rank a of the row only with rank a of the column (ignores off-diagonal core entries)."""
    diag = cores.sum(0).diagonal()  # [r]
    return torch.einsum("bia,a,bja->bij", s_row, diag, s_col)


def _grid_rows_and_columns_swapped(s_row, s_col, cores):
    """Puts the column keys on the first axis: grid[j, i] instead of grid[i, j]."""
    return _grid_reference(s_row, s_col, cores).transpose(-1, -2)


register(
    "nb02_tucker_grid",
    _grid_reference,
    _axis_inputs,
    wrong=[_grid_core_transposed, _grid_diagonal_only, _grid_rows_and_columns_swapped],
    description="Summed Tucker grid G[b, i, j] = sum_c sum_{a,e} s_row[b, i, a] C_c[a, e] s_col[b, j, e]. "
    "Args s_row, s_col [B, n, r], cores [c, r, r]; returns [B, n, n].",
)


# ----------------------------------------------------------------------------------------------
# nb02_prefilter_topk
# ----------------------------------------------------------------------------------------------


def _prefilter_inputs(gen: torch.Generator):
    s_row, s_col, cores = _axis_inputs(gen, 8, 16)
    n = s_row.shape[1]
    m = int(torch.randint(2, 5, (), generator=gen))
    k = int(torch.randint(m, n // 2 + 1, (), generator=gen))  # k < n: a real filter
    u, v = rank1_factors(cores)
    return s_row, s_col, cores, u, v, m, k


def _prefilter_reference(s_row, s_col, cores, u, v, m, k):
    scores, idx = tucker_topk(s_row, s_col, cores, m, k=k, rank1=(u, v))
    return scores.sum(-1), idx


def _prefilter_exact(s_row, s_col, cores, u, v, m, k):
    """Scans the whole grid: the ground truth the prefilter approximates, not the prefilter."""
    scores, idx = tucker_topk(s_row, s_col, cores, m, exact=True)
    return scores.sum(-1), idx


def _prefilter_ranks_by_rank1(s_row, s_col, cores, u, v, m, k):
    """Keeps the top-m candidates by the rank-1 product a_i * b_j instead of rescoring with the cores."""
    n = s_row.shape[1]
    a, b = s_row @ u, s_col @ v  # [B, n]
    idx_r, idx_c = a.topk(k, -1).indices, b.topk(k, -1).indices  # [B, k]
    prod = (a.gather(-1, idx_r)[:, :, None] * b.gather(-1, idx_c)[:, None, :]).flatten(1)  # [B, k*k]
    best = prod.topk(m, -1).indices
    rows, cols = idx_r.gather(-1, best // k), idx_c.gather(-1, best % k)
    full = tucker_grid(s_row, s_col, cores).sum(-3)  # [B, n, n]
    scores = full.flatten(1).gather(-1, rows * n + cols)
    order = scores.argsort(-1, descending=True)
    return scores.gather(-1, order), (rows * n + cols).gather(-1, order)


def _prefilter_flipped_v(s_row, s_col, cores, u, v, m, k):
    """Flips the sign of v alone: ranks the columns by the negated rank-1 score."""
    scores, idx = tucker_topk(s_row, s_col, cores, m, k=k, rank1=(u, -v))
    return scores.sum(-1), idx


register(
    "nb02_prefilter_topk",
    _prefilter_reference,
    _prefilter_inputs,
    wrong=[_prefilter_exact, _prefilter_ranks_by_rank1, _prefilter_flipped_v],
    description="Rank-1 prefilter: a = s_row @ u, b = s_col @ v, top-k rows x top-k columns as candidates, "
    "rescore them with the full cores, keep the top-m. Args s_row, s_col [B, n, r], cores [c, r, r], "
    "u, v [r], m, k; returns (summed scores [B, m] descending, slot ids [B, m] = i * n + j).",
)


# ----------------------------------------------------------------------------------------------
# nb02_tucker_penalty
# ----------------------------------------------------------------------------------------------


def _penalty_inputs(gen: torch.Generator):
    r = int(torch.randint(3, 6, (), generator=gen))
    c = 2  # the penalty acts on the sum of the cores
    return 0.3 * torch.randn(c, r, r, generator=gen), 0.15


def _penalty_reference(cores, tau):
    return tucker_rank_penalty(cores, tau)


def _penalty_includes_leading(cores, tau):
    """Penalises lambda_1 too: that pushes the whole core to zero instead of towards rank 1."""
    sv = torch.linalg.svdvals(cores.sum(0))
    return torch.relu(sv - tau).pow(2).sum() / (sv.shape[0] - 1)


def _penalty_per_core(cores, tau):
    """Penalises each core's spectrum separately; the prefilter uses the spectrum of their sum."""
    return sum(tucker_rank_penalty(core[None], tau) for core in cores)


def _penalty_no_margin(cores, tau):
    """Drops the relu margin: also pushes singular values that are already below tau."""
    sv = torch.linalg.svdvals(cores.sum(0))
    return (sv[1:] - tau).pow(2).sum() / (sv.shape[0] - 1)


register(
    "nb02_tucker_penalty",
    _penalty_reference,
    _penalty_inputs,
    wrong=[_penalty_includes_leading, _penalty_per_core, _penalty_no_margin],
    description="Tucker-core penalty 1/(r-1) * sum_{i>=2} relu(lambda_i - tau)^2 of the singular values "
    "of sum_c C_c. Args cores [c, r, r], tau; returns a scalar tensor.",
)
