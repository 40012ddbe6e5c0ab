"""Fused TDQKR candidate scoring and top-m selection (UltraMem Eqs. 6-10, 16-17; UltraMemV2 Eqs. 6-7).

Reference: :func:`umv2_ref.retrieval.tucker_topk` (approximate mode; ``exact=True`` delegates to
it).  The per-axis rank-1 prefilter ``top-k(s_row @ u)``, ``top-k(s_col @ v)`` stays in PyTorch
(two GEMVs and two ``torch.topk``).  One program per token then

1. gathers the k candidate rows ``s_row[I_row] [k, r]`` and columns ``s_col[I_col] [k, r]``,
2. scores the k x k grid ``sum_c s_row[i]^T C_c s_col[j] = s_row[i]^T (sum_c C_c) s_col[j]`` in
   registers (never written to HBM: k*k*4 bytes per token would be 64 KiB at k = 128),
3. selects the top m by iterative argmax (m rounds: take the max, mask it with -inf, remember its
   position), which yields them already sorted by descending summed score,
4. gathers the m winners' factors once and writes their flat slot ids and per-core scores ``[m, c]``.

Backward (to s_row, s_col and cores) touches only the m selected pairs per token and is written
in PyTorch (``_TuckerTopk.backward``): it is r*c*m multiply-adds per token, negligible next to the lookup.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from umv2_ref.checks import require_positive_int
from umv2_ref.retrieval import _check_tucker, rank1_factors
from umv2_ref.retrieval import tucker_topk as reference_tucker_topk

from . import config


@triton.jit
def _tucker_topk_kernel(
    srow_ptr, scol_ptr, cand_r_ptr, cand_c_ptr, cores_ptr, idx_out_ptr, score_out_ptr,
    N, K, M,
    R: tl.constexpr, C: tl.constexpr, ACC: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """One token: k x k Tucker grid in registers, top-M by iterative argmax, per-core scores out."""
    t = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, BLOCK_K)  # [BK]
    ok = i < K
    rows = tl.load(cand_r_ptr + t * K + i, mask=ok, other=0).to(tl.int64)  # [BK] candidate rows
    cols = tl.load(cand_c_ptr + t * K + i, mask=ok, other=0).to(tl.int64)  # [BK] candidate columns
    grid = tl.full((BLOCK_K, BLOCK_K), 0.0, ACC)  # [BK, BK]
    for a in tl.static_range(R):
        sr_a = tl.load(srow_ptr + (t * N + rows) * R + a, mask=ok, other=0.0).to(ACC)  # [BK]
        for b in tl.static_range(R):
            sc_b = tl.load(scol_ptr + (t * N + cols) * R + b, mask=ok, other=0.0).to(ACC)  # [BK]
            w = tl.full((), 0.0, ACC)
            for c in tl.static_range(C):
                w += tl.load(cores_ptr + (c * R + a) * R + b).to(ACC)  # (sum_c C_c)[a, b]
            grid += w * sr_a[:, None] * sc_b[None, :]
    grid = tl.where(ok[:, None] & ok[None, :], grid, float("-inf"))
    flat = tl.reshape(grid, (BLOCK_K * BLOCK_K,))  # [BK*BK]
    pos = tl.arange(0, BLOCK_K * BLOCK_K)  # [BK*BK]
    slot = tl.arange(0, BLOCK_M)  # [BM]
    won = tl.full((BLOCK_M,), 0, tl.int32)  # [BM] flat grid position of the j-th winner
    for j in range(M):
        best = tl.argmax(flat, axis=0)  # position of the current maximum
        won = tl.where(slot == j, best, won)
        flat = tl.where(pos == best, float("-inf"), flat)
    live = slot < M  # [BM]
    row = tl.load(cand_r_ptr + t * K + won // BLOCK_K, mask=live, other=0).to(tl.int64)  # [BM]
    col = tl.load(cand_c_ptr + t * K + won % BLOCK_K, mask=live, other=0).to(tl.int64)  # [BM]
    tl.store(idx_out_ptr + t * M + slot, row * N + col, mask=live)
    for c in tl.static_range(C):
        s = tl.full((BLOCK_M,), 0.0, ACC)  # [BM] score of core c
        for a in tl.static_range(R):
            sr_a = tl.load(srow_ptr + (t * N + row) * R + a, mask=live, other=0.0).to(ACC)  # [BM]
            for b in tl.static_range(R):
                sc_b = tl.load(scol_ptr + (t * N + col) * R + b, mask=live, other=0.0).to(ACC)  # [BM]
                s += sr_a * tl.load(cores_ptr + (c * R + a) * R + b).to(ACC) * sc_b
        tl.store(score_out_ptr + (t * M + slot) * C + c, s.to(score_out_ptr.dtype.element_ty), mask=live)


class _TuckerTopk(torch.autograd.Function):
    """Kernel forward; backward through the selected ``s_row[i]^T C_c s_col[j]`` only.

    s_row, s_col ``[T, n, r]``, cores ``[c, r, r]``, cand_r/cand_c ``[T, k]`` ->
    ``(scores [T, m, c], flat ids [T, m])``.
    """

    @staticmethod
    def forward(ctx, s_row, s_col, cores, cand_r, cand_c, m):
        (T, n, r), c, k = s_row.shape, cores.shape[0], cand_r.shape[1]
        idx = config.empty((T, m), torch.int64, s_row.device)  # [T, m]
        scores = config.empty((T, m, c), s_row.dtype, s_row.device)  # [T, m, c]
        if T:
            acc = tl.float64 if s_row.dtype == torch.float64 else tl.float32
            block_k = triton.next_power_of_2(k)
            _tucker_topk_kernel[(T,)](
                s_row, s_col, cand_r, cand_c, cores.contiguous(), idx, scores, n, k, m,
                R=r, C=c, ACC=acc, BLOCK_K=block_k, BLOCK_M=triton.next_power_of_2(m),
                num_warps=8 if block_k >= 64 else 4)  # the k*k grid lives in registers
        ctx.mark_non_differentiable(idx)
        ctx.save_for_backward(s_row, s_col, cores, idx)
        return scores, idx

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad, _):
        s_row, s_col, cores, idx = ctx.saved_tensors
        n, r = s_row.shape[1:]
        at_r = (idx // n)[..., None].expand(*idx.shape, r)  # [T, m, r]
        at_c = (idx % n)[..., None].expand(*idx.shape, r)  # [T, m, r]
        sr, sc = s_row.gather(1, at_r), s_col.gather(1, at_c)  # [T, m, r]
        d_sr = torch.einsum("tmc,cab,tmb->tma", grad, cores, sc)  # [T, m, r]
        d_sc = torch.einsum("tmc,cab,tma->tmb", grad, cores, sr)  # [T, m, r]
        d_cores = torch.einsum("tmc,tma,tmb->cab", grad, sr, sc)  # [c, r, r]
        d_row = torch.zeros_like(s_row).scatter_add_(1, at_r, d_sr)  # [T, n, r] rows repeat: add
        d_col = torch.zeros_like(s_col).scatter_add_(1, at_c, d_sc)  # [T, n, r]
        return d_row, d_col, d_cores, None, None, None


def tucker_topk(
    s_row: Tensor,
    s_col: Tensor,
    cores: Tensor,
    m: int,
    exact: bool = False,
    *,
    k: int | None = None,
    rank1: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Fused rank-1-prefiltered TDQKR top-m; contract of :func:`umv2_ref.retrieval.tucker_topk`.

    s_row, s_col ``[..., n, r]``, cores ``[c, r, r]`` -> ``(scores [..., m, c], indices [..., m])``
    sorted by descending summed score.  ``exact=True`` runs the reference full-grid scan.
    """
    if exact:
        return reference_tucker_topk(s_row, s_col, cores, m, exact=True, k=k, rank1=rank1)
    n, r = _check_tucker(s_row, s_col, cores, m, k=k, rank1=rank1)
    k = m if k is None else k
    require_positive_int("k", k)
    if k > n or k * k < m:
        raise ValueError(f"k (candidates per axis) must satisfy k <= n={n} and k*k >= m={m}; got k={k}")
    u, v = rank1_factors(cores) if rank1 is None else rank1
    lead, c = s_row.shape[:-2], cores.shape[0]
    sr = s_row.reshape(-1, n, r).contiguous()  # [T, n, r]
    sc = s_col.reshape(-1, n, r).contiguous()  # [T, n, r]
    with torch.no_grad():
        cand_r = (sr @ u.to(sr.dtype)).topk(k, dim=-1).indices.contiguous()  # [T, k]
        cand_c = (sc @ v.to(sc.dtype)).topk(k, dim=-1).indices.contiguous()  # [T, k]
    scores, idx = _TuckerTopk.apply(sr, sc, cores, cand_r, cand_c, m)  # [T, m, c], [T, m]
    return scores.reshape(*lead, m, c), idx.reshape(*lead, m)
