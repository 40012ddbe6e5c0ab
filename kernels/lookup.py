"""Fused value lookups: ``peer_values`` (PEER / UltraMemV2 FFN values) and ``weighted_sum`` (PKM bag).

Reference: :func:`umv2_ref.values.peer_values` and :func:`umv2_ref.values.weighted_sum`; same
signatures, same validation (``check_lookup``, ``check_peer_inputs``), same results within the
tolerance contract of ``kernels/README.md`` (fp32 interpreter: 1e-5 relative; GPU fp32 1e-4; bf16
GPU 2e-2).

UltraMemV2 Eq. 15 per token t and selected slot i = indices[t, k]:

    a_tk = act(<P[i], x_pre[t]>),  w_tkc = a_tk * s_tkc,  z[t, d] = sum_k w_tk,core(d) V[i, d]

(``weighted_sum`` is the same with a_tk = 1).  Kernels:

* ``_lookup_fwd_kernel``: a program owns BLOCK_T tokens and the whole value width.  For each slot k
  (a ``tl.range`` loop software-pipelined with ``cp.async`` on Hopper) it loads the C per-core
  scores as ``[BLOCK_T]`` vectors, gathers the P and V rows, dots, activates, scales and
  accumulates in fp32; z is written once.
* ``_lookup_bwd_token_kernel``: d scores, d x_pre and the per-(t, k) coefficients the table
  gradients need.  Each program owns its tokens: no atomics.
* table gradients ``dV[i] = sum w_tk g_t`` and ``dP[i] = sum da_tk x_t`` (rows repeat across and
  within tokens, so token programs collide):
  - ``"sorted"`` (default): ONE stable sort of the indices serves both tables;
    ``_scatter_sorted_kernel`` (one program per block of rows) walks the block's pairs -- one
    contiguous range of the sorted list -- BLOCK_J at a time with every lane busy, sums each row's
    run with a segmented scan and writes the dV and dP rows once, in the table dtype (no
    zero-fill, no fp32 [N, D] buffer); rows read more than ``CONFIG.hot_rows`` times go to
    ``_scatter_sorted_hot_kernel`` (one program per hot row), so one popular row does not stall a
    block.  Fixed summation order: bitwise reproducible.
  - ``"atomic"``: ``_scatter_atomic_kernel`` adds both tables' contributions with relaxed fp32
    atomics (``sem="relaxed"``: a plain ``RED`` on the GPU, no fences) into zero-filled fp32
    accumulators, then casts; the order of colliding adds varies run to run on a GPU.

Every kernel masks indices outside ``[0, N)``: even with validation bypassed (the benchmark
validates once, outside its timed region) a kernel never reads outside a table.  The public
functions validate first (``umv2_ref.checks``: host check on CPU, ``torch._assert_async`` on CUDA
and under ``torch.compile``), then call the ``torch.library`` custom ops ``umv2_kernels::lookup``
and ``umv2_kernels::lookup_backward``, which ``torch.compile`` treats as single graph nodes.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from umv2_ref.values import check_lookup, check_peer_inputs, get_activation

from . import config

ACT_CODES = {None: 0, "relu": 1, "gelu": 2, "silu": 3}
ON_GPU = torch.cuda.is_available() and not config.INTERPRETED


def _configs(choices: list[dict], *, num_warps: int = 4) -> list[triton.Config]:
    """Autotune candidates; in the interpreter only the first (a multi-config autotuner needs a driver)."""
    configs = [triton.Config(dict(c), num_warps=num_warps, num_stages=c.get("NUM_STAGES", 1)) for c in choices]
    return configs if ON_GPU else configs[:1]


# The first entry of each list is the default (the only one used in the interpreter and the one the
# AOT report checks against every budget); all entries are compiled by ``python -m kernels.aot``.
FWD_CHOICES = [dict(BLOCK_T=8, NUM_STAGES=3), dict(BLOCK_T=8, NUM_STAGES=2), dict(BLOCK_T=8, NUM_STAGES=4),
               dict(BLOCK_T=16, NUM_STAGES=1), dict(BLOCK_T=4, NUM_STAGES=4)]
BWD_CHOICES = [dict(BLOCK_T=8, NUM_STAGES=3), dict(BLOCK_T=8, NUM_STAGES=2), dict(BLOCK_T=4, NUM_STAGES=3),
               dict(BLOCK_T=4, NUM_STAGES=4)]
ROWS_CHOICES = [dict(BLOCK_R=32, BLOCK_J=8), dict(BLOCK_R=16, BLOCK_J=8), dict(BLOCK_R=32, BLOCK_J=16),
                dict(BLOCK_R=64, BLOCK_J=16)]
HOT_BLOCK_J = 8  # pairs per step of a hot-row program
ATOMIC_BLOCK_T = 8  # tokens per program of the atomic scatter (never autotuned: it accumulates)


# ---------------------------------------------------------------------------------------------
# activations (plain tl ops: libdevice is unavailable in the interpreter; tl.erf is a builtin)
# ---------------------------------------------------------------------------------------------


@triton.jit
def _act(a, ACT: tl.constexpr):
    """act(a): 0 identity, 1 relu, 2 exact (erf) gelu as torch's F.gelu, 3 silu."""
    if ACT == 1:
        a = tl.maximum(a, 0.0)
    elif ACT == 2:
        a = 0.5 * a * (1.0 + tl.erf(a * 0.7071067811865476))
    elif ACT == 3:
        a = a / (1.0 + tl.exp(-a))
    return a


