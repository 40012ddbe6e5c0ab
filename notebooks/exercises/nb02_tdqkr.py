"""Exercises of notebook 02 (Tucker-decomposed query-key retrieval, UltraMem TDQKR).

* ``nb02_tucker_grid``: the summed grid ``sum_c S_row C_c S_col^T`` (UltraMemV2 Eqs. 6-7, MCS).
* ``nb02_union_prefilter``: both sign choices of the rank-1 pair, candidate sets merged without duplicates.
* ``nb02_prefilter_topk``: the rank-1 prefilter + rescoring of the k x k candidates only (UltraMem Eqs. 6-10).
* ``nb02_tucker_penalty``: the Tucker-core penalty (UltraMem; written as UltraMemV2 Eq. 17).
"""
from __future__ import annotations

import torch

from umv2_ref import retrieval
from umv2_ref.exercises.harness import Mistake, register
from umv2_ref.retrieval import rank1_factors, tucker_grid, tucker_rank_penalty, tucker_topk

from . import divisible_by, draw, no_tensor_with, pick, uses_package


def _axis_inputs(gen: torch.Generator, n: int):
    """(s_row [B, n, r], s_col [B, n, r], cores [c, r, r]) with continuous values."""
    b, r, c = draw(gen, 1, 3), draw(gen, 2, 3), draw(gen, 1, 2)
    s_row = torch.randn(b, n, r, generator=gen)
    s_col = torch.randn(b, n, r, generator=gen)
    cores = torch.rand(c, r, r, generator=gen)  # U[0, 1] like the layers' init
    return s_row, s_col, cores


def _summed_grid(s_row, s_col, cores):
    return tucker_grid(s_row, s_col, cores).sum(-3)  # [B, n, n]


# ----------------------------------------------------------------------------------------------
# nb02_tucker_grid
# ----------------------------------------------------------------------------------------------


def _grid_core_transposed(s_row, s_col, cores):
    return torch.einsum("xia,cea,xje->xij", s_row, cores, s_col)


def _grid_diagonal_only(s_row, s_col, cores):
    diag = cores.sum(0).diagonal()  # [r]
    return torch.einsum("bia,a,bja->bij", s_row, diag, s_col)


def _grid_rows_and_columns_swapped(s_row, s_col, cores):
    return _summed_grid(s_row, s_col, cores).transpose(-1, -2)


def _grid_first_core(s_row, s_col, cores):
    return s_row @ cores[0] @ s_col.transpose(-1, -2)


register(
    "nb02_tucker_grid", _summed_grid, lambda gen: _axis_inputs(gen, draw(gen, 4, 12)),
    notebook="02", fn_name="my_tucker_grid",
    goal="Score the whole Tucker grid of a batch of queries with several cores, using that it is linear in the core.",
    mistakes=[
        Mistake("core_transposed", _grid_core_transposed,
                "you contracted the row scores with the core's second index (S_row C^T S_col^T); "
                "G[i, j] = sum_{a,b} S_row[i, a] C[a, b] S_col[j, b]."),
        Mistake("diagonal_core", _grid_diagonal_only,
                "you kept only the diagonal of the core, pairing rank a of the row with rank a of the "
                "column; the off-diagonal entries C[a, b] mix the ranks and are what makes the grid bilinear."),
        Mistake("rows_and_columns_swapped", _grid_rows_and_columns_swapped,
                "your grid is indexed [column, row]; G[b, i, j] has the row key i first."),
        Mistake("first_core_only", _grid_first_core,
                "you scored with one core; multi-core scoring ranks by the sum over all c cores."),
        uses_package(lambda s_row, s_col, cores: tucker_grid(s_row, s_col, cores).sum(1), tucker_grid,
                     instead="write it with @ or einsum."),
    ],
    spec="s_row, s_col [B, n, r] float32, cores [c, r, r] float32 -> summed grid [B, n, n] float32, "
         "G[b, i, j] = sum_c sum_{a,e} s_row[b, i, a] C_c[a, e] s_col[b, j, e].",
    outputs=("grid",),
    fingerprints=(r"@\s*\w+\.sum\(0\)\s*@\s*\w+\.transpose", r'einsum\("\w+,cab,\w+->'),
)


# ----------------------------------------------------------------------------------------------
# nb02_union_prefilter
# ----------------------------------------------------------------------------------------------


def _union_inputs(gen: torch.Generator):
    n = draw(gen, 8, 14)
    s_row, s_col, cores = _axis_inputs(gen, n)
    m = draw(gen, 2, 5)
    k = draw(gen, max(m, 3), n)  # k > n / 2 in about half the trials: the two candidate sets overlap
    u, v = rank1_factors(cores)
    return s_row, s_col, cores, u, v, m, k


def _candidate_mask(s_row, s_col, u, v, k):
    """[B, n, n] bool: the k x k candidates of the rank-1 pair (u, v)."""
    n = s_row.shape[1]
    rows = torch.zeros(s_row.shape[0], n, dtype=torch.bool).scatter_(1, (s_row @ u).topk(k, -1).indices, True)
    cols = torch.zeros(s_row.shape[0], n, dtype=torch.bool).scatter_(1, (s_col @ v).topk(k, -1).indices, True)
    return rows[:, :, None] & cols[:, None, :]


