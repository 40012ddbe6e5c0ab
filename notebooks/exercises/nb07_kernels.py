"""Exercises of notebook 07 (Triton kernels for the hot paths).

* ``nb07_masked_lanes``: how many programs a block layout launches and how many lanes its masks switch off.
* ``nb07_gather_kernel``: a Triton kernel (and its launcher) for the PKM bag's *weight gradient*
  ``dw[t, k] = <g[t], table[idx[t, k]]>``: a gather and a reduction in one program.  The learner's
  launcher runs in a forked child process, so an out-of-bounds access reports "crashed".
* ``nb07_sorted_table_grad``: the deterministic table gradient by stable sort + segment sums, with
  atomic-style accumulation refused.
* ``nb07_roofline_time``: the roofline lower bound on the fused ``peer_values`` forward's run time.

The known-wrong variants are plain torch (nothing here imports triton): they reproduce the classic
kernel bugs -- an unwritten tail block, a loop that stops after the first slot, a weight in the wrong
place -- and the method mistakes (no Triton kernel, atomics, no sort).
"""
from __future__ import annotations

import torch

from umv2_ref.exercises.harness import Mistake, Rule, register

from . import draw, pick

# ----------------------------------------------------------------------------------------------
# nb07_masked_lanes
# ----------------------------------------------------------------------------------------------


def _lanes_inputs(gen: torch.Generator):
    block_t = pick(gen, 2, 4, 8, 16)
    T = draw(gen, 1, 100)
    if T % block_t == 0:
        T += 1  # always a partial last block
    D = draw(gen, 3, 130)
    block_d = 1 << (D - 1).bit_length()  # next power of two >= D
    return T, D, block_t, block_d