@triton.jit
def _act_grad(a, ACT: tl.constexpr):
    """d act / d a at a."""
    g = tl.full(a.shape, 1.0, a.dtype)
    if ACT == 1:
        g = tl.where(a > 0.0, 1.0, 0.0).to(a.dtype)
    elif ACT == 2:
        g = 0.5 * (1.0 + tl.erf(a * 0.7071067811865476)) + a * tl.exp(-0.5 * a * a) * 0.3989422804014327
    elif ACT == 3:
        sig = 1.0 / (1.0 + tl.exp(-a))
        g = sig * (1.0 + a * (1.0 - sig))
    return g


@triton.jit
def _per_core(s_ptr, pair, ok, core, scale, C: tl.constexpr, ACC: tl.constexpr):
    """``[B, BLOCK_D]`` channel weights ``scale[b] * s[pair[b], core(d)]`` from C ``[B]`` vector loads.

    One scalar load per row and core instead of a ``[B, BLOCK_D]`` gather of the same few values.
    """
    w = tl.load(s_ptr + pair * C, mask=ok, other=0.0).to(ACC) * scale  # [B] core 0
    out = tl.broadcast_to(w[:, None], (w.shape[0], core.shape[0]))  # [B, BD]
    for c in tl.static_range(1, C):
        w_c = tl.load(s_ptr + pair * C + c, mask=ok, other=0.0).to(ACC) * scale  # [B]
        out = tl.where((core == c)[None, :], w_c[:, None], out)  # [B, BD]
    return out


# ---------------------------------------------------------------------------------------------
# forward and per-token backward
# ---------------------------------------------------------------------------------------------


