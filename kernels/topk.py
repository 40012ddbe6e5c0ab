"""Fused TDQKR retrieval: prefilter + candidate scoring + top-m in one kernel, and its backward.

Reference: :func:`umv2_ref.retrieval.tucker_topk` (UltraMem arXiv 2411.12364 Eqs. 6-10, 16-17;
UltraMemV2 arXiv 2508.18756 Eqs. 6-7), same signature, validation and result, ``quadrants`` included.
``exact=True`` delegates to the reference.  One program per token (``_tucker_topk_fwd_kernel``):

1. **Prefilter, per axis.**  ``a = s_row @ u`` and ``b = s_col @ v`` over the n keys, read from
   ``s_row`` / ``s_col`` through their strides (the layers' einsum returns a permuted view; nothing
   is copied).  Candidates: the top k of ``a`` and of ``b``; with ``quadrants=2`` also the top k
   of ``-a`` and of ``-b`` (the (-,-) quadrant, where the rank-1 score ``a_i b_j`` is large although
   both factors are negative).  The k keys of each list are compacted into a scratch row.
2. **Per quadrant, the k x k candidate grid** ``s_row[i]^T (sum_c C_c) s_col[j]`` in registers and
   its top m.  The grid is a ``[RB, CB, 1, k/RB, k/CB]`` tensor so that each thread holds an RB x CB
   tile (8 x 8 at k = 128 on 8 warps) and loads only RB row and CB column factors.  In the (-,-)
   grid a pair whose row and column are also (+,+) candidates is masked (it counts once).
3. ``quadrants=2``: the top m of the 2 m quadrant winners (the union's top m is among them).  Doing
   the quadrants one after the other keeps one grid in registers, not two.
4. **Output**: per-core scores of the m winners, their order by counting rank (``rank_x = #{winners
   ahead of x}``, a loop over the m winners), stored straight to the output slot.

Every top-k / top-m is the same *selection by exact threshold* (``_select``), no sort network:

* values map to order-preserving signed integers (``_ordered``: the float bits, magnitude bits
  flipped for negative numbers, -0.0 mapped to +0.0), so integer order is float order;
* a threshold ``theta`` with ``count(value >= theta) == need`` is searched by counting passes (one
  compare and one add per element, one block reduction): first in float values (the grid uses
  Illinois false position on ``log(count)``: about 6 passes at k = 128, 10 for halving; the axes
  halve), then by integer bisection, so it always terminates;
* **filter** ``value >= theta`` keeps exactly ``need`` entries, **compacted** by an exclusive prefix
  count (thread-major order) into the scratch row (global memory, L1/L2-resident; a barrier between
  the store and the reload).  The review behind issue 11 suggested a lower bound from a sub-block
  plus ``tl.topk`` on the survivors; the exact threshold needs no capacity or fallback, and no sort.

Tie-breaking (explicit).  Candidates are ranked by their value *before its final rounding to the
input dtype*, then by the smaller id (row index on an axis; flat slot id ``i * n + j`` in the grid
and for the output order).  The reference ranks the rounded values with ``torch.topk``, which
leaves the order of equal values open; rounding is monotone, so the kernel's choice is one of the
orders the reference may produce: same slot set on continuous inputs, same values (and scores) on
ties.  If values still tie at the threshold, a second bisection over the ids keeps the smallest.

Rounding: ``sum_c C_c`` and the grid's row factor ``s_row[i] @ W`` are rounded to the input dtype
where the reference's matmuls round them; products and sums run in fp32 (fp64 for fp64 inputs);
the output scores are rounded as ``einsum("ma,cab,mb->mc")`` rounds them (contraction over a
first).  bf16 is rounded with integer ops (``_round``): the interpreter truncates fp32 -> bf16 casts.
With these rules the bf16 per-pair scores equal the reference's bit for bit (tested).

Backward (``_tucker_topk_bwd_kernel``), one program per token, from the m selected pairs only:
``d s_row[i] = sum_c g_c C_c s_col[j]``, ``d s_col[j] = sum_c g_c C_c^T s_row[i]``, written into the
token's dense ``[n, r]`` gradient rows (zeros stored first; a row picked by several pairs gets their
sum, formed with a pair-by-pair equality mask and written by the first such pair: no atomics, fixed
order, bitwise reproducible) and a per-token partial ``d cores [c, r, r]`` summed by ``torch.sum``.

Both kernels are ``torch.library`` custom ops (``umv2_kernels::tucker_topk``,
``umv2_kernels::tucker_topk_backward``) with fake implementations and no host synchronisation in the
launcher: the retrieval traces under ``torch.compile(fullgraph=True)`` with 0 graph breaks (tested).

AOT compile for sm_90a (``triton.compile`` with ``GPUTarget("cuda", 90, 64)``, the wheel's ``ptxas``
and ``cuobjdump``; specialisations in :func:`aot_specs`; n = 1024, r = 2, c = 2, bf16).  Dynamic
counts are *estimates*: static SASS of a tie-free build plus each selection loop's body times its
mean trip count, measured by a numpy emulation of ``_select`` on randn scores and U[0, 1) cores.

=======================  =====  ====  =====  ========  =========================================
kernel                   warps  regs  spill  static    est. dynamic warp-instructions per token
=======================  =====  ====  =====  ========  =========================================
old, k = m = 32              4    40      0     535    15.7 k (top-m loop 109 x 32 rounds x 4 warps)
new, k = m = 32, q = 1       4    64      0   2,805    15.0 k (prefilter included)
new, k = m = 32, q = 2       4    96      0   4,611    30.4 k
old, k = m = 128             8   211      0   2,666    429 k (top-m loop 401 x 128 rounds x 8 warps)
new, k = m = 128, q = 1      8   255      0   6,811    66.1 k: 6.5x fewer (fp32: 63.8 k vs 427 k)
new, k = m = 128, q = 2      8   255     44  10,743    139 k
backward, m = 128            8   158      0   7,338    (straight-line code, no loops)
=======================  =====  ====  =====  ========  =========================================

The old kernel did not include the prefilter (two GEMVs, two ``torch.topk`` and two ``.contiguous()``
copies ran in PyTorch); the new counts do.  No GPU has run this kernel: times are not claimed.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from umv2_ref.checks import require_float, require_positive_int, require_tensor
from umv2_ref.retrieval import _check_tucker, rank1_factors
from umv2_ref.retrieval import tucker_topk as reference_tucker_topk

from . import config

FLOAT_STEPS: tl.constexpr = tl.constexpr(16)  # bisection steps that halve the float interval first
MAX_N = 46340  # flat slot ids i * n + j are int32 in the kernel: n * n < 2**31

# Triton's own combine functions, the ones tl.sum / tl.max / tl.min / tl.cumsum hand to the builtins
# tl.reduce / tl.associative_scan.  Calling the builtins directly compiles to the same code, and the
# interpreter runs them in numpy instead of re-patching triton.language for every nested @jit call
# (about 10 ms each, which made a 10-step bisection cost a second per token).
_add = tl.standard._sum_combine
_max = tl.standard._elementwise_max
_min = tl.standard._elementwise_min


# ---------------------------------------------------------------------------------------------
# selection by exact threshold
# ---------------------------------------------------------------------------------------------


@triton.jit
def _ordered(x):
    """Float -> signed int of the same width, order-preserving; -0.0 gets the key of +0.0.

    Non-negative floats keep their bits; negative ones flip the 31 (63) magnitude bits, so a more
    negative float becomes a smaller int and the sign bit puts every negative below every positive.
    """
    x = x + 0.0  # -0.0 + 0.0 == +0.0
    if x.dtype == tl.float64:
        b = x.to(tl.int64, bitcast=True)
        o = b ^ ((b >> 63) & 0x7FFFFFFFFFFFFFFF)
    else:
        b = x.to(tl.float32).to(tl.int32, bitcast=True)
        o = b ^ ((b >> 31) & 0x7FFFFFFF)
    return o


@triton.jit
def _round(x, DT: tl.constexpr):
    """``x`` (fp32 / fp64) rounded to the input dtype DT and back, to nearest even.

    bf16 is rounded with integer ops: Triton's interpreter truncates fp32 -> bf16 casts (the GPU
    rounds), so the explicit form keeps interpreter and GPU bit-identical.
    """
    if DT == tl.bfloat16:
        b = x.to(tl.int32, bitcast=True)
        y = ((b + 0x7FFF + ((b >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
    else:
        y = x.to(DT).to(x.dtype)
    return y


@triton.jit
def _select(x, valid, need, row_id, col_id, n, FALSE_POSITION: tl.constexpr):
    """The ``need`` largest of ``x [A, B, Q, C, D]`` among ``valid``, by exact threshold.

    Ties go to the smaller id ``row_id * n + col_id`` (distinct, >= 0).  Returns
    ``(keep, slot, theta, tau)``: ``keep = valid & ((o > theta) | (o == theta & id <= tau))`` with
    ``o = _ordered(x)`` marks exactly ``need`` entries; ``slot`` numbers them 0..need-1 (the
    compaction slot, thread-major order: see ``fwd_meta``).  Small helpers are written inline:
    every nested ``@triton.jit`` call costs milliseconds in the interpreter.
    """
    S: tl.constexpr = x.dtype.primitive_bitwidth - 1  # 31 (fp32) or 63 (fp64)
    MAG: tl.constexpr = (1 << S) - 1  # magnitude bits
    o = tl.where(valid, _ordered(x), -(1 << S))  # invalid entries: below every float
    # bisection keeps count(o >= lo) = c_lo >= need > c_hi = count(o >= hi)
    hi = tl.reduce(o, None, _max)
    lo = tl.reduce(tl.where(valid, o, hi), None, _min)
    hi += 1
    c_lo = tl.reduce(valid.to(tl.int32), None, _add)
    n_valid = c_lo  # a scalar: with no valid entry the threshold would be the invalid entries' sentinel
    c_hi = c_lo * 0
    # phase 1, in float values: split the interval at its mean, or (FALSE_POSITION) where log(count)
    # interpolates to log(need) (Illinois rule, clamped): on the tests' distributions the k = 128
    # grid takes about 6 passes instead of 10, worth its scalar math only on large tensors
    log_need = tl.log(tl.full((), need, tl.float32))
    w_lo = 1.0
    w_hi = 1.0
    side = 0
    step = 0
    while (c_lo != need) & (lo + 1 < hi) & (step < FLOAT_STEPS):
        frac = tl.full((), 0.5, x.dtype)
        if FALSE_POSITION:
            g_lo = (tl.log(c_lo.to(tl.float32)) - log_need) * w_lo  # > 0
            g_hi = (tl.log(c_hi.to(tl.float32) + 0.5) - log_need) * w_hi  # < 0
            frac = tl.minimum(tl.maximum(g_lo / (g_lo - g_hi), 0.015625), 0.984375).to(x.dtype)
        f_lo = (lo ^ ((lo >> S) & MAG)).to(x.dtype, bitcast=True)
        f_hi = (hi ^ ((hi >> S) & MAG)).to(x.dtype, bitcast=True)
        mid = (f_lo + (f_hi - f_lo) * frac).to(o.dtype, bitcast=True)
        mid ^= (mid >> S) & MAG
        mid = tl.where((mid > lo) & (mid < hi), mid, (lo >> 1) + (hi >> 1) + (lo & hi & 1))
        c = tl.reduce((o >= mid).to(tl.int32), None, _add)
        up = c >= need
        lo = tl.where(up, mid, lo)
        c_lo = tl.where(up, c, c_lo)
        hi = tl.where(up, hi, mid)
        c_hi = tl.where(up, c_hi, c)
        if FALSE_POSITION:  # Illinois: an end kept twice in a row gets half the weight
            w_hi = tl.where(up & (side == 1), w_hi * 0.5, tl.where(up, w_hi, 1.0))
            w_lo = tl.where(~up & (side == -1), w_lo * 0.5, tl.where(up, 1.0, w_lo))
            side = tl.where(up, 1, -1)
        step += 1
    # phase 2: integer bisection on the ordered ints, at most S + 1 more passes
    while (c_lo != need) & (lo + 1 < hi):
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor((lo + hi) / 2) without overflow
        c = tl.reduce((o >= mid).to(tl.int32), None, _add)
        up = c >= need
        lo = tl.where(up, mid, lo)
        c_lo = tl.where(up, c, c_lo)
        hi = tl.where(up, hi, mid)
        c_hi = tl.where(up, c_hi, c)
    keep = o >= lo
    tau = tl.full((), 2147483647, tl.int32)
    if c_lo != need:  # values tie at the threshold lo: keep the smallest ids among them
        # one int per entry (not a mask next to o: fewer live registers): -1 above the threshold,
        # the id when tied, tau (int32 max, above every id) below
        order = tl.where(o > lo, -1, tl.where(o == lo, row_id * n + col_id, tau))
        id_lo = tau * 0 - 1  # count(order <= id_lo) == c_hi < need
        id_hi = tl.reduce(tl.where(order < tau, order, -1), None, _max)  # count(order <= id_hi) == c_lo
        while id_lo + 1 < id_hi:
            id_mid = id_lo + (id_hi - id_lo) // 2
            enough = tl.reduce((order <= id_mid).to(tl.int32), None, _add) >= need
            id_hi = tl.where(enough, id_mid, id_hi)
            id_lo = tl.where(enough, id_lo, id_mid)
        tau = id_hi
        keep = order <= tau
    # fewer valid entries than `need` keeps just the valid ones (their minimum is the threshold); none
    # at all (possible in the (-,-) quadrant) keeps nothing.  A scalar test: no per-entry mask stays live
    keep = keep & (n_valid > 0)
    # compaction slot: exclusive prefix count of keep, ordered by (q, c, d) then (a, b)
    f = keep.to(tl.int32)  # [A, B, Q, C, D]
    tile = tl.reduce(tl.reduce(f, 0, _add), 0, _add)  # [Q, C, D] per-thread counts (A, B in registers)
    per_c = tl.reduce(tile, 2, _add)  # [Q, C]
    per_q = tl.reduce(per_c, 1, _add)  # [Q]
    slot = (tl.associative_scan(per_q, 0, _add) - per_q)[:, None, None]
    slot += (tl.associative_scan(per_c, 1, _add) - per_c)[:, :, None]
    slot += tl.associative_scan(tile, 2, _add) - tile  # [Q, C, D] before this thread's tile
    per_a = tl.reduce(f, 1, _add)  # [A, Q, C, D]
    slot = slot[None, :, :, :] + tl.associative_scan(per_a, 0, _add) - per_a  # [A, Q, C, D]
    slot = slot[:, None, :, :, :] + tl.associative_scan(f, 1, _add) - f  # [A, B, Q, C, D]
    return keep, slot, lo, tau


@triton.jit
def _axis_candidates(
    s_ptr, s_n, s_r, w_ptr, scratch,
    N: tl.constexpr, K: tl.constexpr, R: tl.constexpr, QUAD: tl.constexpr, ACC: tl.constexpr,
    BLOCK_K: tl.constexpr, EB: tl.constexpr, NT: tl.constexpr,
):
    """Top-k keys of one axis by ``s @ w`` (and of ``-s @ w`` when QUAD == 2), compacted into scratch.

    The n keys are an ``[EB, 1, 1, 1, NT]`` tensor (key ``e * NT + t``: thread t reads keys t,
    t + NT, ...).  ``scratch[q * BLOCK_K + slot]`` gets quadrant q's k keys (in no particular
    order).  Returns the (+) quadrant's threshold ``(theta, tau)`` for membership tests.
    """
    key = tl.arange(0, EB)[:, None, None, None, None] * NT + tl.arange(0, NT)[None, None, None, None, :]
    if N == EB * NT:  # static all-true mask folds away
        ok = tl.full((EB, 1, 1, 1, NT), 1, tl.int1)
    else:
        ok = key < N
    a = tl.full((EB, 1, 1, 1, NT), 0, ACC)  # rank-1 axis score s @ w, products and sum in ACC
    for j in tl.static_range(R):
        a += tl.load(s_ptr + key * s_n + j * s_r, mask=ok, other=0.0).to(ACC) * tl.load(w_ptr + j).to(ACC)
    # a stays unrounded: the reference ranks round(a); rounding is monotone (see module docstring)
    keep, slot, theta, tau = _select(a, ok, K, 0, key, 0, False)
    tl.store(scratch + slot, key, mask=keep)
    if QUAD == 2:
        keep, slot, _, _ = _select(-a, ok, K, 0, key, 0, False)
        tl.store(scratch + BLOCK_K + slot, key, mask=keep)
    return theta, tau


@triton.jit
def _pair_scores(row_ptr, s_rr, col_ptr, s_cr, cores_ptr, live, out_ptr,
                 R: tl.constexpr, C: tl.constexpr, ACC: tl.constexpr, STORE: tl.constexpr):
    """Per-core scores ``s_row[i] C_c s_col[j]`` of pairs ``[BM]``, rounded as the reference's einsum
    (contraction over a first); stored at ``out_ptr + c`` if STORE.  Returns their sum (unrounded)."""
    DT: tl.constexpr = row_ptr.dtype.element_ty
    total = tl.full(live.shape, 0, ACC)
    for c in tl.static_range(C):
        s = tl.full(live.shape, 0, ACC)
        for b in tl.static_range(R):
            v = tl.full(live.shape, 0, ACC)  # (s_row[i] @ C_c)[b]
            for a in tl.static_range(R):
                v += tl.load(row_ptr + a * s_rr, mask=live, other=0.0).to(ACC) * tl.load(cores_ptr + (c * R + a) * R + b).to(ACC)
            s += _round(v, DT) * tl.load(col_ptr + b * s_cr, mask=live, other=0.0).to(ACC)
        s = _round(s, DT)
        if STORE:
            tl.store(out_ptr + c, s.to(out_ptr.dtype.element_ty), mask=live)
        total += s
    return total  # not rounded: the reference orders by round(total), a coarser view of the same order


@triton.jit
def _grid_value(row_ptr, s_rr, col_ptr, s_cr, cores_ptr, live_r, live_c,
                R: tl.constexpr, C: tl.constexpr, ACC: tl.constexpr):
    """Ranking value ``s_row[i] (sum_c C_c) s_col[j]`` for broadcastable row / column pointers, rounded
    where the reference's ``sr @ cores.sum(0) @ sc^T`` rounds (the sum of cores, the row factor) except
    the final rounding of the value."""
    DT: tl.constexpr = row_ptr.dtype.element_ty
    value = 0.0
    for b in tl.static_range(R):
        p = tl.full(live_r.shape, 0, ACC)  # (s_row[i] @ W)[b], W = sum_c C_c
        for a in tl.static_range(R):
            w = tl.full((), 0, ACC)
            for c in tl.static_range(C):
                w += tl.load(cores_ptr + (c * R + a) * R + b).to(ACC)
            p += tl.load(row_ptr + a * s_rr, mask=live_r, other=0.0).to(ACC) * _round(w, DT)
        value += _round(p, DT) * tl.load(col_ptr + b * s_cr, mask=live_c, other=0.0).to(ACC)
    return value  # not rounded: the reference ranks round(value), a coarser view of the same order


@triton.jit
def _tucker_topk_fwd_kernel(
    srow_ptr, scol_ptr, cores_ptr, uv_ptr, score_ptr, idx_ptr, scratch_ptr, total_ptr,
    s_rt, s_rn, s_rr, s_ct, s_cn, s_cr,
    N: tl.constexpr, K: tl.constexpr, M: tl.constexpr, R: tl.constexpr, C: tl.constexpr,
    QUAD: tl.constexpr, ACC: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
    SCRATCH: tl.constexpr, WIN: tl.constexpr, EB: tl.constexpr, NT: tl.constexpr, RB: tl.constexpr,
    CB: tl.constexpr,
):
    """One token: prefilter -> [QUAD, k, k] grid -> top m -> per-core scores in summed-score order."""
    t = tl.program_id(0).to(tl.int64)
    srow = srow_ptr + t * s_rt
    scol = scol_ptr + t * s_ct
    scratch = scratch_ptr + t * SCRATCH

    # 1. per-axis candidates, compacted into scratch as [rows q=0, (rows q=1), cols q=0, (cols q=1)]
    th_r, tau_r = _axis_candidates(srow, s_rn, s_rr, uv_ptr, scratch, N, K, R, QUAD, ACC, BLOCK_K, EB, NT)
    th_c, tau_c = _axis_candidates(scol, s_cn, s_cr, uv_ptr + R, scratch + QUAD * BLOCK_K,
                                   N, K, R, QUAD, ACC, BLOCK_K, EB, NT)
    if QUAD == 2:  # the (-,-) quadrant may have fewer than m valid pairs (its rows and columns can all be
        # (+,+) candidates too): its unwritten winner slots must read as empty, not as stale memory
        w = tl.arange(0, 2 * BLOCK_M)
        tl.store(scratch + WIN + w, tl.full((2 * BLOCK_M,), -1, tl.int32))
    tl.debug_barrier()  # the compacted keys, written by other threads, are read below (scratch[WIN:] is free)

    # 2. per quadrant: the k x k candidate grid and its top m.  The grid is an [RB, CB, 1, NR, NC]
    #    tensor: element (rj, cj, 0, ri, ci) pairs candidate row i = ri * RB + rj with candidate
    #    column j = ci * CB + cj, so each thread holds an RB x CB tile and needs only RB row and
    #    CB column factors.  The union's top m is the top m of the quadrants' top m (stage 3).
    i = tl.arange(0, RB)[:, None, None, None, None] + tl.arange(0, BLOCK_K // RB)[None, None, None, :, None] * RB
    j = tl.arange(0, CB)[None, :, None, None, None] + tl.arange(0, BLOCK_K // CB)[None, None, None, None, :] * CB
    if K == BLOCK_K:  # static all-true masks fold away
        live_r = tl.full(i.shape, 1, tl.int1)
        live_c = tl.full(j.shape, 1, tl.int1)
    else:
        live_r = i < K  # [RB, 1, 1, NR, 1]
        live_c = j < K  # [1, CB, 1, 1, NC]
    for q in range(QUAD):  # a loop, not unrolled: one copy of the code for both quadrants
        rows = tl.load(scratch + q * BLOCK_K + i, mask=live_r, other=0)  # candidate row keys
        cols = tl.load(scratch + (QUAD + q) * BLOCK_K + j, mask=live_c, other=0)  # candidate column keys
        grid = _grid_value(srow + rows * s_rn, s_rr, scol + cols * s_cn, s_cr, cores_ptr, live_r, live_c, R, C, ACC)
        valid = live_r & live_c
        if q == 1:  # a (-,-) pair whose row and column are also (+,+) candidates is there already
            ar = tl.full(rows.shape, 0, ACC)
            ac = tl.full(cols.shape, 0, ACC)
            for a in tl.static_range(R):
                ar += tl.load(srow + rows * s_rn + a * s_rr, mask=live_r, other=0.0).to(ACC) * tl.load(uv_ptr + a).to(ACC)
                ac += tl.load(scol + cols * s_cn + a * s_cr, mask=live_c, other=0.0).to(ACC) * tl.load(uv_ptr + R + a).to(ACC)
            o_r = _ordered(ar)
            o_c = _ordered(ac)
            in_r = (o_r > th_r) | ((o_r == th_r) & (rows <= tau_r))  # the row is in R+ too
            in_c = (o_c > th_c) | ((o_c == th_c) & (cols <= tau_c))
            valid = valid & ~(in_r & in_c)
        keep, slot, _, _ = _select(grid, valid, M, rows, cols, N, True)
        tl.store(scratch + WIN + q * BLOCK_M + slot, rows * N + cols, mask=keep)  # flat slot ids
    tl.debug_barrier()
    if QUAD == 2:  # 3. the top m of the 2 m quadrant winners, by the same value and tie rule
        e = tl.arange(0, 2 * BLOCK_M)[None, None, None, None, :]  # [1, 1, 1, 1, 2 BM]
        both = tl.load(scratch + WIN + e, mask=(e % BLOCK_M) < M, other=-1)
        live = both >= 0  # a written winner (slot ids are >= 0; empty slots hold -1)
        both = tl.where(live, both, 0)
        value = _grid_value(srow + (both // N).to(tl.int64) * s_rn, s_rr, scol + (both % N).to(tl.int64) * s_cn,
                            s_cr, cores_ptr, live, live, R, C, ACC)
        keep, slot, _, _ = _select(value, live, M, 0, both, 0, False)
        tl.debug_barrier()  # every thread has read the quadrant winners before they are overwritten
        tl.store(scratch + WIN + slot, both, mask=keep)
        tl.debug_barrier()

    # 4. the winners' summed scores, then output order by counting rank: winners ahead of x have a
    #    larger summed score (rounded to the dtype, as the reference's scores.sum(-1)) or an equal
    #    one and a smaller id
    x = tl.arange(0, BLOCK_M)  # [BM] winner number, one per thread
    won = x < M
    ids = tl.load(scratch + WIN + x, mask=won, other=0)  # [BM] flat slot ids
    row_ptr = srow + (ids // N).to(tl.int64) * s_rn
    col_ptr = scol + (ids % N).to(tl.int64) * s_cn
    out = score_ptr + (t * M + x) * C
    total = _pair_scores(row_ptr, s_rr, col_ptr, s_cr, cores_ptr, won, out, R, C, ACC, False)
    tl.store(total_ptr + t * BLOCK_M + x, total, mask=won)
    tl.debug_barrier()
    rank = tl.full((BLOCK_M,), 0, tl.int32)
    for y in range(M):
        t_y = tl.load(total_ptr + t * BLOCK_M + y)
        id_y = tl.load(scratch + WIN + y)
        rank += ((t_y > total) | ((t_y == total) & (id_y < ids))).to(tl.int32)
    tl.store(idx_ptr + t * M + rank, ids.to(tl.int64), mask=won)
    _pair_scores(row_ptr, s_rr, col_ptr, s_cr, cores_ptr, won, score_ptr + (t * M + rank) * C, R, C, ACC, True)


@triton.jit
def _tucker_topk_bwd_kernel(
    grad_ptr, idx_ptr, srow_ptr, scol_ptr, cores_ptr, drow_ptr, dcol_ptr, dcores_ptr,
    n, m, s_rt, s_rn, s_rr, s_ct, s_cn, s_cr,
    R: tl.constexpr, C: tl.constexpr, ACC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, MRB: tl.constexpr, MCB: tl.constexpr,
):
    """One token: dense d s_row / d s_col rows [n, r] and partial d cores [c, r, r] from its m pairs.

    A row (column) picked by several pairs gets their sum, formed in an ``[MRB, MCB, BM/MRB, BM/MCB]``
    tile of pair x against pair y (same row?) and written by the first such pair: no atomics, a
    fixed summation order.
    """
    t = tl.program_id(0).to(tl.int64)
    srow = srow_ptr + t * s_rt
    scol = scol_ptr + t * s_ct
    key = tl.arange(0, BLOCK_N)[:, None]  # [BN, 1]
    rr = tl.arange(0, BLOCK_R)[None, :]  # [1, BR]
    dense = t * n * R + key * R + rr  # [BN, BR] offsets into the contiguous [T, n, r] gradients
    zero = tl.full((BLOCK_N, BLOCK_R), 0, drow_ptr.dtype.element_ty)
    tl.store(drow_ptr + dense, zero, mask=(key < n) & (rr < R))
    tl.store(dcol_ptr + dense, zero, mask=(key < n) & (rr < R))

    x = tl.arange(0, MRB)[:, None, None, None] + tl.arange(0, BLOCK_M // MRB)[None, None, :, None] * MRB
    y = tl.arange(0, MCB)[None, :, None, None] + tl.arange(0, BLOCK_M // MCB)[None, None, None, :] * MCB
    id_x = tl.load(idx_ptr + t * m + x, mask=x < m, other=0)  # [MRB, 1, BM/MRB, 1] int64 flat ids
    id_y = tl.load(idx_ptr + t * m + y, mask=y < m, other=0)  # [1, MCB, 1, BM/MCB]
    same_r = (id_x // n == id_y // n) & (y < m)
    same_c = (id_x % n == id_y % n) & (y < m)
    first_r = tl.reduce(tl.reduce((same_r & (y < x)).to(tl.int32), 3, _add), 1, _add) == 0  # [MRB, BM/MRB]
    first_c = tl.reduce(tl.reduce((same_c & (y < x)).to(tl.int32), 3, _add), 1, _add) == 0
    xw = tl.arange(0, MRB)[:, None] + tl.arange(0, BLOCK_M // MRB)[None, :] * MRB  # [MRB, BM/MRB]
    id_w = tl.load(idx_ptr + t * m + xw, mask=xw < m, other=0)
    row_y, col_y = id_y // n, id_y % n
    tl.debug_barrier()  # the zeros above land before the sums below
    for a in tl.static_range(R):  # d s_row[i, a] = sum_c g_c sum_b C_c[a, b] s_col[j, b], per pair y
        d = tl.full(y.shape, 0, ACC)
        for c in tl.static_range(C):
            g = tl.load(grad_ptr + (t * m + y) * C + c, mask=y < m, other=0.0).to(ACC)
            for b in tl.static_range(R):
                sc = tl.load(scol + col_y * s_cn + b * s_cr, mask=y < m, other=0.0).to(ACC)
                d += g * tl.load(cores_ptr + (c * R + a) * R + b).to(ACC) * sc
        d = tl.reduce(tl.reduce(tl.where(same_r, d, 0.0), 3, _add), 1, _add)  # [MRB, BM/MRB] per row
        tl.store(drow_ptr + t * n * R + (id_w // n) * R + a, _round(d, drow_ptr.dtype.element_ty).to(drow_ptr.dtype.element_ty), mask=(xw < m) & first_r)
    for b in tl.static_range(R):  # d s_col[j, b] = sum_c g_c sum_a s_row[i, a] C_c[a, b]
        d = tl.full(y.shape, 0, ACC)
        for c in tl.static_range(C):
            g = tl.load(grad_ptr + (t * m + y) * C + c, mask=y < m, other=0.0).to(ACC)
            for a in tl.static_range(R):
                sr = tl.load(srow + row_y * s_rn + a * s_rr, mask=y < m, other=0.0).to(ACC)
                d += g * tl.load(cores_ptr + (c * R + a) * R + b).to(ACC) * sr
        d = tl.reduce(tl.reduce(tl.where(same_c, d, 0.0), 3, _add), 1, _add)
        tl.store(dcol_ptr + t * n * R + (id_w % n) * R + b, _round(d, dcol_ptr.dtype.element_ty).to(dcol_ptr.dtype.element_ty), mask=(xw < m) & first_c)
    j = tl.arange(0, BLOCK_M)  # d cores[c, a, b] = sum over pairs g_c s_row[i, a] s_col[j, b]
    won = j < m
    slot = tl.load(idx_ptr + t * m + j, mask=won, other=0)
    for c in tl.static_range(C):
        g = tl.load(grad_ptr + (t * m + j) * C + c, mask=won, other=0.0).to(ACC)
        for a in tl.static_range(R):
            sr = tl.load(srow + (slot // n) * s_rn + a * s_rr, mask=won, other=0.0).to(ACC)
            for b in tl.static_range(R):
                sc = tl.load(scol + (slot % n) * s_cn + b * s_cr, mask=won, other=0.0).to(ACC)
                tl.store(dcores_ptr + (t * C + c) * R * R + a * R + b, tl.reduce(g * sr * sc, 0, _add))


# ---------------------------------------------------------------------------------------------
# launch configuration
# ---------------------------------------------------------------------------------------------


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _tile(side: int, blocks: int, threads: int) -> tuple[int, int]:
    """Register tile (rows, cols) per thread for ``blocks`` square ``side x side`` grids on ``threads``."""
    per_thread = max(1, blocks * side * side // threads)
    rb = 1 << ((per_thread.bit_length()) // 2)  # rb * cb = per_thread, rb >= cb
    return min(rb, side), min(max(1, per_thread // rb), side)


def fwd_meta(n: int, k: int, m: int, quadrants: int, num_warps: int | None = None) -> dict:
    """Compile-time sizes and warps of the forward kernel (shared by the launcher and the AOT specs).

    ``EB x NT``: the n keys of an axis, NT threads with EB keys each.  ``RB x CB``: the register tile
    of the candidate grid per thread (<= 64 values), so it needs RB row and CB column factors.
    """
    block_n, block_k, block_m = (triton.next_power_of_2(x) for x in (n, k, m))
    if num_warps is None:
        num_warps = min(16, max(4, block_k * block_k // 2048))
    threads = 32 * num_warps
    nt = min(block_n, threads)
    rb, cb = _tile(block_k, 1, threads)
    win = 2 * quadrants * block_k  # scratch: per-axis candidates, then the winners at [WIN, WIN + QUAD * BM)
    return dict(N=n, K=k, M=m, BLOCK_K=block_k, BLOCK_M=block_m, SCRATCH=win + quadrants * block_m, WIN=win,
                EB=block_n // nt, NT=nt, RB=rb, CB=cb, num_warps=num_warps)


def bwd_meta(n: int, r: int, m: int) -> dict:
    block_m = triton.next_power_of_2(m)
    num_warps = 8 if block_m >= 128 else 4
    mrb, mcb = _tile(block_m, 1, 32 * num_warps)
    return dict(BLOCK_N=triton.next_power_of_2(n), BLOCK_R=triton.next_power_of_2(r), BLOCK_M=block_m,
                MRB=mrb, MCB=mcb, num_warps=num_warps)


_TRITON_DTYPES = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float64: "*fp64"}


def aot_specs(n: int = 1024, r: int = 2) -> list[dict]:
    """Every forward / backward specialisation the launcher uses at the target shape, for ``kernels.aot``.

    Forward: k = m in {32, 128}, c in {1, 2}, quadrants 1 / 2, bf16 / fp32 (n = 1024 keys per axis,
    rank r = 2).  Backward: m in {32, 128}, c in {1, 2}, bf16 / fp32.  Strides are runtime ``i32``
    here; the JIT additionally specialises a stride of 1 (the layers' permuted ``s_row`` view has
    ``stride(1) == 1``), so these numbers are a slight upper bound.
    """
    specs = []
    strides = {s: "i32" for s in ("s_rt", "s_rn", "s_rr", "s_ct", "s_cn", "s_cr")}
    for dtype in (torch.bfloat16, torch.float32):
        dt = _TRITON_DTYPES[dtype]
        for km in (32, 128):
            for c in (1, 2):
                for quadrants in (1, 2):
                    meta = fwd_meta(n, km, km, quadrants)
                    warps = meta.pop("num_warps")
                    consts = dict(R=r, C=c, QUAD=quadrants, ACC=_acc(dtype), **meta)
                    sig = dict(srow_ptr=dt, scol_ptr=dt, cores_ptr=dt, uv_ptr=dt, score_ptr=dt, idx_ptr="*i64",
                               scratch_ptr="*i32", total_ptr="*fp32", **strides, **{name: "constexpr" for name in consts})
                    # k = 128 with two quadrants keeps four thresholds live across the quadrant loop:
                    # ptxas spills 88 bytes (measured, bf16 and fp32; 44 before the empty-(-,-)-quadrant
                    # fix of 2 Dec 2026, a correctness fix); everything else spills nothing
                    spill = 96 if (km, quadrants) == (128, 2) else 0
                    specs.append(dict(
                        name=f"tucker_topk_fwd_{dt[1:]}_k{km}_m{km}_c{c}_q{quadrants}", fn=_tucker_topk_fwd_kernel,
                        signature=sig, constexprs=consts, num_warps=warps, num_stages=1,
                        budget={"max_registers": 255, "max_spill_bytes": spill},
                        # CI compiles a bf16 two-core subset (6-75 s each on a CPU); `python -m kernels.aot` the full matrix
                        ci=(dtype == torch.bfloat16 and c == 2 and (km == 32 or quadrants == 1)),
                        note=f"fused prefilter + top-m, n={n}, r={r}: one program per token"))
            meta = bwd_meta(n, r, km)
            warps = meta.pop("num_warps")
            for c in (1, 2):
                consts = dict(R=r, C=c, ACC=_acc(dtype), **meta)
                sig = dict(grad_ptr=dt, idx_ptr="*i64", srow_ptr=dt, scol_ptr=dt, cores_ptr=dt, drow_ptr=dt, dcol_ptr=dt,
                           dcores_ptr="*fp32", n="i32", m="i32", **strides, **{name: "constexpr" for name in consts})
                specs.append(dict(
                    name=f"tucker_topk_bwd_{dt[1:]}_m{km}_c{c}", fn=_tucker_topk_bwd_kernel, signature=sig,
                    constexprs=consts, num_warps=warps, num_stages=1, budget={"max_registers": 255, "max_spill_bytes": 0},
                    ci=(dtype == torch.bfloat16 and c == 2 and km == 32),
                    note=f"backward from the m selected pairs, n={n}, r={r}"))
    return specs


# ---------------------------------------------------------------------------------------------
# custom ops (torch.library): the kernel path, with fake implementations for torch.compile
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("umv2_kernels::tucker_topk", mutates_args=())
def _topk_op(s_row: Tensor, s_col: Tensor, cores: Tensor, uv: Tensor, m: int, k: int, quadrants: int) -> tuple[Tensor, Tensor]:
    """s_row, s_col ``[T, n, r]`` (any strides), cores ``[c, r, r]``, uv ``[2, r]`` -> scores ``[T, m, c]``, ids ``[T, m]``."""
    (T, n, r), c = s_row.shape, cores.shape[0]
    scores = config.empty((T, m, c), s_row.dtype, s_row.device)  # [T, m, c]
    idx = config.empty((T, m), torch.int64, s_row.device)  # [T, m]
    if T:
        meta = fwd_meta(n, k, m, quadrants)
        scratch = config.empty((T, meta["SCRATCH"]), torch.int32, s_row.device)  # compacted keys / ids
        totals = config.empty((T, meta["BLOCK_M"]), torch.float64 if s_row.dtype == torch.float64 else torch.float32,
                              s_row.device)  # the winners' summed scores
        _tucker_topk_fwd_kernel[(T,)](
            s_row, s_col, cores.contiguous(), uv.contiguous(), scores, idx, scratch, totals,
            *s_row.stride(), *s_col.stride(), R=r, C=c, QUAD=quadrants, ACC=_acc(s_row.dtype),
            num_stages=1, **meta)  # no dot loop to pipeline
    return scores, idx


@_topk_op.register_fake
def _(s_row, s_col, cores, uv, m, k, quadrants):
    T, c = s_row.shape[0], cores.shape[0]
    return s_row.new_empty((T, m, c)), s_row.new_empty((T, m), dtype=torch.int64)


@torch.library.custom_op("umv2_kernels::tucker_topk_backward", mutates_args=())
def _topk_bwd_op(grad: Tensor, idx: Tensor, s_row: Tensor, s_col: Tensor, cores: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """grad ``[T, m, c]``, idx ``[T, m]`` -> d s_row, d s_col ``[T, n, r]`` (contiguous), d cores ``[c, r, r]``."""
    (T, n, r), (c, m) = s_row.shape, (cores.shape[0], idx.shape[1])
    d_row = config.empty((T, n, r), s_row.dtype, s_row.device)
    d_col = config.empty((T, n, r), s_col.dtype, s_col.device)
    part = config.empty((T, c, r, r), torch.float64 if cores.dtype == torch.float64 else torch.float32, s_row.device)
    if T:
        _tucker_topk_bwd_kernel[(T,)](
            grad.contiguous(), idx.contiguous(), s_row, s_col, cores.contiguous(), d_row, d_col, part,
            n, m, *s_row.stride(), *s_col.stride(), R=r, C=c, ACC=_acc(s_row.dtype), num_stages=1, **bwd_meta(n, r, m))
    return d_row, d_col, part.sum(0).to(cores.dtype)


@_topk_bwd_op.register_fake
def _(grad, idx, s_row, s_col, cores):
    return s_row.new_empty(s_row.shape), s_col.new_empty(s_col.shape), cores.new_empty(cores.shape)


def _setup_context(ctx, inputs, output):
    s_row, s_col, cores = inputs[:3]
    ctx.save_for_backward(s_row, s_col, cores, output[1])
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_scores, _grad_idx):
    s_row, s_col, cores, idx = ctx.saved_tensors
    d_row, d_col, d_cores = _topk_bwd_op(grad_scores, idx, s_row, s_col, cores)
    return d_row, d_col, d_cores, None, None, None, None


_topk_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# public function
# ---------------------------------------------------------------------------------------------


def _check_args(s_row, s_col, cores, m, k, rank1, quadrants) -> tuple[int, int, int]:
    """The single validation call site: the reference's checks in the reference's order, then the
    kernel's own limits (rank1 shape: the kernel reads r entries of each).  -> n, r, k."""
    n, r = _check_tucker(s_row, s_col, cores, m, k=k, rank1=rank1, quadrants=quadrants)
    if isinstance(quadrants, bool) or not isinstance(quadrants, int) or quadrants not in (1, 2):
        raise ValueError(f"quadrants must be 1 or 2, got {quadrants!r}")
    k = m if k is None else k
    require_positive_int("k", k)
    if k > n or k * k < m:
        raise ValueError(f"k (candidates per axis) must satisfy k <= n={n} and k*k >= m={m}; got k={k}")
    if rank1 is not None:
        if not (isinstance(rank1, (tuple, list)) and len(rank1) == 2):
            raise ValueError(f"rank1 must be a pair (u, v) of [r] tensors, got {type(rank1).__name__}")
        for name, x in zip(("rank1[0]", "rank1[1]"), rank1):
            require_tensor(name, x)
            require_float(name, x)
            if tuple(x.shape) != (r,):
                raise ValueError(f"{name} must have shape [r] = [{r}], got {tuple(x.shape)}")
    if n > MAX_N:
        raise ValueError(f"kernels.tucker_topk needs n <= {MAX_N} keys per axis (int32 slot ids); got n={n}")
    return n, r, k


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
    """Fused rank-1-prefiltered TDQKR top-m; contract of :func:`umv2_ref.retrieval.tucker_topk`.

    s_row, s_col ``[..., n, r]``, cores ``[c, r, r]`` -> ``(scores [..., m, c], indices [..., m])``
    sorted by descending summed score.  ``quadrants=2`` adds the (-,-) candidates.  ``exact=True``
    runs the reference full-grid scan.
    """
    if exact:
        return reference_tucker_topk(s_row, s_col, cores, m, exact=True, k=k, rank1=rank1, quadrants=quadrants)
    n, r, k = _check_args(s_row, s_col, cores, m, k, rank1, quadrants)
    u, v = rank1_factors(cores) if rank1 is None else rank1
    uv = torch.stack([u.to(s_row.dtype), v.to(s_row.dtype)])  # [2, r]
    lead, c = s_row.shape[:-2], cores.shape[0]
    scores, idx = _topk_op(s_row.reshape(-1, n, r), s_col.reshape(-1, n, r), cores, uv, m, k, quadrants)
    return scores.reshape(*lead, m, c), idx.reshape(*lead, m)
