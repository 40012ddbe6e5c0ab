"""Fused value lookups: ``peer_values`` (PEER / UltraMemV2 FFN values) and ``weighted_sum`` (PKM bag).

Reference: :func:`umv2_ref.values.peer_values` and :func:`umv2_ref.values.weighted_sum`; same
signatures, same validation (``check_lookup``, ``check_peer_inputs``), same results within the tolerance contract of
``kernels/README.md`` (fp32 interpreter: 1e-5 relative; GPU fp32 1e-4; bf16 GPU 2e-2).

UltraMemV2 Eq. 15 per token t and selected slot i = indices[t, k]:

    a_tk = act(<P[i], x_pre[t]>),  w_tkc = a_tk * s_tkc,  z[t, d] = sum_k w_tk,core(d) V[i, d]

(``weighted_sum`` is the same with a_tk = 1).  One forward kernel, one per-token backward kernel
and two interchangeable table-gradient kernels:

* ``_lookup_fwd_kernel``: a program owns BLOCK_T tokens and the whole value width.  For each k it
  gathers P rows and V rows, dots, activates, scales and accumulates in fp32; z is written once.
* ``_lookup_bwd_token_kernel``: d scores, d x_pre and the per-(t, k) coefficients the table
  gradients need.  Each program owns its tokens, so nothing is shared: no atomics.
* table gradients ``dV[i] += w_tk g_t`` and ``dP[i] += da_tk x_t``: rows repeat across tokens (and
  within one), so programs collide.  ``_scatter_atomic_kernel`` adds with fp32 atomics;
  ``_scatter_sorted_kernel`` walks the (t, k) pairs sorted stably by row, one program per block of
  rows, and writes every row once (zeros for unread rows): bitwise reproducible.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from umv2_ref.values import check_lookup, check_peer_inputs, get_activation

from . import config

ACT_CODES = {None: 0, "relu": 1, "gelu": 2, "silu": 3}


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


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _lookup_fwd_kernel(
    x_ptr, pre_ptr, val_ptr, idx_ptr, s_ptr, out_ptr,
    T, M, DP, DV, DC, stride_pre, stride_val,
    C: tl.constexpr, HAS_PRE: tl.constexpr, ACT: tl.constexpr, ACC: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_DP: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """z[t] = sum_k act(<P[i_tk], x[t]>) * s[t, k, core(d)] * V[i_tk, d] for BLOCK_T tokens."""
    t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)  # [BT]
    t_ok = t < T
    dv = tl.arange(0, BLOCK_DV)  # [BDV]
    v_ok = t_ok[:, None] & (dv < DV)[None, :]  # [BT, BDV]
    core = dv // DC  # [BDV] which core weights channel d
    dp = tl.arange(0, BLOCK_DP)  # [BDP]
    p_ok = t_ok[:, None] & (dp < DP)[None, :]  # [BT, BDP]
    if HAS_PRE:
        x = tl.load(x_ptr + t[:, None] * DP + dp[None, :], mask=p_ok, other=0.0).to(ACC)  # [BT, BDP]
    acc = tl.full((BLOCK_T, BLOCK_DV), 0.0, ACC)  # [BT, BDV]
    for k in range(M):
        row = tl.load(idx_ptr + t * M + k, mask=t_ok, other=0).to(tl.int64)  # [BT]
        w = tl.load(s_ptr + (t * M + k)[:, None] * C + core[None, :], mask=v_ok, other=0.0).to(ACC)  # [BT, BDV]
        if HAS_PRE:
            p = tl.load(pre_ptr + row[:, None] * stride_pre + dp[None, :], mask=p_ok, other=0.0).to(ACC)  # [BT, BDP]
            a = _act(tl.sum(p * x, axis=1), ACT)  # [BT]
            w = w * a[:, None]  # [BT, BDV]
        v = tl.load(val_ptr + row[:, None] * stride_val + dv[None, :], mask=v_ok, other=0.0).to(ACC)  # [BT, BDV]
        acc += w * v
    tl.store(out_ptr + t[:, None] * DV + dv[None, :], acc.to(out_ptr.dtype.element_ty), mask=v_ok)


@triton.jit
def _lookup_bwd_token_kernel(
    g_ptr, x_ptr, pre_ptr, val_ptr, idx_ptr, s_ptr,
    ds_ptr, dx_ptr, coef_v_ptr, coef_p_ptr,
    T, M, DP, DV, DC, stride_pre, stride_val,
    C: tl.constexpr, HAS_PRE: tl.constexpr, ACT: tl.constexpr, ACC: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_DP: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Per-token gradients (no atomics: a program owns its tokens).

    ds[t,k,c] = a_tk <V[i]_c, g_t>_c;  with pre-values also da_tk = act'(.) sum_c s_tkc <V[i]_c, g_t>_c,
    dx[t] = sum_k da_tk P[i], and the table-gradient coefficients coef_v = a*s, coef_p = da.
    """
    t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)  # [BT]
    t_ok = t < T
    dv = tl.arange(0, BLOCK_DV)  # [BDV]
    v_ok = t_ok[:, None] & (dv < DV)[None, :]  # [BT, BDV]
    core = dv // DC  # [BDV]
    dp = tl.arange(0, BLOCK_DP)  # [BDP]
    p_ok = t_ok[:, None] & (dp < DP)[None, :]  # [BT, BDP]
    g = tl.load(g_ptr + t[:, None] * DV + dv[None, :], mask=v_ok, other=0.0).to(ACC)  # [BT, BDV]
    if HAS_PRE:
        x = tl.load(x_ptr + t[:, None] * DP + dp[None, :], mask=p_ok, other=0.0).to(ACC)  # [BT, BDP]
        dx = tl.full((BLOCK_T, BLOCK_DP), 0.0, ACC)  # [BT, BDP]
    for k in range(M):
        tk = t * M + k  # [BT]
        row = tl.load(idx_ptr + tk, mask=t_ok, other=0).to(tl.int64)  # [BT]
        gv = g * tl.load(val_ptr + row[:, None] * stride_val + dv[None, :], mask=v_ok, other=0.0).to(ACC)  # [BT, BDV]
        if HAS_PRE:
            p = tl.load(pre_ptr + row[:, None] * stride_pre + dp[None, :], mask=p_ok, other=0.0).to(ACC)  # [BT, BDP]
            pre = tl.sum(p * x, axis=1)  # [BT]
            a = _act(pre, ACT)  # [BT]
            da = tl.full((BLOCK_T,), 0.0, ACC)  # [BT]
        for c in tl.static_range(C):
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
        tl.store(dx_ptr + t[:, None] * DP + dp[None, :], dx.to(dx_ptr.dtype.element_ty), mask=p_ok)


