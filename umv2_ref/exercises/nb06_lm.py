"""Exercises of notebook 06 (UltraMemV2 inside a tiny language model).

* ``nb06_umv2_block``: the block output ``x_{l+1} = h + FFN(RMSNorm(h)) + Mem(RMSNorm(h))``
  (docs/references.md Sec. 6.2) from its parts, with the memory's retrieval already done (rows and scores
  given) and its value path as UltraMemV2 Eq. 15.
* ``nb06_lr_schedule``: the learning rates of one optimiser step -- warmup + cosine for the dense
  weights, times UltraMem's decaying multiplier for the memory values (docs/references.md Sec. 7.10).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..optim import cosine_lr, value_lr_multiplier
from .harness import register

EPS = 1e-6  # RMSNorm epsilon used by this exercise


# ----------------------------------------------------------------------------------------------
# nb06_umv2_block
# ----------------------------------------------------------------------------------------------


def _rms_norm(h, g):
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS) * g  # [B, T, d]


def _swiglu(x, w_gate, w_up, w_down):
    return (F.silu(x @ w_gate.T) * (x @ w_up.T)) @ w_down.T  # [B, T, d]


def _memory(x, rows, scores, w_pre, pre_values, values, w_v):
    """Eq. 15: ``W_v sum_i (<P[row_i], W_pre x> * s_i) V[row_i]`` (no activation)."""
    pre = torch.einsum("btp,btmp->btm", x @ w_pre.T, pre_values[rows])  # [B, T, m]
    z = torch.einsum("btm,btmv->btv", pre * scores, values[rows])  # [B, T, D_v]
    return z @ w_v.T  # [B, T, d]


def _block_inputs(gen: torch.Generator):
    B, T, d, f, m, N, Dp, Dv = 2, 3, 8, 12, 4, 16, 6, 10
    r = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    h = r(B, T, d)
    g = 1 + 0.1 * r(d)
    rows = torch.randint(N, (B, T, m), generator=gen)
    scores = r(B, T, m).abs()
    return h, g, r(f, d), r(f, d), r(d, f), rows, scores, r(Dp, d), r(N, Dp), r(N, Dv), r(d, Dv)


def _block_reference(h, g, w_gate, w_up, w_down, rows, scores, w_pre, pre_values, values, w_v):
    xbar = _rms_norm(h, g)  # the FFN input; the memory reads the same tensor
    return h + _swiglu(xbar, w_gate, w_up, w_down) + _memory(xbar, rows, scores, w_pre, pre_values, values, w_v)


def _block_sequential(h, g, w_gate, w_up, w_down, rows, scores, w_pre, pre_values, values, w_v):
    """Memory after the FFN (reads the FFN's output) instead of in parallel with it."""
    y = h + _swiglu(_rms_norm(h, g), w_gate, w_up, w_down)
    return y + _memory(_rms_norm(y, g), rows, scores, w_pre, pre_values, values, w_v)


def _block_unnormalised_memory(h, g, w_gate, w_up, w_down, rows, scores, w_pre, pre_values, values, w_v):
    """Memory reads the raw residual h instead of RMSNorm(h)."""
    xbar = _rms_norm(h, g)
    return h + _swiglu(xbar, w_gate, w_up, w_down) + _memory(h, rows, scores, w_pre, pre_values, values, w_v)


def _block_gelu_values(h, g, w_gate, w_up, w_down, rows, scores, w_pre, pre_values, values, w_v):
    """Keeps PEER's activation on the pre-value scores (UltraMemV2 removes it, Eq. 15)."""
    xbar = _rms_norm(h, g)
    pre = F.gelu(torch.einsum("btp,btmp->btm", xbar @ w_pre.T, pre_values[rows]))
    mem = torch.einsum("btm,btmv->btv", pre * scores, values[rows]) @ w_v.T
    return h + _swiglu(xbar, w_gate, w_up, w_down) + mem


register(
    "nb06_umv2_block",
    _block_reference,
    _block_inputs,
    wrong=[_block_sequential, _block_unnormalised_memory, _block_gelu_values],
    rtol=1e-9,
    atol=1e-9,
    description="x_{l+1} = h + SwiGLU(xbar) + W_v sum_i (<P[rows_i], W_pre xbar> s_i) V[rows_i], "
    "xbar = h * rsqrt(mean(h^2) + 1e-6) * g.  Args h [B,T,d], g [d], w_gate/w_up [f,d], w_down [d,f], "
    "rows [B,T,m], scores [B,T,m], w_pre [Dp,d], pre_values [N,Dp], values [N,Dv], w_v [d,Dv].",
)


# ----------------------------------------------------------------------------------------------
# nb06_lr_schedule
# ----------------------------------------------------------------------------------------------


def _schedule_inputs(gen: torch.Generator):
    total = int(torch.randint(50, 400, (1,), generator=gen))
    warmup = int(torch.randint(1, total // 4, (1,), generator=gen))
    steps = torch.randint(0, total + 20, (16,), generator=gen)  # a few past the end too
    base_lr = float(10 ** (-4 + 2 * torch.rand((), generator=gen, dtype=torch.float64)))
    start = float(1 + 4 * torch.rand((), generator=gen, dtype=torch.float64))
    return steps, total, warmup, base_lr, start


def _schedule_reference(steps, total, warmup, base_lr, start):
    lr = torch.tensor([cosine_lr(int(s), total, warmup, base_lr) for s in steps], dtype=torch.float64)
    mult = torch.tensor([value_lr_multiplier(int(s), total, start=start) for s in steps], dtype=torch.float64)
    return lr, lr * mult


def _schedule_no_warmup(steps, total, warmup, base_lr, start):
    lr = torch.tensor([cosine_lr(int(s), total, 0, base_lr) for s in steps], dtype=torch.float64)
    mult = torch.tensor([value_lr_multiplier(int(s), total, start=start) for s in steps], dtype=torch.float64)
    return lr, lr * mult


def _schedule_constant_multiplier(steps, total, warmup, base_lr, start):
    lr = torch.tensor([cosine_lr(int(s), total, warmup, base_lr) for s in steps], dtype=torch.float64)
    return lr, lr * start


def _schedule_cosine_to_zero(steps, total, warmup, base_lr, start):
    lr = torch.tensor([cosine_lr(int(s), total, warmup, base_lr, floor=0.0) for s in steps], dtype=torch.float64)
    mult = torch.tensor([value_lr_multiplier(int(s), total, start=start) for s in steps], dtype=torch.float64)
    return lr, lr * mult


register(
    "nb06_lr_schedule",
    _schedule_reference,
    _schedule_inputs,
    wrong=[_schedule_no_warmup, _schedule_constant_multiplier, _schedule_cosine_to_zero],
    rtol=1e-9,
    atol=0.0,
    description="(lr, value_lr) per step: linear warmup (step+1)/warmup, then cosine to 0.1x base; "
    "value_lr = lr * (1 + (start - 1) * max(0, 1 - step / total)).  Args steps [S] int64, total, warmup, "
    "base_lr, start; returns two [S] float64 tensors.",
)