def _masked_topk(grid, mask, m):
    return grid.masked_fill(~mask, float("-inf")).flatten(1).topk(m, dim=-1)


def _union_reference(s_row, s_col, cores, u, v, m, k):
    scores, idx = tucker_topk(s_row, s_col, cores, m, k=k, rank1=(u, v), quadrants=2)
    return scores.sum(-1), idx


def _union_with_duplicates(s_row, s_col, cores, u, v, m, k):
    pos_s, pos_i = tucker_topk(s_row, s_col, cores, m, k=k, rank1=(u, v))
    neg_s, neg_i = tucker_topk(s_row, s_col, cores, m, k=k, rank1=(-u, -v))
    scores, ids = torch.cat([pos_s.sum(-1), neg_s.sum(-1)], -1), torch.cat([pos_i, neg_i], -1)
    best = scores.topk(m, dim=-1)
    return best.values, ids.gather(1, best.indices)


def _union_one_sign(s_row, s_col, cores, u, v, m, k):
    return _masked_topk(_summed_grid(s_row, s_col, cores), _candidate_mask(s_row, s_col, u, v, k), m)


def _union_flipped_pairs(s_row, s_col, cores, u, v, m, k):
    mask = _candidate_mask(s_row, s_col, u, -v, k) | _candidate_mask(s_row, s_col, -u, v, k)
    return _masked_topk(_summed_grid(s_row, s_col, cores), mask, m)


register(
    "nb02_union_prefilter", _union_reference, _union_inputs,
    notebook="02", fn_name="my_union_prefilter",
    goal="Cover both quadrants of the rank-1 factor plane and merge two candidate sets that may overlap.",
    mistakes=[
        Mistake("duplicate_slots", _union_with_duplicates,
                "when k > n/2 the (+)x(+) and (-)x(-) candidate sets overlap, and a slot found by both "
                "appears twice in your top-m; keep each slot once (for example: drop repeated ids after "
                "sorting, or mark candidates in a set/mask before taking the top-m)."),
        Mistake("one_quadrant", _union_one_sign,
                "you used only (u, v); the union also needs the candidates of (-u, -v), whose top-k rows "
                "and columns are the most *negative* rank-1 factors."),
        Mistake("one_sided_flip", _union_flipped_pairs,
                "you combined (u, -v) and (-u, v): a one-sided flip proposes the slots with the most "
                "negative rank-1 score; flip u and v jointly."),
        uses_package(_union_reference, tucker_topk, retrieval._prefilter, how=" with quadrants=2",
                     when=lambda call: call.get("quadrants", 1) == 2,
                     instead="merge the two quadrants' results yourself (tucker_topk with one quadrant is fine)."),
    ],
    spec="s_row, s_col [B, n, r] float32, cores [c, r, r], u, v [r], m, k ints (k may exceed n/2) -> "
         "(summed scores [B, m] float32 descending, slot ids [B, m] int64 = i * n + j, each slot once), "
         "the top-m of the union of the candidates of (u, v) and (-u, -v).",
    outputs=("scores", "slot ids"),
    fingerprints=(r"both_\w+\.gather\(", r"quadrants\s*=\s*2"),
)


# ----------------------------------------------------------------------------------------------
# nb02_prefilter_topk
# ----------------------------------------------------------------------------------------------