def _lanes_reference(T, D, block_t, block_d):
    programs = -(-T // block_t)  # cdiv
    return programs, programs * block_t * block_d - T * D


def _lanes_floor(T, D, block_t, block_d):
    programs = T // block_t
    return programs, programs * block_t * block_d - T * D


def _lanes_no_column_padding(T, D, block_t, block_d):
    programs = -(-T // block_t)
    return programs, (programs * block_t - T) * D


def _lanes_tail_rows_only(T, D, block_t, block_d):
    programs = -(-T // block_t)
    return programs, (programs * block_t - T) * block_d


register(
    "nb07_masked_lanes", _lanes_reference, _lanes_inputs,
    notebook="07", fn_name="masked_lanes",
    goal="Count what a block layout launches: cdiv programs, and the lanes the two masks must switch off.",
    mistakes=[
        Mistake("floor_division", _lanes_floor,
                "T // BLOCK_T programs leave the last partial block of tokens unprocessed; launch "
                "cdiv(T, BLOCK_T) = (T + BLOCK_T - 1) // BLOCK_T programs and mask the tail."),
        Mistake("no_column_padding", _lanes_no_column_padding,
                "you counted only the idle token rows of the last block, at width D; every program's tile is "
                "BLOCK_D wide, so the columns d >= D are masked in *every* row."),
        Mistake("tail_rows_only", _lanes_tail_rows_only,
                "you counted the idle rows of the last block but not the padded columns d >= D of the "
                "T real rows; idle lanes = programs * BLOCK_T * BLOCK_D - T * D."),
    ],
    spec="T, D, block_t, block_d ints (block_d = next power of two >= D) -> (programs int, idle lanes int): "
         "the programs launched and the lanes (token, channel) of their tiles that the masks switch off.",
    outputs=("programs", "idle lanes"),
    rtol=0.0, atol=0.0,
    fingerprints=(r"\*\s*block_t\s*\*\s*block_d\s*-\s*T\s*\*\s*D",),
)


# ----------------------------------------------------------------------------------------------
# nb07_gather_kernel: the bag's weight gradient
# ----------------------------------------------------------------------------------------------


def _dw_inputs(gen: torch.Generator):
    """(table [N, D], idx [T, k] with repeats, g [T, D]); T odd: always a partial last block."""
    t = draw(gen, 5, 22) | 1
    k, n_rows, d = draw(gen, 2, 5), draw(gen, 4, 11), draw(gen, 3, 12)
    table = torch.randn(n_rows, d, generator=gen)
    idx = torch.randint(0, n_rows, (t, k), generator=gen)
    return table, idx, torch.randn(t, d, generator=gen)


def _dw_reference(table, idx, g):
    return torch.einsum("tkd,td->tk", table[idx], g)  # [T, k]


def _dw_unmasked_tail(table, idx, g):
    out = torch.zeros(idx.shape)
    full = idx.shape[0] // 4 * 4  # T // 4 programs of 4 tokens: the last partial block is never written
    out[:full] = _dw_reference(table, idx[:full], g[:full])
    return out


def _dw_first_slot_only(table, idx, g):
    out = torch.zeros(idx.shape)
    out[:, 0] = _dw_reference(table, idx[:, :1], g)[:, 0]
    return out


def _dw_row_sums(table, idx, g):
    return table[idx].sum(-1) * g.sum(-1, keepdim=True)


def _dw_plain_torch(table, idx, g):
    return _dw_reference(table, idx, g)


register(
    "nb07_gather_kernel", _dw_reference, _dw_inputs,
    notebook="07", fn_name="my_weight_grad",
    goal="Write a Triton kernel that gathers rows by loaded indices and reduces them, with both masks right.",
    mistakes=[
        Mistake("unwritten_tail_block", _dw_unmasked_tail,
                "the last, partial block of tokens was never written: launch cdiv(T, BLOCK_T) programs and "
                "mask the tail with t < T (for the loads *and* the store)."),
        Mistake("first_slot_only", _dw_first_slot_only,
                "only slot 0 of each token was computed: the slot loop must run over all k."),
        Mistake("reduce_before_product", _dw_row_sums,
                "you summed the row and the gradient separately and multiplied the sums; dw[t, k] is the dot "
                "product sum_d g[t, d] * V[idx[t, k], d]: multiply elementwise, then tl.sum over d."),
        Mistake("no_triton_kernel", _dw_plain_torch,
                "right values, but computed with torch ops: the exercise is to launch a Triton kernel you write.",
                Rule("needs_triton", "launch a Triton kernel")),
    ],
    spec="table [N, D] float32, idx [T, k] int64, g [T, D] float32 -> dw [T, k] float32 on the CPU, "
         "dw[t, k] = sum_d g[t, d] * table[idx[t, k], d], computed by a Triton kernel.",
    outputs=("dw",),
    atol=1e-5,
    isolate=True,
    crash_hint="an invalid memory access usually means a load or store without its mask: guard the token "
               "tail (t < T) and the padded columns (d < D) in every tl.load and tl.store, and check the "
               "row stride (D, not BLOCK_D).",
    fingerprints=(r"tl\.sum\(\s*\w+\s*\*\s*\w+\s*,\s*axis\s*=\s*1\s*\)",),
    # the worked bag_kernel above the exercise is the intended template (program ids, masks, the slot
    # loop, the gather: ~88% of the kernel's tokens); the new parts -- the product with g, the reduction over
    # channels, the per-slot store -- are not, and copying bag_kernel verbatim (100%) still counts as a leak
    max_copied=0.95,
)


# ----------------------------------------------------------------------------------------------
# nb07_sorted_table_grad
# ----------------------------------------------------------------------------------------------


def _grad_inputs(gen: torch.Generator):
    t, k, n_rows, d = draw(gen, 5, 22) | 1, draw(gen, 2, 5), draw(gen, 4, 11), draw(gen, 3, 12)
    idx = torch.randint(0, n_rows, (t, k), generator=gen)  # small N: duplicates within and across tokens
    return n_rows, idx, torch.randn(t, k, generator=gen), torch.randn(t, d, generator=gen)


def _grad_reference(n_rows, idx, w, g):
    contrib = (w[..., None] * g[:, None, :]).flatten(0, 1)  # [T*k, D]
    return torch.zeros(n_rows, g.shape[1]).index_add_(0, idx.flatten(), contrib)  # [N, D]


def _grad_overwrites(n_rows, idx, w, g):
    out = torch.zeros(n_rows, g.shape[1])
    out[idx.flatten()] = (w[..., None] * g[:, None, :]).flatten(0, 1)
    return out


def _grad_once_per_token(n_rows, idx, w, g):
    out = torch.zeros(n_rows, g.shape[1])
    for t in range(idx.shape[0]):
        seen = set()
        for k in range(idx.shape[1]):
            row = int(idx[t, k])
            if row not in seen:
                seen.add(row)
                out[row] += w[t, k] * g[t]
    return out


def _grad_sorted_then_atomic(n_rows, idx, w, g):
    rows, order = idx.flatten().sort(stable=True)
    contrib = w.flatten()[order, None] * g[order // idx.shape[1]]
    return torch.zeros(n_rows, g.shape[1]).index_add_(0, rows, contrib)


def _grad_unstable_sort(n_rows, idx, w, g):
    rows, order = idx.flatten().sort()  # not stable: equal rows in an unspecified order
    contrib = w.flatten()[order, None] * g[order // idx.shape[1]]
    bounds = torch.searchsorted(rows, torch.arange(n_rows + 1)).tolist()
    return torch.stack([contrib[s:e].sum(0) for s, e in zip(bounds[:-1], bounds[1:])])


_ATOMIC_OPS = frozenset({"index_add", "index_add_", "scatter_add", "scatter_add_", "scatter_reduce",
                         "scatter_reduce_", "index_reduce", "index_reduce_", "index_put_accumulate",
                         "embedding_dense_backward", "_embedding_bag_backward"})

register(
    "nb07_sorted_table_grad", _grad_reference, _grad_inputs,
    notebook="07", fn_name="sorted_table_grad",
    goal="Turn 'many programs add into the same row' into a fixed-order segment sum: sort, find segments, sum.",
    mistakes=[
        Mistake("overwrites_duplicates", _grad_overwrites,
                "dV[idx] = contrib is a scatter: with duplicate rows only one write survives. Every pair "
                "that read a row must be added."),
        Mistake("once_per_token", _grad_once_per_token,
                "you added each row at most once per token; a token that reads a row twice contributes twice."),
        Mistake("atomic_accumulation", _grad_sorted_then_atomic,
                "right values, but the sum goes through index_add_/scatter_add_/index_put_(accumulate=True), "
                "i.e. atomics on a GPU, whose order varies from run to run. Sum each row's contiguous segment "
                "of the sorted pairs instead (torch.searchsorted for the bounds, then slices or a cumsum).",
                Rule("no_ops", "no atomic-style accumulation (index_add_, scatter_add_, index_put_(accumulate="
                     "True), ...)", ops=_ATOMIC_OPS)),
        Mistake("no_stable_sort", _grad_unstable_sort,
                "right values, but without a *stable* sort of the (token, slot) pairs by row "
                "(torch.sort(..., stable=True)): an unstable sort -- or none, e.g. a dense one-hot product -- "
                "leaves the order in which a row's contributions are added unspecified, and the point of "
                "this algorithm is a fixed order (bitwise reproducible sums).",
                Rule("needs_ops", "stable-sort the flattened indices (sort or argsort with stable=True)",
                     ops=frozenset({"sort_stable"}))),
    ],
    spec="n_rows N int, idx [T, k] int64, w [T, k] float32, g [T, D] float32 -> dV [N, D] float32, dV[i] = sum "
         "over (t, k) with idx[t, k] == i of w[t, k] * g[t]; by stable sort + segment sums, no atomics.",
    outputs=("dV",),
    rtol=1e-5, atol=1e-5,
    fingerprints=(r"searchsorted\([^)]*right=True", r"cumsum\("),
)


# ----------------------------------------------------------------------------------------------
# nb07_roofline_time
# ----------------------------------------------------------------------------------------------


def _fused_bytes(T, m, d_pre, d_value, cores, elt):
    """Section 1's model of the fused forward: each selected row read once, z written once."""
    return T * d_pre * elt + T * m * 8 + T * m * cores * elt + T * m * (d_pre + d_value) * elt + T * d_value * elt


def _flops(T, m, d_pre, d_value, cores):
    return 2 * T * m * (d_pre + d_value) + T * m * cores  # dot + pooling multiply-adds, score multiplies


def _roofline_inputs(gen: torch.Generator, trial: int = 0):
    T, m = pick(gen, 1024, 4096, 16384), pick(gen, 16, 32, 128)
    d_pre, d_value, cores, elt = pick(gen, 64, 128, 256), pick(gen, 128, 192, 256), pick(gen, 1, 2, 4), pick(gen, 2, 4)
    bandwidth = pick(gen, 1.0e12, 3.35e12, 4.8e12)  # bytes / s
    # trial 0 memory-bound, trial 1 strongly compute-bound (a factor 2 in the FLOPs still shows), then any
    flops_per_s = (1.0e15, 1.0e11)[trial] if trial < 2 else pick(gen, 2.0e12, 6.0e13, 2.0e14)
    return T, m, d_pre, d_value, cores, elt, bandwidth, flops_per_s


def _roofline_reference(T, m, d_pre, d_value, cores, elt, bandwidth, flops_per_s):
    return max(_fused_bytes(T, m, d_pre, d_value, cores, elt) / bandwidth,
               _flops(T, m, d_pre, d_value, cores) / flops_per_s)


def _roofline_bytes_only(T, m, d_pre, d_value, cores, elt, bandwidth, flops_per_s):
    return _fused_bytes(T, m, d_pre, d_value, cores, elt) / bandwidth


def _roofline_macs(T, m, d_pre, d_value, cores, elt, bandwidth, flops_per_s):
    return max(_fused_bytes(T, m, d_pre, d_value, cores, elt) / bandwidth,
               (T * m * (d_pre + d_value) + T * m * cores) / flops_per_s)


def _roofline_sum(T, m, d_pre, d_value, cores, elt, bandwidth, flops_per_s):
    return (_fused_bytes(T, m, d_pre, d_value, cores, elt) / bandwidth
            + _flops(T, m, d_pre, d_value, cores) / flops_per_s)


def _roofline_naive_bytes(T, m, d_pre, d_value, cores, elt, bandwidth, flops_per_s):
    naive = _fused_bytes(T, m, d_pre, d_value, cores, elt) + 2 * T * m * (d_pre + d_value) * elt + T * m * 8
    return max(naive / bandwidth, _flops(T, m, d_pre, d_value, cores) / flops_per_s)


register(
    "nb07_roofline_time", _roofline_reference, _roofline_inputs,
    notebook="07", fn_name="roofline_time",
    goal="Bound a kernel's run time from below by its bytes and its FLOPs: the roofline model.",
    mistakes=[
        Mistake("bytes_only", _roofline_bytes_only,
                "you ignored the arithmetic: when the FLOP rate is low the kernel is compute-bound and the "
                "bound is FLOPs / flops_per_s. Take the larger of the two times."),
        Mistake("macs_not_flops", _roofline_macs,
                "you counted one FLOP per multiply-add; a multiply-add is 2 FLOPs (the weighting a_i * s_i is "
                "a lone multiply: 1)."),
        Mistake("sum_not_max", _roofline_sum,
                "you added the memory time and the compute time; a kernel overlaps loads and arithmetic, so "
                "the roofline bound is their maximum."),
        Mistake("naive_traffic", _roofline_naive_bytes,
                "you used the naive PyTorch version's traffic (gathers written and read back); the fused "
                "kernel reads each selected row once and writes only z."),
    ],
    spec="T, m, d_pre, d_value, cores, elt ints, bandwidth (bytes/s), flops_per_s floats -> float seconds: "
         "max(fused bytes / bandwidth, FLOPs / flops_per_s), bytes as fused_forward_parts, FLOPs = 2 per "
         "multiply-add (pre-score dots and pooling) + 1 per multiply (a_i * s_i per core).",
    outputs=("seconds",),
    rtol=1e-9, atol=0.0,
    fingerprints=(r"max\(\s*sum\(", r"/\s*bandwidth\s*,\s*\w+\s*/\s*flops_per_s"),
)