@triton.jit
def _scatter_atomic_kernel(
    dt_ptr, idx_ptr, coef_ptr, src_ptr, T, M, D, DC,
    C: tl.constexpr, ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dT[i_tk, d] += coef[t, k, core(d)] * src[t, d] with atomics (dT zero-filled by the caller)."""
    t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)  # [BT]
    t_ok = t < T
    d = tl.arange(0, BLOCK_D)  # [BD]
    ok = t_ok[:, None] & (d < D)[None, :]  # [BT, BD]
    core = d // DC  # [BD]
    src = tl.load(src_ptr + t[:, None] * D + d[None, :], mask=ok, other=0.0).to(ACC)  # [BT, BD]
    for k in range(M):
        row = tl.load(idx_ptr + t * M + k, mask=t_ok, other=0).to(tl.int64)  # [BT]
        w = tl.load(coef_ptr + (t * M + k)[:, None] * C + core[None, :], mask=ok, other=0.0)  # [BT, BD]
        tl.atomic_add(dt_ptr + row[:, None] * D + d[None, :], w * src, mask=ok)


@triton.jit
def _scatter_sorted_kernel(
    dt_ptr, order_ptr, start_ptr, count_ptr, block_max_ptr, coef_ptr, src_ptr, N, M, D, DC,
    C: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dT[r] = sum over the (t, k) with i_tk = r, in stable sorted order, of coef * src[t].

    ``order`` lists flat pair ids t*M+k sorted stably by row; row r owns
    ``order[start[r] : start[r] + count[r]]``.  Rows nobody read get an explicit 0.
    """
    pid = tl.program_id(0)
    r = (pid * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)  # [BR]
    r_ok = r < N
    d = tl.arange(0, BLOCK_D)  # [BD]
    d_ok = d < D
    core = d // DC  # [BD]
    start = tl.load(start_ptr + r, mask=r_ok, other=0)  # [BR]
    count = tl.load(count_ptr + r, mask=r_ok, other=0)  # [BR]
    acc = tl.full((BLOCK_R, BLOCK_D), 0.0, ACC)  # [BR, BD]
    for j in range(tl.load(block_max_ptr + pid)):
        live = r_ok & (j < count)  # [BR]
        pair = tl.load(order_ptr + start + j, mask=live, other=0).to(tl.int64)  # [BR] flat t*M+k
        ok = live[:, None] & d_ok[None, :]  # [BR, BD]
        w = tl.load(coef_ptr + pair[:, None] * C + core[None, :], mask=ok, other=0.0)  # [BR, BD]
        src = tl.load(src_ptr + (pair // M)[:, None] * D + d[None, :], mask=ok, other=0.0).to(ACC)  # [BR, BD]
        acc += w * src
    tl.store(dt_ptr + r[:, None] * D + d[None, :], acc.to(dt_ptr.dtype.element_ty), mask=r_ok[:, None] & d_ok[None, :])


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


def scatter_rows(n_rows: int, idx: Tensor, coef: Tensor, src: Tensor, dtype: torch.dtype) -> Tensor:
    """``dT[idx[t, k], d] += coef[t, k, core(d)] * src[t, d]`` -> ``[n_rows, D]`` in ``dtype``.

    idx ``[T, M]``, coef ``[T, M, C]`` (accumulator dtype), src ``[T, D]``.  Algorithm from
    ``kernels.config.resolve_table_grad()``.
    """
    T, M = idx.shape
    D, C = src.shape[1], coef.shape[2]
    acc = _acc_dtype(coef.dtype)
    if config.resolve_table_grad() == "atomic":
        out = torch.zeros((n_rows, D), dtype=coef.dtype, device=src.device)  # [N, D] accumulator
        if T * M:
            bt = config.CONFIG.block_t
            _scatter_atomic_kernel[(triton.cdiv(T, bt),)](
                out, idx, coef, src, T, M, D, D // C, C=C, ACC=acc, BLOCK_T=bt, BLOCK_D=_block(D))
        return out.to(dtype)
    rows, order = torch.sort(idx.reshape(-1), stable=True)  # [T*M] pair ids grouped by row
    probe = torch.arange(n_rows + 1, device=idx.device, dtype=rows.dtype)  # [N+1]
    bounds = torch.searchsorted(rows, probe)  # [N+1] segment starts (no atomics: deterministic)
    start, count = bounds[:-1].contiguous(), (bounds[1:] - bounds[:-1]).contiguous()  # [N], [N]
    br = config.CONFIG.block_rows
    n_blocks = triton.cdiv(n_rows, br)
    block_max = torch.zeros(n_blocks * br, dtype=count.dtype, device=idx.device)  # [blocks*BR]
    block_max[:n_rows] = count
    block_max = block_max.view(n_blocks, br).amax(1).to(torch.int32)  # [blocks] longest segment
    out = config.empty((n_rows, D), dtype, src.device)  # [N, D] every row written by the kernel
    if n_blocks:
        _scatter_sorted_kernel[(n_blocks,)](
            out, order, start, count, block_max, coef, src, n_rows, M, D, D // C,
            C=C, ACC=acc, BLOCK_R=br, BLOCK_D=_block(D))
    return out


class _Lookup(torch.autograd.Function):
    """Autograd wrapper around the fused kernels; inputs already flat and validated.

    x ``[T, DP]`` (or None), pre ``[N, DP]`` (or None), table ``[N, DV]``, idx ``[T, M]``,
    scores ``[T, M, C]`` -> z ``[T, DV]``.
    """

    @staticmethod
    def forward(ctx, x, pre, table, idx, scores, act_code):
        T, M, C = scores.shape
        DV = table.shape[1]
        DP = pre.shape[1] if pre is not None else 1
        has_pre = pre is not None
        out = config.empty((T, DV), table.dtype, table.device)  # [T, DV]
        if T:
            bt = config.CONFIG.block_t
            _lookup_fwd_kernel[(triton.cdiv(T, bt),)](
                x if has_pre else table, pre if has_pre else table, table, idx, scores, out,
                T, M, DP, DV, DV // C, pre.stride(0) if has_pre else 0, table.stride(0),
                C=C, HAS_PRE=has_pre, ACT=act_code, ACC=_acc_dtype(table.dtype),
                BLOCK_T=bt, BLOCK_DP=_block(DP), BLOCK_DV=_block(DV))
        ctx.save_for_backward(x, pre, table, idx, scores)
        ctx.act_code = act_code
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, pre, table, idx, scores = ctx.saved_tensors
        has_pre = pre is not None
        grad = grad.contiguous()  # [T, DV]
        T, M, C = scores.shape
        N, DV = table.shape
        DP = pre.shape[1] if has_pre else 1
        acc_t = torch.float64 if table.dtype == torch.float64 else torch.float32
        dev = table.device
        ds = config.empty((T, M, C), scores.dtype, dev)  # [T, M, C]
        dx = config.empty((T, DP), x.dtype, dev) if has_pre else None  # [T, DP]
        coef_v = config.empty((T, M, C), acc_t, dev) if has_pre else scores  # [T, M, C] weight of g in dV
        coef_p = config.empty((T, M, 1), acc_t, dev) if has_pre else None  # [T, M, 1] weight of x in dP
        if T:
            bt = config.CONFIG.block_t
            _lookup_bwd_token_kernel[(triton.cdiv(T, bt),)](
                grad, x if has_pre else grad, pre if has_pre else table, table, idx, scores,
                ds, dx if has_pre else ds, coef_v, coef_p if has_pre else ds,
                T, M, DP, DV, DV // C, pre.stride(0) if has_pre else 0, table.stride(0),
                C=C, HAS_PRE=has_pre, ACT=ctx.act_code, ACC=_acc_dtype(table.dtype),
                BLOCK_T=bt, BLOCK_DP=_block(DP), BLOCK_DV=_block(DV))
        d_table = d_pre = None
        if ctx.needs_input_grad[2]:
            coef = coef_v if has_pre else scores.to(acc_t)  # [T, M, C]
            d_table = scatter_rows(N, idx, coef, grad, table.dtype)  # [N, DV]
        if has_pre and ctx.needs_input_grad[1]:
            d_pre = scatter_rows(N, idx, coef_p, x, pre.dtype)  # [N, DP]
        return dx, d_pre, d_table, None, ds, None


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
    out = _Lookup.apply(None, None, _rows_ok(table), idx, w, 0)  # [T, D]
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
    out = _Lookup.apply(x, _rows_ok(pre_table), _rows_ok(table), idx, flat, ACT_CODES[activation])  # [T, D_v]
    return out.reshape(*indices.shape[:-1], table.shape[1])