def _prefilter_inputs(gen: torch.Generator):
    n = pick(gen, 11, 13, 17)  # prime: only an n x n grid has n^2 entries per query
    s_row, s_col, cores = _axis_inputs(gen, n)
    m = draw(gen, 2, 4)
    k = draw(gen, m, n // 2)  # k < n/2: a real filter
    u, v = rank1_factors(cores)
    return s_row, s_col, cores, u, v, m, k


def _prefilter_reference(s_row, s_col, cores, u, v, m, k):
    scores, idx = tucker_topk(s_row, s_col, cores, m, k=k, rank1=(u, v))
    return scores.sum(-1), idx


def _prefilter_exact(s_row, s_col, cores, u, v, m, k):
    return _summed_grid(s_row, s_col, cores).flatten(1).topk(m, dim=-1)


def _prefilter_ranks_by_rank1(s_row, s_col, cores, u, v, m, k):
    n = s_row.shape[1]
    a, b = s_row @ u, s_col @ v  # [B, n]
    idx_r, idx_c = a.topk(k, -1).indices, b.topk(k, -1).indices  # [B, k]
    prod = (a.gather(-1, idx_r)[:, :, None] * b.gather(-1, idx_c)[:, None, :]).flatten(1)  # [B, k*k]
    best = prod.topk(m, -1).indices
    rows, cols = idx_r.gather(-1, best // k), idx_c.gather(-1, best % k)
    scores = _summed_grid(s_row, s_col, cores).flatten(1).gather(-1, rows * n + cols)
    order = scores.argsort(-1, descending=True)
    return scores.gather(-1, order), (rows * n + cols).gather(-1, order)


def _prefilter_flipped_v(s_row, s_col, cores, u, v, m, k):
    return _prefilter_reference(s_row, s_col, cores, u, -v, m, k)


def _prefilter_reads_full_grid(s_row, s_col, cores, u, v, m, k):
    n = s_row.shape[1]
    grid = _summed_grid(s_row, s_col, cores).flatten(1)  # [B, n*n]: what the exercise forbids
    idx_r, idx_c = (s_row @ u).topk(k, -1).indices, (s_col @ v).topk(k, -1).indices
    cand = (idx_r[:, :, None] * n + idx_c[:, None, :]).flatten(1)  # [B, k*k]
    top = grid.gather(1, cand).topk(m, -1)
    return top.values, cand.gather(1, top.indices)


register(
    "nb02_prefilter_topk", _prefilter_reference, _prefilter_inputs,
    notebook="02", fn_name="my_prefilter_topk",
    goal="Search a Tucker grid cheaply: rank-1 candidates per axis, full-core rescoring of the k x k pairs only.",
    mistakes=[
        Mistake("exact_scan", _prefilter_exact,
                "you returned the exact top-m of the whole grid; the prefilter only sees the k x k "
                "candidates of the rank-1 scores a = s_row u, b = s_col v (and so misses some slots)."),
        Mistake("ranks_by_rank1_product", _prefilter_ranks_by_rank1,
                "you chose the top-m candidates by a_i * b_j; the candidates must be *rescored* with the "
                "full summed core, which ranks them differently when lambda_2 > 0."),
        Mistake("one_sided_flip", _prefilter_flipped_v,
                "you flipped the sign of v alone, which ranks the columns by the negated rank-1 score; "
                "use the given (u, v) as they are."),
        Mistake("reads_full_grid", _prefilter_reads_full_grid,
                "right slots, but you built the full n x n grid and read the candidates off it; the point "
                "is to score only the k x k candidate pairs: gather their rows of s_row and s_col "
                "([B, k, r] each) and contract those with the summed core.",
                no_tensor_with("never build a tensor with n x n scores per query", divisible_by(
                    lambda a: a[0].shape[1] ** 2))),
        uses_package(_prefilter_reference, tucker_topk, retrieval._prefilter,
                     instead="write the two top-k, the gather and the rescoring."),
    ],
    spec="s_row, s_col [B, n, r] float32, cores [c, r, r], rank-1 pair u, v [r], m, k ints -> (summed "
         "scores [B, m] float32 descending, slot ids [B, m] int64 = i * n + j); no n x n grid.",
    outputs=("scores", "slot ids"),
    fingerprints=(r"gather\(\s*-?[12]\s*,\s*idx_r\[\.\.\.,\s*None\]\.expand",),
)


# ----------------------------------------------------------------------------------------------
# nb02_tucker_penalty
# ----------------------------------------------------------------------------------------------


def _penalty_inputs(gen: torch.Generator):
    r = draw(gen, 3, 5)
    return 0.3 * torch.randn(2, r, r, generator=gen), 0.15


def _penalty_includes_leading(cores, tau):
    sv = torch.linalg.svdvals(cores.sum(0))
    return torch.relu(sv - tau).pow(2).sum() / (sv.shape[0] - 1)


def _penalty_per_core(cores, tau):
    return sum(tucker_rank_penalty(core[None], tau) for core in cores)


def _penalty_no_margin(cores, tau):
    sv = torch.linalg.svdvals(cores.sum(0))
    return (sv[1:] - tau).pow(2).sum() / (sv.shape[0] - 1)


register(
    "nb02_tucker_penalty", tucker_rank_penalty, _penalty_inputs,
    notebook="02", fn_name="my_tucker_penalty",
    goal="Penalise only the non-leading singular values of the summed core, above a margin.",
    mistakes=[
        Mistake("penalises_leading", _penalty_includes_leading,
                "you penalised lambda_1 too; that shrinks the whole core towards zero instead of towards "
                "rank 1. Sum over i >= 2 only."),
        Mistake("per_core_spectra", _penalty_per_core,
                "you penalised each core's spectrum; the prefilter uses the rank-1 approximation of the "
                "*sum* of the cores, so the penalty acts on sum_c C_c."),
        Mistake("no_margin", _penalty_no_margin,
                "you dropped the relu margin, which also pushes singular values that are already below "
                "tau (and rewards them for going above); use max(0, lambda_i - tau)^2."),
        uses_package(lambda cores, tau: tucker_rank_penalty(cores, tau), tucker_rank_penalty,
                     instead="use torch.linalg.svdvals."),
    ],
    spec="cores [c, r, r] float32, tau float -> scalar tensor 1/(r-1) * sum_{i>=2} relu(lambda_i - tau)^2 "
         "of the singular values of sum_c C_c.",
    outputs=("penalty",),
    fingerprints=(r"relu\(\s*\w+\[1:\]\s*-\s*tau\)",),
)
