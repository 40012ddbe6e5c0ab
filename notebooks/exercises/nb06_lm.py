"""Exercises of notebook 06 (UltraMemV2 inside a tiny language model).

* ``nb06_umv2_block``: the block output ``x_{l+1} = h + FFN(RMSNorm(h)) + Mem(RMSNorm(h))`` from its
  parts, with the memory's retrieval already done (rows and scores given) and its value path as
  UltraMemV2 Eq. 15.
* ``nb06_lr_schedule``: the learning rates of one optimiser step -- warmup + cosine for the dense
  weights, times UltraMem's decaying multiplier for the memory values.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from umv2_ref.exercises.harness import Alternative, Mistake, register
from umv2_ref.optim import cosine_lr, value_lr_multiplier

from . import uses_package

EPS = 1e-6  # RMSNorm epsilon used by this exercise


# ----------------------------------------------------------------------------------------------
# nb06_umv2_block
# ----------------------------------------------------------------------------------------------


def _rms_norm(h, g, eps=EPS):
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * g  # [B, T, d]


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
    y = h + _swiglu(_rms_norm(h, g), w_gate, w_up, w_down)
    return y + _memory(_rms_norm(y, g), rows, scores, w_pre, pre_values, values, w_v)


def _block_unnormalised_memory(h, g, w_gate, w_up, w_down, rows, scores, w_pre, pre_values, values, w_v):
    xbar = _rms_norm(h, g)
    return h + _swiglu(xbar, w_gate, w_up, w_down) + _memory(h, rows, scores, w_pre, pre_values, values, w_v)


def _block_gelu_values(h, g, w_gate, w_up, w_down, rows, scores, w_pre, pre_values, values, w_v):
    xbar = _rms_norm(h, g)
    pre = F.gelu(torch.einsum("btp,btmp->btm", xbar @ w_pre.T, pre_values[rows]))
    mem = torch.einsum("btm,btmv->btv", pre * scores, values[rows]) @ w_v.T
    return h + _swiglu(xbar, w_gate, w_up, w_down) + mem


def _block_no_residual(h, g, w_gate, w_up, w_down, rows, scores, w_pre, pre_values, values, w_v):
    return _block_reference(h, g, w_gate, w_up, w_down, rows, scores, w_pre, pre_values, values, w_v) - h


def _block_default_eps(h, g, w_gate, w_up, w_down, rows, scores, w_pre, pre_values, values, w_v):
    xbar = F.rms_norm(h, (h.shape[-1],), g)  # eps = machine epsilon of the dtype
    return h + _swiglu(xbar, w_gate, w_up, w_down) + _memory(xbar, rows, scores, w_pre, pre_values, values, w_v)


register(
    "nb06_umv2_block", _block_reference, _block_inputs,
    notebook="06", fn_name="my_umv2_block",
    goal="Assemble an UltraMemV2 block from raw tensors: memory in parallel with the FFN, both reading RMSNorm(h).",
    mistakes=[
        Mistake("sequential_memory", _block_sequential,
                "your memory reads the FFN's output (a sequential block); in UltraMemV2 it runs in parallel "
                "with the FFN on the same normalised input xbar, and both outputs are added to h."),
        Mistake("unnormalised_memory", _block_unnormalised_memory,
                "your memory reads the raw residual h; it reads RMSNorm(h), the same tensor as the FFN."),
        Mistake("gelu_on_pre_scores", _block_gelu_values,
                "you kept PEER's GELU on the pre-value scores; UltraMemV2's Eq. 15 has no activation there."),
        Mistake("no_residual", _block_no_residual,
                "you returned FFN + memory without the residual h: x_{l+1} = h + FFN(xbar) + Mem(xbar)."),
    ],
    alternatives=[Alternative("default_rms_norm_eps", _block_default_eps,
                              "F.rms_norm's default eps (machine epsilon) instead of the stated 1e-6 is accepted")],
    rtol=1e-6, atol=1e-9,
    spec="h [B, T, d], g [d], w_gate, w_up [f, d], w_down [d, f], rows [B, T, m] int64, scores [B, T, m], "
         "w_pre [Dp, d], pre_values [N, Dp], values [N, Dv], w_v [d, Dv] (float64) -> [B, T, d] float64, "
         "h + SwiGLU(xbar) + W_v sum_i (<P[rows_i], W_pre xbar> s_i) V[rows_i], xbar = h * rsqrt(mean(h^2) "
         "+ 1e-6) * g.",
    outputs=("x_{l+1}",),
    fingerprints=(r"silu\(\s*\w+\s*@\s*w_gate",),
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


def _schedule(steps, total, warmup, base_lr, start, floor=0.1, cosine_from_warmup=True):
    s = steps.double()
    if cosine_from_warmup:
        progress = ((s - warmup) / max(1, total - warmup)).clamp(0, 1)
    else:
        progress = (s / total).clamp(0, 1)
    cosine = base_lr * (floor + (1 - floor) * 0.5 * (1 + torch.cos(torch.pi * progress)))
    lr = torch.where(s < warmup, base_lr * (s + 1) / warmup, cosine)
    return lr, lr * (1 + (start - 1) * (1 - s / total).clamp(min=0))


def _schedule_no_warmup(steps, total, warmup, base_lr, start):
    return _schedule(steps, total, 0, base_lr, start)


def _schedule_constant_multiplier(steps, total, warmup, base_lr, start):
    lr, _ = _schedule(steps, total, warmup, base_lr, start)
    return lr, lr * start


def _schedule_cosine_to_zero(steps, total, warmup, base_lr, start):
    return _schedule(steps, total, warmup, base_lr, start, floor=0.0)


def _schedule_progress_over_total(steps, total, warmup, base_lr, start):
    return _schedule(steps, total, warmup, base_lr, start, cosine_from_warmup=False)


register(
    "nb06_lr_schedule", _schedule_reference, _schedule_inputs,
    notebook="06", fn_name="my_lr_schedule",
    goal="Vectorise the two learning-rate schedules: warmup + cosine for all weights, a decaying multiplier for the values.",
    mistakes=[
        Mistake("no_warmup", _schedule_no_warmup,
                "your schedule starts at the full rate; for t < warmup the rate rises linearly, base_lr * "
                "(t + 1) / warmup."),
        Mistake("constant_multiplier", _schedule_constant_multiplier,
                "you multiplied the value rate by tau at every step; UltraMem's multiplier decays "
                "linearly from tau to 1 at step total: 1 + (tau - 1) * max(0, 1 - t / total)."),
        Mistake("cosine_to_zero", _schedule_cosine_to_zero,
                "your cosine decays to 0; it ends at 0.1 x base_lr (floor 0.1)."),
        Mistake("cosine_progress_over_total", _schedule_progress_over_total,
                "your cosine's progress is t / total; it starts after the warmup: "
                "p = (t - warmup) / (total - warmup), clamped to [0, 1]."),
        uses_package(_schedule_reference, cosine_lr, value_lr_multiplier,
                     instead="write both with tensor operations (torch.where, clamp, torch.cos)."),
    ],
    rtol=1e-9, atol=0.0,
    spec="steps [S] int64, total, warmup ints, base_lr, start floats -> (lr [S], value_lr [S]) float64 "
         "(float32 accepted): lr = base_lr (t+1)/warmup for t < warmup, else base_lr (0.1 + 0.9 * 0.5 (1 + "
         "cos(pi p))) with p = clamp((t - warmup) / (total - warmup), 0, 1); value_lr = lr (1 + (start - 1) "
         "max(0, 1 - t / total)).",
    outputs=("lr", "value_lr"),
    fingerprints=(r"torch\.cos\(",),
)
