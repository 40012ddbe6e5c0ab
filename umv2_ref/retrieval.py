"""Which memory slots does a query read?  Product keys (PKM) and Tucker-decomposed retrieval (TDQKR).

Both score an n x n grid of slots from two length-n score vectors, one per axis, without ever
scoring the n^2 slots one by one:

* PKM (Lample et al. 2019, arXiv 1907.05242, Sec. 3.2): additive grid ``s_row[i] + s_col[j]``.
  Top-k per axis then top-k of the k x k candidate sums is *exact*: any pair outside
  ``I_row x I_col`` is beaten by at least k pairs inside it.
* TDQKR (UltraMem, arXiv 2411.12364; UltraMemV2 arXiv 2508.18756 Eqs. 6-7): each axis gives r
  scores per key, the grid is the bilinear form ``sum_c s_row[i]^T C_c s_col[j]`` with c Tucker
  cores (multi-core scoring, UltraMem Eqs. 16-17).  Its top-m is found approximately with a
  rank-1 prefilter (UltraMem Eqs. 6-10): the leading singular pair (u, v) of ``sum_c C_c`` turns
  each axis into one score (``s_row @ u``, ``s_col @ v``), top-k per axis proposes k x k
  candidates, and the full cores rescore them.  ``quadrants=2`` (this project's addition, not in
  the papers) also proposes the k x k grid of the most *negative* factors, whose product is just
  as large.

Flat slot index convention everywhere: ``i * n + j`` (row i, column j).

Tie policy: ``torch.topk`` breaks ties in an unspecified order, so when scores tie the *indices*
of two exact methods may differ while their *scores* agree.  Tests compare indices on
continuous random scores (ties have probability zero) and scores on tied inputs.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .checks import (
    require_finite,
    require_float,
    require_min_ndim,
    require_ndim,
    require_positive_int,
    require_same,
    require_tensor,
)


# ---------------------------------------------------------------------------------------------
# Product keys (PKM)
# ---------------------------------------------------------------------------------------------


def _check_axis_scores(s_row: Tensor, s_col: Tensor, min_ndim: int, shape_doc: str) -> int:
    require_tensor("s_row", s_row)
    require_tensor("s_col", s_col)
    require_float("s_row", s_row)
    require_float("s_col", s_col)
    require_min_ndim("s_row", s_row, min_ndim, shape_doc)
    require_min_ndim("s_col", s_col, min_ndim, shape_doc)
    require_same("dtype", s_row=s_row, s_col=s_col)
    require_same("device", s_row=s_row, s_col=s_col)
    if s_row.shape != s_col.shape:
        raise ValueError(
            f"s_row and s_col must have the same shape {shape_doc}; got {tuple(s_row.shape)} and {tuple(s_col.shape)}"
        )
    return s_row.shape[-min_ndim]


def product_key_topk(s_row: Tensor, s_col: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Exact top-k of the additive product-key grid (PKM, arXiv 1907.05242 Sec. 3.2).

    Args:
        s_row: ``[..., n]`` scores of the n row sub-keys (``C q_1``).
        s_col: ``[..., n]`` scores of the n column sub-keys (``C' q_2``).
        k: number of slots to return, ``1 <= k <= n``.

    Returns:
        ``(scores, indices)``, both ``[..., k]``, sorted by descending score; ``indices`` are flat
        slot ids ``i * n + j`` with ``scores == s_row[i] + s_col[j]``.
    """
    n = _check_axis_scores(s_row, s_col, 1, "[..., n]")
    require_positive_int("k", k)
    if k > n:
        raise ValueError(f"k must be <= n (keys per axis) = {n}, got k={k}")
    top_r, idx_r = s_row.topk(k, dim=-1)  # [..., k]
    top_c, idx_c = s_col.topk(k, dim=-1)  # [..., k]
    cand = (top_r[..., :, None] + top_c[..., None, :]).flatten(-2)  # [..., k*k]
    scores, flat = cand.topk(k, dim=-1)  # [..., k]
    rows = idx_r.gather(-1, flat // k)  # [..., k]
    cols = idx_c.gather(-1, flat % k)  # [..., k]
    return scores, rows * n + cols


def dense_topk(s_row: Tensor, s_col: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Brute-force top-k over all n^2 additive slots; the ground truth for ``product_key_topk``."""
    n = _check_axis_scores(s_row, s_col, 1, "[..., n]")
    require_positive_int("k", k)
    if k > n * n:
        raise ValueError(f"k must be <= n^2 = {n * n}, got k={k}")
    grid = (s_row[..., :, None] + s_col[..., None, :]).flatten(-2)  # [..., n*n]
    return grid.topk(k, dim=-1)


# ---------------------------------------------------------------------------------------------
# Tucker-decomposed query-key retrieval (TDQKR)
# ---------------------------------------------------------------------------------------------


def _check_tucker(s_row: Tensor, s_col: Tensor, cores: Tensor, m: int, *, exact: bool = False,
                  k: int | None = None, rank1: tuple[Tensor, Tensor] | None = None,
                  quadrants: int = 1) -> tuple[int, int]:
    """Refuse bad :func:`tucker_topk` inputs before any work; returns ``(n, r)``.

    Shapes, dtypes and devices first, then the sizes (``c >= 1``, ``r >= 1``, ``m``, and for the
    prefilter ``k``, ``quadrants`` and the shape of ``rank1``), then the values (finite scores,
    cores and ``rank1``: a NaN would make the reference and a kernel pick different slots).
    The Triton kernel calls this same function, so both refuse identically.
    """
    n = _check_axis_scores(s_row, s_col, 2, "[..., n, r]")
    r = s_row.shape[-1]
    require_tensor("cores", cores)
    require_float("cores", cores)
    require_ndim("cores", cores, 3, "[c, r, r]")
    if cores.shape[1:] != (r, r):
        raise ValueError(f"cores must have shape [c, r, r] with r={r} (from s_row); got {tuple(cores.shape)}")
    require_same("dtype", s_row=s_row, cores=cores)
    require_same("device", s_row=s_row, cores=cores)
    if cores.shape[0] == 0 or r == 0:
        raise ValueError(f"cores must have shape [c, r, r] with c >= 1 and r >= 1; got {tuple(cores.shape)}")
    require_positive_int("m", m)
    if m > n * n:
        raise ValueError(f"m must be <= n^2 = {n * n}, got m={m}")
    if isinstance(quadrants, bool) or not isinstance(quadrants, int) or quadrants not in (1, 2):
        raise ValueError(f"quadrants must be 1 or 2, got {quadrants!r}")
    if not exact:
        k = m if k is None else k
        require_positive_int("k", k)
        if k > n or k * k < m:
            raise ValueError(f"k (candidates per axis) must satisfy k <= n={n} and k*k >= m={m}; got k={k}")
        if rank1 is not None:
            _check_rank1(rank1, cores)
    require_finite("s_row", s_row)
    require_finite("s_col", s_col)
    require_finite("cores", cores)
    return n, r


def _check_rank1(rank1: object, cores: Tensor) -> None:
    """``rank1`` must be a pair ``(u, v)`` of finite float vectors ``[r]`` on the cores' device."""
    r = cores.shape[-1]
    if not isinstance(rank1, (tuple, list)) or len(rank1) != 2:
        raise ValueError(f"rank1 must be a pair (u, v) of [r] tensors, got {type(rank1).__name__}")
    for name, t in zip(("rank1[0]", "rank1[1]"), rank1):
        require_tensor(name, t)
        require_float(name, t)
        if tuple(t.shape) != (r,):
            raise ValueError(f"{name} must have shape [r] = [{r}], got {tuple(t.shape)}")
        require_same("device", **{name: t, "cores": cores})
        require_finite(name, t)


def tucker_grid(s_row: Tensor, s_col: Tensor, cores: Tensor) -> Tensor:
    """Per-core grid scores ``G_c[i, j] = s_row[i]^T C_c s_col[j]`` (UltraMem TDQKR, MCS).

    Shapes: s_row, s_col ``[..., n, r]``, cores ``[c, r, r]`` -> ``[..., c, n, n]``.
    This is the O(n^2) object the prefilter avoids; used for exact retrieval and for teaching.
    """
    return torch.einsum("...ia,cab,...jb->...cij", s_row, cores, s_col)


def rank1_factors(cores: Tensor, previous: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Leading singular pair ``(u, v)`` of ``sum_c C_c`` for the rank-1 prefilter (UltraMem Eqs. 6-10).

    ``sum_c C_c ~= lambda_1 u v^T`` with ``lambda_1 >= 0``.  ``(u, v)`` and ``(-u, -v)`` are equally
    valid, but they select *opposite quadrants*: top-k of ``s_row @ u`` picks the largest
    positive factors, top-k of ``s_row @ -u`` the most negative.  The sign is therefore only ever
    flipped *jointly* (flipping one alone would rank by the negated rank-1 score), and chosen

    * closest (L1) to ``previous`` when given, so the prefilter stays smooth between the
      once-per-optimiser-step refreshes (official code's ``_online_update_tucker_approx``);
    * otherwise so that ``sum(u) >= 0`` (for non-negative cores this is the positive Perron pair).

    Computed without gradient, in float64 for a stable SVD. Returns ``u, v`` of shape ``[r]``.
    """
    require_tensor("cores", cores)
    require_float("cores", cores)
    require_ndim("cores", cores, 3, "[c, r, r]")
    if cores.shape[0] == 0 or cores.shape[1] == 0 or cores.shape[1] != cores.shape[2]:
        raise ValueError(f"cores must have shape [c, r, r] with c >= 1 and r >= 1; got {tuple(cores.shape)}")
    require_finite("cores", cores)
    with torch.no_grad():
        total = cores.detach().to(torch.float64).sum(0)  # [r, r]
        U, _, Vh = torch.linalg.svd(total)
        u, v = U[:, 0], Vh[0, :]  # [r], [r]
        if previous is not None:
            pu, pv = (p.to(torch.float64) for p in previous)
            keep = (u - pu).abs().sum() + (v - pv).abs().sum()
            flip = (u + pu).abs().sum() + (v + pv).abs().sum()
            sign = -1.0 if flip < keep else 1.0
        else:
            sign = -1.0 if u.sum() < 0 else 1.0
        return (sign * u).to(cores.dtype), (sign * v).to(cores.dtype)


def _gather_pair_scores(s_row: Tensor, s_col: Tensor, cores: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """Per-core scores of chosen (row, col) pairs, differentiable in s_row, s_col and cores.

    rows, cols ``[..., m]`` -> ``[..., m, c]``.
    """
    r = s_row.shape[-1]
    sr = s_row.gather(-2, rows[..., None].expand(*rows.shape, r))  # [..., m, r]
    sc = s_col.gather(-2, cols[..., None].expand(*cols.shape, r))  # [..., m, r]
    return torch.einsum("...ma,cab,...mb->...mc", sr, cores, sc)


def tucker_topk(
    s_row: Tensor,
    s_col: Tensor,
    cores: Tensor,
    m: int,
    exact: bool = False,
    *,
    k: int | None = None,
    rank1: tuple[Tensor, Tensor] | None = None,
    quadrants: int = 1,
) -> tuple[Tensor, Tensor]:
    """Top-m slots of the Tucker grid ``sum_c s_row[i]^T C_c s_col[j]`` (UltraMem TDQKR + MCS).

    Args:
        s_row, s_col: ``[..., n, r]`` per-rank row / column key scores.
        cores: ``[c, r, r]`` Tucker cores.
        m: slots to return.
        exact: scan the full n x n grid (ground truth); otherwise the rank-1 prefilter.
        k: candidates per axis for the prefilter (default ``m``, as in the official code); needs
            ``k <= n`` and ``k * k >= m``.
        rank1: ``(u, v)`` from :func:`rank1_factors`; the layers pass their once-per-step
            buffers here.  Default: computed from ``cores`` now.
        quadrants: where the prefilter looks.  1 (the papers): the k x k grid of the top-k rows of
            ``a = s_row @ u`` and top-k columns of ``b = s_col @ v``.  2 (this project's addition):
            also the k x k grid of the top-k rows of ``-a`` and columns of ``-b``; the candidates
            are the union of both grids (a pair in both counts once).

    Returns:
        ``(scores, indices)``: ``scores [..., m, c]`` (one score per core, used to weight the
        core's channel slice of each value), ``indices [..., m]`` flat ``i * n + j``, distinct,
        sorted by the summed score, descending.  Gradients flow to s_row, s_col and cores through
        the selected pairs only; the selection itself (and the prefilter) is not differentiable.

    With ``quadrants=1`` the prefilter never proposes a pair whose rank-1 factors are both
    negative, although such a pair has a large positive rank-1 score ``lambda_1 a_i b_j``: recall
    against ``exact=True`` is about 0.5 at random init, and 1 on pairs whose factors are positive
    when the summed core is exactly rank 1.  ``quadrants=2`` proposes from both sign quadrants
    (at most ``2 k^2`` candidates, rescored with the full cores) and recovers most of the rest.
    """
    n, r = _check_tucker(s_row, s_col, cores, m, exact=exact, k=k, rank1=rank1, quadrants=quadrants)
    if exact:
        with torch.no_grad():
            total = tucker_grid(s_row, s_col, cores).sum(-3).flatten(-2)  # [..., n*n]
            flat = total.topk(m, dim=-1).indices  # [..., m]
        rows, cols = flat // n, flat % n
    else:
        k = m if k is None else k
        u, v = rank1_factors(cores) if rank1 is None else rank1
        with torch.no_grad():
            rows, cols = _prefilter(s_row, s_col, cores, m, k, u, v, quadrants)
    scores = _gather_pair_scores(s_row, s_col, cores, rows, cols)  # [..., m, c]
    order = scores.detach().sum(-1).argsort(dim=-1, descending=True)  # [..., m]
    scores = scores.gather(-2, order[..., None].expand_as(scores))
    indices = (rows * n + cols).gather(-1, order)
    return scores, indices


def _prefilter(s_row: Tensor, s_col: Tensor, cores: Tensor, m: int, k: int, u: Tensor, v: Tensor,
               quadrants: int) -> tuple[Tensor, Tensor]:
    """Rows and columns ``[..., m]`` of the best m candidates of the rank-1 prefilter (no gradient).

    Quadrant q proposes the k x k grid ``I_row^q x I_col^q``: q = 0 the top-k of ``a = s_row @ u``
    and ``b = s_col @ v``, q = 1 the top-k of ``-a`` and ``-b``.  Every candidate is rescored with
    ``sum_c C_c`` as one batched ``R (sum_c C_c) C^T`` product per quadrant.  Speed on CPU: the
    per-axis top-k are sorted, which lays the best candidates out first and makes the top-m over
    the grid ~2.6x faster (measured, 1024 tokens, k = m = 32); the top-m itself returns a set
    (``sorted=False``): the caller orders the winners by their full score.
    """
    r = s_row.shape[-1]
    a = s_row @ u.to(s_row.dtype)  # [..., n]
    b = s_col @ v.to(s_col.dtype)  # [..., n]
    signs = (1.0, -1.0)[:quadrants]
    idx_r = torch.stack([(sign * a).topk(k, dim=-1).indices for sign in signs], dim=-2)  # [..., Q, k]
    idx_c = torch.stack([(sign * b).topk(k, dim=-1).indices for sign in signs], dim=-2)  # [..., Q, k]
    sr = s_row[..., None, :, :].expand(*idx_r.shape[:-1], *s_row.shape[-2:])  # [..., Q, n, r]
    sc = s_col[..., None, :, :].expand(*idx_c.shape[:-1], *s_col.shape[-2:])  # [..., Q, n, r]
    sr = sr.gather(-2, idx_r[..., None].expand(*idx_r.shape, r))  # [..., Q, k, r]
    sc = sc.gather(-2, idx_c[..., None].expand(*idx_c.shape, r))  # [..., Q, k, r]
    cand = sr @ cores.sum(0) @ sc.transpose(-1, -2)  # [..., Q, k, k] summed over cores
    if quadrants == 2:  # a pair proposed by both quadrants counts once: drop its second copy
        row_in_first = (idx_r[..., 1, :, None] == idx_r[..., 0, None, :]).any(-1)  # [..., k]
        col_in_first = (idx_c[..., 1, :, None] == idx_c[..., 0, None, :]).any(-1)  # [..., k]
        twice = row_in_first[..., :, None] & col_in_first[..., None, :]  # [..., k, k]
        cand[..., 1, :, :] = cand[..., 1, :, :].masked_fill(twice, -torch.inf)
    best = cand.flatten(-3).topk(m, dim=-1, sorted=False).indices  # [..., m] flat (quadrant, row cand., col cand.)
    quadrant, pos = best // (k * k), best % (k * k)  # [..., m]
    rows = idx_r.flatten(-2).gather(-1, quadrant * k + pos // k)  # [..., m]
    cols = idx_c.flatten(-2).gather(-1, quadrant * k + pos % k)  # [..., m]
    return rows, cols


def tucker_rank_penalty(cores: Tensor, tau: float = 0.15) -> Tensor:
    """Tucker-core penalty ``1/(r-1) * sum_{i>=2} relu(lambda_i - tau)^2`` of ``sum_c C_c``.

    UltraMem Eq. 17 (alpha = 0.001, tau = 0.15 in UltraMem Table 5).  It keeps the non-leading
    singular values small so the rank-1 prefilter is accurate; the margin tau stops the core from
    collapsing to exactly rank 1.  The caller multiplies by alpha (the layers' config weight).
    The official code computes this and never adds it to the loss; here it is returned in the
    layers' ``aux_losses`` and reaches the loss whenever its weight is non-zero.
    """
    sv = torch.linalg.svdvals(cores.sum(0))  # [r], descending
    r = sv.shape[0]
    if r < 2:
        return sv.new_zeros(())
    return torch.relu(sv[1:] - tau).pow(2).sum() / (r - 1)


def key_balance_loss(a: Tensor, b: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """Key-balance loss over row and column keys (UltraMemV2 Eqs. 18-20).

    ``P = softmax(rank-1 axis scores)``, ``f_n = Count_n / T`` (fraction of tokens whose selection
    uses key n on that axis, the paper's normalisation; the official code divides by T*m instead),
    ``p_n = mean_t P_n``; loss ``= n * sum_n f_n p_n`` per axis, rows plus columns.  Minimal
    (= number of picks per token) when usage and router mass are uniform.

    a, b: ``[T, n]`` rank-1 row / column scores (differentiable); rows, cols: ``[T, m]`` picked keys.
    """
    n = a.shape[-1]
    total = a.new_zeros(())
    for scores, picks in ((a, rows), (b, cols)):
        p = scores.softmax(-1).reshape(-1, n).mean(0)  # [n]
        counts = torch.zeros(n, dtype=scores.dtype, device=scores.device)
        counts.scatter_add_(0, picks.reshape(-1), torch.ones_like(picks.reshape(-1), dtype=scores.dtype))
        f = counts / picks.reshape(-1, picks.shape[-1]).shape[0]  # [n]
        total = total + n * (f * p).sum()
    return total