@triton.jit
def _lookup_fwd_kernel(
    x_ptr, pre_ptr, val_ptr, idx_ptr, s_ptr, out_ptr,
    T, M, N, DP, DV, DC, stride_pre, stride_val,
    C: tl.constexpr, HAS_PRE: tl.constexpr, ACT: tl.constexpr, ACC: tl.constexpr,
    BLOCK_DP: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_T: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """z[t] = sum_k act(<P[i_tk], x[t]>) * s[t, k, core(d)] * V[i_tk, d] for BLOCK_T tokens."""
    t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)  # [BT]
    t_ok = t < T
    dv = tl.arange(0, BLOCK_DV)  # [BDV]
    dv_ok = dv < DV
    core = dv // DC  # [BDV] which core weights channel d
    dp = tl.arange(0, BLOCK_DP)  # [BDP]
    dp_ok = dp < DP
    if HAS_PRE:
        x = tl.load(x_ptr + t[:, None] * DP + dp[None, :], mask=t_ok[:, None] & dp_ok[None, :], other=0.0)
        x = x.to(ACC)  # [BT, BDP]
    acc = tl.zeros((BLOCK_T, BLOCK_DV), ACC)  # [BT, BDV]
    for k in tl.range(0, M, num_stages=NUM_STAGES):
        tk = t * M + k  # [BT] flat (token, slot) pair
        row = tl.load(idx_ptr + tk, mask=t_ok, other=0).to(tl.int64)  # [BT]
        ok = t_ok & (row >= 0) & (row < N)  # [BT] never read outside the table
        a = tl.full((BLOCK_T,), 1.0, ACC)  # [BT]
        if HAS_PRE:
            p = tl.load(pre_ptr + row[:, None] * stride_pre + dp[None, :], mask=ok[:, None] & dp_ok[None, :],
                        other=0.0).to(ACC)  # [BT, BDP]
            a = _act(tl.sum(p * x, axis=1), ACT)  # [BT]
        w = _per_core(s_ptr, tk, ok, core, a, C, ACC)  # [BT, BDV]
        v = tl.load(val_ptr + row[:, None] * stride_val + dv[None, :], mask=ok[:, None] & dv_ok[None, :],
                    other=0.0).to(ACC)  # [BT, BDV]
        acc += w * v
    tl.store(out_ptr + t[:, None] * DV + dv[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=t_ok[:, None] & dv_ok[None, :])


@triton.jit
def _lookup_bwd_token_kernel(
    g_ptr, x_ptr, pre_ptr, val_ptr, idx_ptr, s_ptr,
    ds_ptr, dx_ptr, coef_v_ptr, coef_p_ptr,
    T, M, N, DP, DV, DC, stride_pre, stride_val,
    C: tl.constexpr, HAS_PRE: tl.constexpr, ACT: tl.constexpr, ACC: tl.constexpr,
    BLOCK_DP: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_T: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """Per-token gradients (no atomics: a program owns its tokens).

    ds[t,k,c] = a_tk <V[i]_c, g_t>_c;  with pre-values also da_tk = act'(.) sum_c s_tkc <V[i]_c, g_t>_c,
    dx[t] = sum_k da_tk P[i], and the table-gradient coefficients coef_v = a*s, coef_p = da.
    """
    t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)  # [BT]
    t_ok = t < T
    dv = tl.arange(0, BLOCK_DV)  # [BDV]
    dv_ok = dv < DV
    core = dv // DC  # [BDV]
    dp = tl.arange(0, BLOCK_DP)  # [BDP]
    dp_ok = dp < DP
    g = tl.load(g_ptr + t[:, None] * DV + dv[None, :], mask=t_ok[:, None] & dv_ok[None, :], other=0.0).to(ACC)
    if HAS_PRE:
        x = tl.load(x_ptr + t[:, None] * DP + dp[None, :], mask=t_ok[:, None] & dp_ok[None, :], other=0.0)
        x = x.to(ACC)  # [BT, BDP]
        dx = tl.zeros((BLOCK_T, BLOCK_DP), ACC)  # [BT, BDP]
    for k in tl.range(0, M, num_stages=NUM_STAGES):
        tk = t * M + k  # [BT]
        row = tl.load(idx_ptr + tk, mask=t_ok, other=0).to(tl.int64)  # [BT]
        ok = t_ok & (row >= 0) & (row < N)  # [BT]
        gv = g * tl.load(val_ptr + row[:, None] * stride_val + dv[None, :], mask=ok[:, None] & dv_ok[None, :],
                         other=0.0).to(ACC)  # [BT, BDV]
        if HAS_PRE:
            p = tl.load(pre_ptr + row[:, None] * stride_pre + dp[None, :], mask=ok[:, None] & dp_ok[None, :],
                        other=0.0).to(ACC)  # [BT, BDP]
            pre = tl.sum(p * x, axis=1)  # [BT]
            a = _act(pre, ACT)  # [BT]
            da = tl.zeros((BLOCK_T,), ACC)  # [BT]
        for c in tl.static_range(C):
            if C == 1:
                dot_c = tl.sum(gv, axis=1)  # [BT] <V[i], g_t>
            else:
                dot_c = tl.sum(tl.where((core == c)[None, :], gv, 0.0), axis=1)  # [BT] <V[i]_c, g_t>_c
            if HAS_PRE:
                s_c = tl.load(s_ptr + tk * C + c, mask=t_ok, other=0.0).to(ACC)  # [BT]
                tl.store(ds_ptr + tk * C + c, (a * dot_c).to(ds_ptr.dtype.element_ty), mask=t_ok)
                tl.store(coef_v_ptr + tk * C + c, a * s_c, mask=t_ok)
                da += s_c * dot_c
            else:
                tl.store(ds_ptr + tk * C + c, dot_c.to(ds_ptr.dtype.element_ty), mask=t_ok)
        if HAS_PRE:
            da = da * _act_grad(pre, ACT)  # [BT]
            tl.store(coef_p_ptr + tk, da, mask=t_ok)
            dx += da[:, None] * p
    if HAS_PRE:
        tl.store(dx_ptr + t[:, None] * DP + dp[None, :], dx.to(dx_ptr.dtype.element_ty),
                 mask=t_ok[:, None] & dp_ok[None, :])


# ---------------------------------------------------------------------------------------------
# table gradients
# ---------------------------------------------------------------------------------------------


@triton.jit
def _scatter_atomic_kernel(
    dv_ptr, dp_ptr, idx_ptr, coef_v_ptr, coef_p_ptr, g_ptr, x_ptr,
    T, M, N, DV, DP, DC,
    C: tl.constexpr, HAS_V: tl.constexpr, HAS_P: tl.constexpr, ACC: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_DP: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """dV[i_tk] += coef_v[t,k,core] g_t and dP[i_tk] += coef_p[t,k] x_t with relaxed fp32 atomics.

    Both accumulators are zero-filled by the caller.  ``sem="relaxed"``: no ordering is needed
    between the adds (nothing reads dV/dP until the kernel ends), so the GPU issues a
    fire-and-forget reduction instead of a fenced read-modify-write.
    """
    t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)  # [BT]
    t_ok = t < T
    dv = tl.arange(0, BLOCK_DV)  # [BDV]
    dv_ok = dv < DV
    core = dv // DC  # [BDV]
    dp = tl.arange(0, BLOCK_DP)  # [BDP]
    dp_ok = dp < DP
    if HAS_V:
        g = tl.load(g_ptr + t[:, None] * DV + dv[None, :], mask=t_ok[:, None] & dv_ok[None, :], other=0.0)
        g = g.to(ACC)  # [BT, BDV]
    if HAS_P:
        x = tl.load(x_ptr + t[:, None] * DP + dp[None, :], mask=t_ok[:, None] & dp_ok[None, :], other=0.0)
        x = x.to(ACC)  # [BT, BDP]
    one = tl.full((BLOCK_T,), 1.0, ACC)  # [BT]
    for k in range(M):
        tk = t * M + k  # [BT]
        row = tl.load(idx_ptr + tk, mask=t_ok, other=0).to(tl.int64)  # [BT]
        ok = t_ok & (row >= 0) & (row < N)  # [BT]
        if HAS_V:
            w = _per_core(coef_v_ptr, tk, ok, core, one, C, ACC)  # [BT, BDV]
            tl.atomic_add(dv_ptr + row[:, None] * DV + dv[None, :], w * g, mask=ok[:, None] & dv_ok[None, :],
                          sem="relaxed")
        if HAS_P:
            cp = tl.load(coef_p_ptr + tk, mask=ok, other=0.0).to(ACC)  # [BT]
            tl.atomic_add(dp_ptr + row[:, None] * DP + dp[None, :], cp[:, None] * x,
                          mask=ok[:, None] & dp_ok[None, :], sem="relaxed")


@triton.jit
def _seg_add(start_a, sum_a, start_b, sum_b):
    """Combine of a segmented inclusive scan: a running sum that restarts where ``start`` is set."""
    return start_a | start_b, tl.where(start_b != 0, sum_b, sum_a + sum_b)


@triton.jit
def _segment_sums(contrib, start, carry, jj, BLOCK_J: tl.constexpr):
    """Running per-row sums of ``contrib [BJ, BD]`` along the sorted pairs, continuing ``carry [BD]``
    into lane 0 when its row began in the previous chunk; returns (sums [BJ, BD], carry out [BD])."""
    contrib += tl.where(((jj == 0) & (start == 0))[:, None], carry[None, :], 0.0)
    flags = tl.broadcast_to(start[:, None], contrib.shape)  # [BJ, BD]
    _, sums = tl.associative_scan((flags, contrib), 0, _seg_add)  # [BJ, BD]
    return sums, tl.sum(tl.where((jj == BLOCK_J - 1)[:, None], sums, 0.0), axis=0)


@triton.jit
def _scatter_sorted_kernel(
    dv_ptr, dp_ptr, order_ptr, rows_ptr, bounds_ptr, coef_v_ptr, coef_p_ptr, g_ptr, x_ptr,
    N, M, DV, DP, DC, HOT,
    C: tl.constexpr, HAS_V: tl.constexpr, HAS_P: tl.constexpr, ACC: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_DP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """dV[r] and dP[r] for the BLOCK_R rows [r0, r0 + BLOCK_R), each row written once (both tables).

    ``order`` lists flat pair ids t*M+k sorted stably by row, ``rows`` the row of each sorted pair
    and row r owns ``order[bounds[r] : bounds[r+1]]``, so the block's pairs are one contiguous
    range.  It is walked BLOCK_J pairs at a time with every lane busy (rows are read ~T*M/N times,
    often once: a lane per row would idle), and a segmented scan sums each row's run of pairs; the
    lane holding a row's last pair stores it.  Rows read by more than HOT pairs are skipped (left
    to ``_scatter_sorted_hot_kernel``); rows nobody read get an explicit 0.
    """
    r0 = tl.program_id(0).to(tl.int64) * BLOCK_R
    rr = r0 + tl.arange(0, BLOCK_R)  # [BR]
    r_ok = rr < N
    dv = tl.arange(0, BLOCK_DV)  # [BDV]
    dv_ok = dv < DV
    core = dv // DC  # [BDV]
    dp = tl.arange(0, BLOCK_DP)  # [BDP]
    dp_ok = dp < DP
    unread = r_ok & (tl.load(bounds_ptr + rr + 1, mask=r_ok, other=0) == tl.load(bounds_ptr + rr, mask=r_ok, other=0))
    if HAS_V:
        tl.store(dv_ptr + rr[:, None] * DV + dv[None, :], tl.zeros((BLOCK_R, BLOCK_DV), dv_ptr.dtype.element_ty),
                 mask=unread[:, None] & dv_ok[None, :])
    if HAS_P:
        tl.store(dp_ptr + rr[:, None] * DP + dp[None, :], tl.zeros((BLOCK_R, BLOCK_DP), dp_ptr.dtype.element_ty),
                 mask=unread[:, None] & dp_ok[None, :])
    hi = tl.load(bounds_ptr + tl.minimum(r0 + BLOCK_R, N))  # end of the block's pairs
    j0 = tl.load(bounds_ptr + r0)
    jj = tl.arange(0, BLOCK_J)  # [BJ]
    one = tl.full((BLOCK_J,), 1.0, ACC)  # [BJ]
    carry_v = tl.zeros((BLOCK_DV,), ACC)  # [BDV] running sum of a row split across chunks
    carry_p = tl.zeros((BLOCK_DP,), ACC)  # [BDP]
    while j0 < hi:
        row0 = tl.load(rows_ptr + j0).to(tl.int64)
        end0 = tl.load(bounds_ptr + row0 + 1)
        if end0 - tl.load(bounds_ptr + row0) > HOT:
            j0 = end0  # a hot row: skip its pairs
        else:
            j = j0 + jj  # [BJ] positions in the sorted pair list
            ok = j < hi
            row = tl.load(rows_ptr + j, mask=ok, other=0).to(tl.int64)  # [BJ]
            lo_r = tl.load(bounds_ptr + row, mask=ok, other=0)  # [BJ] segment of each lane's row
            hi_r = tl.load(bounds_ptr + row + 1, mask=ok, other=0)  # [BJ]
            live = ok & (hi_r - lo_r <= HOT)  # [BJ]
            start = (j == lo_r).to(tl.int32)  # [BJ] first pair of its row
            last = live & (j == hi_r - 1)  # [BJ] last pair of its row: the lane that stores
            pair = tl.load(order_ptr + j, mask=live, other=0).to(tl.int64)  # [BJ] flat t*M+k
            t = pair // M  # [BJ]
            if HAS_V:
                w = _per_core(coef_v_ptr, pair, live, core, one, C, ACC)  # [BJ, BDV]
                g = tl.load(g_ptr + t[:, None] * DV + dv[None, :], mask=live[:, None] & dv_ok[None, :], other=0.0)
                sums, carry_v = _segment_sums(w * g.to(ACC), start, carry_v, jj, BLOCK_J)  # [BJ, BDV]
                tl.store(dv_ptr + row[:, None] * DV + dv[None, :], sums.to(dv_ptr.dtype.element_ty),
                         mask=last[:, None] & dv_ok[None, :])
            if HAS_P:
                cp = tl.load(coef_p_ptr + pair, mask=live, other=0.0).to(ACC)  # [BJ]
                x = tl.load(x_ptr + t[:, None] * DP + dp[None, :], mask=live[:, None] & dp_ok[None, :], other=0.0)
                sums, carry_p = _segment_sums(cp[:, None] * x.to(ACC), start, carry_p, jj, BLOCK_J)  # [BJ, BDP]
                tl.store(dp_ptr + row[:, None] * DP + dp[None, :], sums.to(dp_ptr.dtype.element_ty),
                         mask=last[:, None] & dp_ok[None, :])
            j0 = j0 + BLOCK_J


@triton.jit
def _scatter_sorted_hot_kernel(
    dv_ptr, dp_ptr, hot_ptr, order_ptr, bounds_ptr, coef_v_ptr, coef_p_ptr, g_ptr, x_ptr,
    N, M, DV, DP, DC,
    C: tl.constexpr, HAS_V: tl.constexpr, HAS_P: tl.constexpr, ACC: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_DP: tl.constexpr, BLOCK_J: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """One hot row per program: its segment in steps of BLOCK_J pairs, then a fixed-order tree sum.

    ``hot`` lists the hot rows, padded with N (no work).  Deterministic: the split into steps and
    the reduction order depend only on the segment length.
    """
    r = tl.load(hot_ptr + tl.program_id(0)).to(tl.int64)  # this program's row (N: padding)
    valid = r < N
    r = tl.where(valid, r, 0)
    lo = tl.load(bounds_ptr + r)
    hi = tl.where(valid, tl.load(bounds_ptr + r + 1), lo)
    dv = tl.arange(0, BLOCK_DV)  # [BDV]
    dv_ok = dv < DV
    core = dv // DC  # [BDV]
    dp = tl.arange(0, BLOCK_DP)  # [BDP]
    dp_ok = dp < DP
    jj = tl.arange(0, BLOCK_J)  # [BJ]
    one = tl.full((BLOCK_J,), 1.0, ACC)  # [BJ]
    acc_v = tl.zeros((BLOCK_J, BLOCK_DV), ACC)  # [BJ, BDV]
    acc_p = tl.zeros((BLOCK_J, BLOCK_DP), ACC)  # [BJ, BDP]
    for j0 in tl.range(lo, hi, BLOCK_J, num_stages=NUM_STAGES):
        live = j0 + jj < hi  # [BJ]
        pair = tl.load(order_ptr + j0 + jj, mask=live, other=0).to(tl.int64)  # [BJ]
        t = pair // M  # [BJ]
        if HAS_V:
            w = _per_core(coef_v_ptr, pair, live, core, one, C, ACC)  # [BJ, BDV]
            g = tl.load(g_ptr + t[:, None] * DV + dv[None, :], mask=live[:, None] & dv_ok[None, :], other=0.0)
            acc_v += w * g.to(ACC)
        if HAS_P:
            cp = tl.load(coef_p_ptr + pair, mask=live, other=0.0).to(ACC)  # [BJ]
            x = tl.load(x_ptr + t[:, None] * DP + dp[None, :], mask=live[:, None] & dp_ok[None, :], other=0.0)
            acc_p += cp[:, None] * x.to(ACC)
    if HAS_V:
        tl.store(dv_ptr + r * DV + dv, tl.sum(acc_v, axis=0).to(dv_ptr.dtype.element_ty), mask=valid & dv_ok)
    if HAS_P:
        tl.store(dp_ptr + r * DP + dp, tl.sum(acc_p, axis=0).to(dp_ptr.dtype.element_ty), mask=valid & dp_ok)


_lookup_fwd = triton.autotune(_configs(FWD_CHOICES), key=["DP", "DV", "C", "HAS_PRE"])(_lookup_fwd_kernel)
_lookup_bwd_token = triton.autotune(_configs(BWD_CHOICES), key=["DP", "DV", "C", "HAS_PRE"])(
    _lookup_bwd_token_kernel)
_scatter_sorted = triton.autotune(_configs(ROWS_CHOICES), key=["DP", "DV", "C", "HAS_V", "HAS_P"])(
    _scatter_sorted_kernel)


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------


def _acc_dtype(dtype: torch.dtype) -> tl.dtype:
    """Accumulate in fp32 (fp64 only for fp64 inputs, which gradcheck uses)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def _rows_ok(t: Tensor) -> Tensor:
    """Tables are read through their row stride; only the inner dimension must be dense."""
    return t if t.stride(1) == 1 else t.contiguous()


def _block(n: int) -> int:
    return max(triton.next_power_of_2(n), 1)


def lookup_forward(x: Optional[Tensor], pre: Optional[Tensor], table: Tensor, idx: Tensor, scores: Tensor,
                   act: int) -> Tensor:
    """z ``[T, DV]`` from flat, validated inputs: x ``[T, DP]`` / pre ``[N, DP]`` (or None), table
    ``[N, DV]`` (row stride free), idx ``[T, M]``, scores ``[T, M, C]`` (contiguous)."""
    T, M, C = scores.shape
    N, DV = table.shape
    has_pre = pre is not None
    DP = pre.shape[1] if has_pre else 1
    out = config.empty((T, DV), table.dtype, table.device)  # [T, DV]
    if T:
        _lookup_fwd[lambda meta: (triton.cdiv(T, meta["BLOCK_T"]),)](
            x if has_pre else table, pre if has_pre else table, table, idx, scores, out,
            T, M, N, DP, DV, DV // C, pre.stride(0) if has_pre else 0, table.stride(0),
            C=C, HAS_PRE=has_pre, ACT=act, ACC=_acc_dtype(table.dtype),
            BLOCK_DP=_block(DP), BLOCK_DV=_block(DV))
    return out


def _sorted_segments(idx: Tensor, n_rows: int) -> tuple[Tensor, Tensor, Tensor]:
    """One stable sort shared by both tables: (order ``[T*M]`` pair ids grouped by row, rows
    ``[T*M]`` the row of each sorted pair, bounds ``[N+1]``: row r owns ``order[bounds[r]:bounds[r+1]]``).
    All int32 except order (int64, from ``torch.sort``).  No host sync."""
    keys = idx.reshape(-1).to(torch.int32)  # [T*M] 4-byte keys sort faster than 8-byte ones
    rows, order = torch.sort(keys, stable=True)  # [T*M], [T*M]
    probe = torch.arange(n_rows + 1, device=idx.device, dtype=torch.int32)  # [N+1]
    bounds = torch.searchsorted(rows, probe, out_int32=True)  # [N+1] (no atomics: deterministic)
    return order, rows, bounds


def table_grads(n_rows: int, idx: Tensor, coef_v: Optional[Tensor], g: Tensor, coef_p: Optional[Tensor],
                x: Optional[Tensor], v_dtype: torch.dtype, p_dtype: torch.dtype, algo: str,
                ) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """``dV[i] = sum_{idx[t,k]=i} coef_v[t,k,core(d)] g[t]`` and ``dP[i] = sum coef_p[t,k] x[t]``.

    idx ``[T, M]``; coef_v ``[T, M, C]`` (None: no dV), g ``[T, DV]``; coef_p ``[T, M]`` and x
    ``[T, DP]`` (None: no dP) -> ``(dV [N, DV] or None, dP [N, DP] or None)`` in the table dtypes.
    """
    T, M = idx.shape
    has_v, has_p = coef_v is not None, coef_p is not None
    DV, DP = g.shape[1], (x.shape[1] if has_p else 1)
    C = coef_v.shape[2] if has_v else 1
    acc = _acc_dtype(v_dtype if has_v else p_dtype)
    dev = idx.device
    common = dict(C=C, HAS_V=has_v, HAS_P=has_p, ACC=acc, BLOCK_DV=_block(DV), BLOCK_DP=_block(DP))
    ptrs = (coef_v if has_v else g, coef_p if has_p else g, g, x if has_p else g)
    if algo == "atomic":
        acc_t = torch.float64 if acc == tl.float64 else torch.float32
        dv = torch.zeros((n_rows, DV), dtype=acc_t, device=dev) if has_v else None  # [N, DV] accumulator
        dp = torch.zeros((n_rows, DP), dtype=acc_t, device=dev) if has_p else None  # [N, DP] accumulator
        if T * M:
            _scatter_atomic_kernel[(triton.cdiv(T, ATOMIC_BLOCK_T),)](
                dv if has_v else g, dp if has_p else g, idx, *ptrs, T, M, n_rows, DV, DP, DV // C,
                BLOCK_T=ATOMIC_BLOCK_T, **common)
        return (dv.to(v_dtype) if has_v else None), (dp.to(p_dtype) if has_p else None)
    dv = config.empty((n_rows, DV), v_dtype, dev) if has_v else None  # [N, DV] every row written once
    dp = config.empty((n_rows, DP), p_dtype, dev) if has_p else None  # [N, DP]
    order, rows, bounds = _sorted_segments(idx, n_rows)
    hot = config.CONFIG.hot_rows
    outs = (dv if has_v else g, dp if has_p else g)
    if n_rows:
        _scatter_sorted[lambda meta: (triton.cdiv(n_rows, meta["BLOCK_R"]),)](
            *outs, order, rows, bounds, *ptrs, n_rows, M, DV, DP, DV // C, hot, **common)
    n_hot = min(n_rows, T * M // (hot + 1))  # at most this many rows can be read more than `hot` times
    if n_hot:
        counts = bounds[1:] - bounds[:-1]  # [N]
        hot_rows = torch.nonzero_static(counts > hot, size=n_hot, fill_value=n_rows)  # [n_hot, 1] padded
        _scatter_sorted_hot_kernel[(n_hot,)](
            *outs, hot_rows, order, bounds, *ptrs, n_rows, M, DV, DP, DV // C,
            BLOCK_J=HOT_BLOCK_J, NUM_STAGES=2, num_warps=4, **common)
    return dv, dp


def lookup_backward(grad: Tensor, x: Optional[Tensor], pre: Optional[Tensor], table: Tensor, idx: Tensor,
                    scores: Tensor, act: int, algo: str, need_pre: bool, need_table: bool,
                    ) -> tuple[Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """(d scores, d x, d pre, d table); d x / d pre are None without pre-values, d pre / d table None
    when not needed.  grad ``[T, DV]`` contiguous."""
    T, M, C = scores.shape
    N, DV = table.shape
    has_pre = pre is not None
    DP = pre.shape[1] if has_pre else 1
    acc_t = torch.float64 if table.dtype == torch.float64 else torch.float32
    dev = table.device
    ds = config.empty((T, M, C), scores.dtype, dev)  # [T, M, C]
    dx = config.empty((T, DP), x.dtype, dev) if has_pre else None  # [T, DP]
    coef_v = config.empty((T, M, C), acc_t, dev) if has_pre else scores  # [T, M, C] weight of g in dV
    coef_p = config.empty((T, M), acc_t, dev) if has_pre else None  # [T, M] weight of x in dP
    if T:
        _lookup_bwd_token[lambda meta: (triton.cdiv(T, meta["BLOCK_T"]),)](
            grad, x if has_pre else grad, pre if has_pre else table, table, idx, scores,
            ds, dx if has_pre else ds, coef_v, coef_p if has_pre else ds,
            T, M, N, DP, DV, DV // C, pre.stride(0) if has_pre else 0, table.stride(0),
            C=C, HAS_PRE=has_pre, ACT=act, ACC=_acc_dtype(table.dtype), BLOCK_DP=_block(DP), BLOCK_DV=_block(DV))
    need_pre = need_pre and has_pre
    d_table = d_pre = None
    if need_table or need_pre:
        d_table, d_pre = table_grads(N, idx, coef_v if need_table else None, grad, coef_p if need_pre else None,
                                     x, table.dtype, pre.dtype if has_pre else table.dtype, algo)
    return ds, dx, d_pre, d_table


# ---------------------------------------------------------------------------------------------
# torch.library custom ops (opaque graph nodes for torch.compile) and autograd
# ---------------------------------------------------------------------------------------------

_NONE = (0,)  # shape of the empty tensor a custom op returns for "no gradient"


@torch.library.custom_op("umv2_kernels::lookup", mutates_args=())
def lookup_op(x: Optional[Tensor], pre: Optional[Tensor], table: Tensor, idx: Tensor, scores: Tensor,
              act: int) -> Tensor:
    """Fused value lookup on flat validated inputs (see :func:`lookup_forward`)."""
    return lookup_forward(x, pre, table, idx, scores, act)


@lookup_op.register_fake
def _(x, pre, table, idx, scores, act):
    return table.new_empty((idx.shape[0], table.shape[1]))


@torch.library.custom_op("umv2_kernels::lookup_backward", mutates_args=())
def lookup_backward_op(grad: Tensor, x: Optional[Tensor], pre: Optional[Tensor], table: Tensor, idx: Tensor,
                       scores: Tensor, act: int, algo: str, need_pre: bool, need_table: bool,
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(ds, dx, d_pre, d_table); an absent gradient is an empty ``[0]`` tensor."""
    outs = lookup_backward(grad, x, pre, table, idx, scores, act, algo, need_pre, need_table)
    return tuple(o if o is not None else table.new_empty(_NONE) for o in outs)


@lookup_backward_op.register_fake
def _(grad, x, pre, table, idx, scores, act, algo, need_pre, need_table):
    has_pre = pre is not None
    dx = x.new_empty(x.shape) if has_pre else table.new_empty(_NONE)
    d_pre = pre.new_empty(pre.shape) if has_pre and need_pre else table.new_empty(_NONE)
    d_table = table.new_empty(table.shape) if need_table else table.new_empty(_NONE)
    return scores.new_empty(scores.shape), dx, d_pre, d_table


def _setup_context(ctx, inputs, output):
    x, pre, table, idx, scores, act = inputs
    ctx.save_for_backward(x, pre, table, idx, scores)
    ctx.act = act


def _backward(ctx, grad):
    x, pre, table, idx, scores = ctx.saved_tensors
    need = ctx.needs_input_grad
    ds, dx, d_pre, d_table = lookup_backward_op(
        grad.contiguous(), x, pre, table, idx, scores, ctx.act, config.resolve_table_grad(),
        bool(need[1]), bool(need[2]))
    has_pre = pre is not None
    return (dx if has_pre else None, d_pre if has_pre and need[1] else None, d_table if need[2] else None,
            None, ds, None)


lookup_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# public functions (same signatures and validation as umv2_ref.values)
# ---------------------------------------------------------------------------------------------


def _flatten(indices: Tensor, scores: Tensor, c: int) -> tuple[Tensor, Tensor]:
    """indices ``[..., m]`` -> ``[T, m]``; scores ``[..., m]`` or ``[..., m, c]`` -> ``[T, m, c]`` (contiguous)."""
    T, m = math.prod(indices.shape[:-1]), indices.shape[-1]
    return indices.reshape(T, m).contiguous(), scores.reshape(T, m, c).contiguous()


def weighted_sum(table: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
    """Fused PKM / Memory+ value bag; see :func:`umv2_ref.values.weighted_sum` (PKM Sec. 3.3).

    table ``[N, D]``, indices ``[..., k]``, weights ``[..., k]`` or ``[..., k, c]`` -> ``[..., D]``.
    """
    c = check_lookup(table, indices, weights)
    idx, w = _flatten(indices, weights, c)  # [T, k], [T, k, c]
    out = lookup_op(None, None, _rows_ok(table), idx, w, 0)  # [T, D]
    return out.reshape(*indices.shape[:-1], table.shape[1])


def peer_values(
    x_pre: Tensor,
    pre_table: Tensor,
    table: Tensor,
    indices: Tensor,
    scores: Tensor,
    activation: str | None = None,
) -> Tensor:
    """Fused PEER / UltraMemV2 FFN values (UltraMemV2 Eqs. 13-15); see :func:`umv2_ref.values.peer_values`.

    x_pre ``[..., D_p]``, pre_table ``[N, D_p]``, table ``[N, D_v]``, indices ``[..., m]``, scores
    ``[..., m]`` or ``[..., m, c]``, activation None / 'relu' / 'gelu' (exact erf form) / 'silu'
    -> ``[..., D_v]``.
    """
    get_activation(activation)
    c = check_peer_inputs(x_pre, pre_table, table, indices, scores)
    idx, flat = _flatten(indices, scores, c)  # [T, m], [T, m, c]
    x = x_pre.reshape(idx.shape[0], pre_table.shape[1]).contiguous()  # [T, D_p]
    out = lookup_op(x, _rows_ok(pre_table), _rows_ok(table), idx, flat, ACT_CODES[activation])  # [T, D_v]
    return out.reshape(*indices.shape[:-1], table.shape[1])


# ---------------------------------------------------------------------------------------------
# ahead-of-time compile specs (python -m kernels.aot)
# ---------------------------------------------------------------------------------------------

AOT_D = (64, 128, 192, 256)  # D_p = D_v widths compiled
AOT_ACTS = {0: "none", 1: "relu", 2: "gelu", 3: "silu"}
ANCHOR_D = 192  # the target shape's width: every autotune config is compiled there
# Budgets at bf16: no spill (checked for every bf16 spec), <= 128 registers at 4 warps = 4 CTAs/SM.
LOOKUP_BUDGET = {"max_registers": 128, "min_ctas_per_sm": 4}
_INTS_DIVISIBLE = ("T", "M", "N", "DP", "DV", "DC", "stride_pre", "stride_val", "HOT")  # at the target shape


def _spec(name, fn, sig, consts, warps, stages, dtype, ci, note, budget=None):
    ptrs = [n for n, t in sig.items() if t.startswith("*")]
    ints = [n for n in sig if n in _INTS_DIVISIBLE and not (n == "DP" and consts.get("BLOCK_DP") == 1)]
    return dict(name=name, fn=fn, signature=sig, constexprs=consts, num_warps=warps, num_stages=stages,
                budget=(budget if budget is not None else (LOOKUP_BUDGET if dtype == "bf16" else {})),
                note=note, ci=ci, divisible_by_16=ptrs + ints)


def _token_specs() -> list[dict]:
    """Forward and per-token backward: peer_values (all activations) and weighted_sum, every config."""
    specs = []
    for dt in ("bf16", "fp32"):
        p = f"*{dt}"
        for D in AOT_D:
            for C in (1, 2):
                for has_pre, acts in ((True, (0, 1, 2, 3)), (False, (0,))):
                    op = "peer" if has_pre else "wsum"
                    for act in acts:
                        anchor = dt == "bf16" and D == ANCHOR_D and C == 2 and act == 0
                        ci = dt == "bf16" and D in (ANCHOR_D, 256) and act in (0, 2)
                        base = dict(C=C, HAS_PRE=has_pre, ACT=act, ACC=tl.float32,
                                    BLOCK_DP=_block(D) if has_pre else 1, BLOCK_DV=_block(D))
                        ints = dict(T="i32", M="i32", N="i32", DP="i32", DV="i32", DC="i32", stride_pre="i32",
                                    stride_val="i32")
                        fwd_sig = dict(x_ptr=p, pre_ptr=p, val_ptr=p, idx_ptr="*i64", s_ptr=p, out_ptr=p, **ints)
                        coef = "*fp32" if has_pre else p
                        bwd_sig = dict(g_ptr=p, x_ptr=p, pre_ptr=p, val_ptr=p, idx_ptr="*i64", s_ptr=p, ds_ptr=p,
                                       dx_ptr=p, coef_v_ptr=coef, coef_p_ptr=coef, **ints)
                        tag = f"{op}/{dt}/D{D}/c{C}/{AOT_ACTS[act]}"
                        for kind, fn, sig, choices in (("fwd", _lookup_fwd_kernel, fwd_sig, FWD_CHOICES),
                                                       ("bwd_token", _lookup_bwd_token_kernel, bwd_sig, BWD_CHOICES)):
                            for i, ch in enumerate(choices if anchor else choices[:1]):
                                cfg = f"BT{ch['BLOCK_T']}s{ch['NUM_STAGES']}"
                                note = ("autotune candidate" if i else "default config") + \
                                    ("; the interpreter uses the default" if i == 0 else "")
                                specs.append(_spec(f"{kind}/{tag}/{cfg}", fn, sig, {**base, **ch}, 4,
                                                   ch["NUM_STAGES"], dt, ci or (anchor and i > 0), note))
    return specs


def _table_grad_specs() -> list[dict]:
    """Atomic, sorted-row and hot-row table-gradient kernels for dV+dP, dV only (weighted_sum) and dP only."""
    specs = []
    for dt in ("bf16", "fp32"):
        p = f"*{dt}"
        for D in AOT_D:
            for has_v, has_p, C in ((True, True, 1), (True, True, 2), (True, False, 1), (True, False, 2),
                                    (False, True, 1)):
                what = "dV+dP" if has_v and has_p else ("dV" if has_v else "dP")
                ci = dt == "bf16" and D in (ANCHOR_D, 256)
                anchor = dt == "bf16" and D == ANCHOR_D and has_v and has_p and C == 2
                coef_v = "*fp32" if has_p else p  # weighted_sum's dV coefficients are its weights
                base = dict(C=C, HAS_V=has_v, HAS_P=has_p, ACC=tl.float32, BLOCK_DV=_block(D),
                            BLOCK_DP=_block(D) if has_p else 1)
                ptrs = dict(coef_v_ptr=coef_v, coef_p_ptr="*fp32", g_ptr=p, x_ptr=p)
                tag = f"{what}/{dt}/D{D}/c{C}"
                atomic_sig = dict(dv_ptr="*fp32", dp_ptr="*fp32", idx_ptr="*i64", **ptrs, T="i32", M="i32",
                                  N="i32", DV="i32", DP="i32", DC="i32")
                specs.append(_spec(f"atomic/{tag}", _scatter_atomic_kernel, atomic_sig,
                                   dict(base, BLOCK_T=ATOMIC_BLOCK_T), 4, 1, dt, ci,
                                   "relaxed fp32 atomics into zero-filled fp32 accumulators (the atomic option)",
                                   budget={**(LOOKUP_BUDGET if dt == "bf16" else {}),
                                           "max_total": {"fence": 0, "cache_invalidate": 0, "atomic": 0}}))
                rows_sig = dict(dv_ptr=p, dp_ptr=p, order_ptr="*i64", rows_ptr="*i32", bounds_ptr="*i32", **ptrs,
                                N="i32", M="i32", DV="i32", DP="i32", DC="i32", HOT="i32")
                for i, ch in enumerate(ROWS_CHOICES if anchor else ROWS_CHOICES[:1]):
                    specs.append(_spec(f"sorted_rows/{tag}/BR{ch['BLOCK_R']}J{ch['BLOCK_J']}", _scatter_sorted_kernel,
                                       rows_sig, {**base, **ch}, 4, 1, dt, ci,
                                       "rows written once in the table dtype (dv_ptr/dp_ptr), no zero-fill"))
                hot_sig = dict(dv_ptr=p, dp_ptr=p, hot_ptr="*i64", order_ptr="*i64", bounds_ptr="*i32", **ptrs,
                               N="i32", M="i32", DV="i32", DP="i32", DC="i32")
                specs.append(_spec(f"sorted_hot/{tag}", _scatter_sorted_hot_kernel, hot_sig,
                                   dict(base, BLOCK_J=HOT_BLOCK_J, NUM_STAGES=2), 4, 2, dt, ci,
                                   "one program per hot row (segment longer than CONFIG.hot_rows)"))
    return specs


def aot_specs() -> list[dict]:
    """Every specialisation the launchers above can request (the kernels.aot interface)."""
    return _token_specs() + _table_grad_specs()
