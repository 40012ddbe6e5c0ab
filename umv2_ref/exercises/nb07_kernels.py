"""Exercises of notebook 07 (Triton kernels for the hot paths).

* ``nb07_gather_kernel``: a Triton kernel (and its launcher) for the PKM value bag
  ``z[t] = sum_k w[t, k] table[idx[t, k]]``; the checker calls the launcher.
* ``nb07_sorted_table_grad``: the deterministic table gradient ``dV[i] = sum_{(t,k): idx=i} w g_t``
  by stable sort + segment sums (what ``_scatter_sorted_kernel`` does per block of rows).
* ``nb07_bytes_moved``: the bytes the fused ``peer_values`` forward must move.

The known-wrong variants are plain torch (``umv2_ref`` never imports triton): they reproduce the
classic kernel bugs -- an unmasked tail block, a loop that stops after the first slot, an
unweighted bag, a scatter that overwrites duplicate rows instead of adding them.
"""
from __future__ import annotations

import torch

from ..values import weighted_sum
from .harness import register


def _bag_inputs(gen: torch.Generator):
    """(table [N, D], idx [T, k] with repeats, w [T, k]); T is not a multiple of any block size."""
    t = int(torch.randint(5, 23, (), generator=gen)) | 1  # odd: always a partial last block
    k = int(torch.randint(2, 6, (), generator=gen))
    n_rows = int(torch.randint(4, 12, (), generator=gen))  # small N: duplicates within and across tokens
    d = int(torch.randint(3, 13, (), generator=gen))
    table = torch.randn(n_rows, d, generator=gen)
    idx = torch.randint(0, n_rows, (t, k), generator=gen)
    w = torch.randn(t, k, generator=gen)
    return table, idx, w


# ----------------------------------------------------------------------------------------------
# nb07_gather_kernel
# ----------------------------------------------------------------------------------------------


def _bag_reference(table, idx, w):
    return weighted_sum(table, idx, w)


def _bag_unmasked_tail(table, idx, w):
    """Launches T // 4 programs of 4 tokens: the last partial block is never written (zeros here)."""
    out = torch.zeros(idx.shape[0], table.shape[1])
    full = idx.shape[0] // 4 * 4
    out[:full] = weighted_sum(table, idx[:full], w[:full])
    return out


def _bag_first_slot_only(table, idx, w):
    """The slot loop stops after k = 0."""
    return w[:, :1] * table[idx[:, 0]]


def _bag_unweighted(table, idx, w):
    """Sums the gathered rows but forgets the weights."""
    return table[idx].sum(1)


register(
    "nb07_gather_kernel",
    _bag_reference,
    _bag_inputs,
    wrong=[_bag_unmasked_tail, _bag_first_slot_only, _bag_unweighted],
    atol=1e-5,
    description="Launcher of a Triton kernel computing z[t] = sum_k w[t, k] * table[idx[t, k]]. "
    "Args table [N, D], idx [T, k], w [T, k]; returns z [T, D].",
)


# ----------------------------------------------------------------------------------------------
# nb07_sorted_table_grad
# ----------------------------------------------------------------------------------------------


def _grad_inputs(gen: torch.Generator):
    table, idx, w = _bag_inputs(gen)
    g = torch.randn(idx.shape[0], table.shape[1], generator=gen)  # [T, D] upstream gradient
    return table.shape[0], idx, w, g


def _grad_reference(n_rows, idx, w, g):
    contrib = (w[..., None] * g[:, None, :]).flatten(0, 1)  # [T*k, D]
    return torch.zeros(n_rows, g.shape[1]).index_add_(0, idx.flatten(), contrib)  # [N, D]


def _grad_overwrites(n_rows, idx, w, g):
    """``dV[idx] = contrib``: with duplicate rows only one contribution survives."""
    out = torch.zeros(n_rows, g.shape[1])
    out[idx.flatten()] = (w[..., None] * g[:, None, :]).flatten(0, 1)
    return out


def _grad_once_per_token(n_rows, idx, w, g):
    """Adds each row at most once per token (drops a token's repeated reads of one row)."""
    out = torch.zeros(n_rows, g.shape[1])
    for t in range(idx.shape[0]):
        seen = set()
        for k in range(idx.shape[1]):
            row = int(idx[t, k])
            if row not in seen:
                seen.add(row)
                out[row] += w[t, k] * g[t]
    return out


register(
    "nb07_sorted_table_grad",
    _grad_reference,
    _grad_inputs,
    wrong=[_grad_overwrites, _grad_once_per_token],
    rtol=1e-5,
    atol=1e-5,
    description="dV[i] = sum over (t, k) with idx[t, k] == i of w[t, k] * g[t], by stable sort + "
    "segment sums. Args n_rows (int), idx [T, k], w [T, k], g [T, D]; returns dV [N, D].",
)


# ----------------------------------------------------------------------------------------------
# nb07_bytes_moved
# ----------------------------------------------------------------------------------------------


def fused_forward_bytes(T: int, m: int, d_pre: int, d_value: int, cores: int, elt: int) -> int:
    """Bytes the fused ``peer_values`` forward must move (int64 indices, no reuse of gathered rows).

    read x_pre ``T D_p``, indices ``T m`` (8 bytes), scores ``T m c``, the gathered rows
    ``T m (D_p + D_v)``; write z ``T D_v``.
    """
    return T * d_pre * elt + T * m * 8 + T * m * cores * elt + T * m * (d_pre + d_value) * elt + T * d_value * elt


def _bytes_inputs(gen: torch.Generator):
    pick = lambda *opts: opts[int(torch.randint(0, len(opts), (), generator=gen))]  # noqa: E731
    return pick(1024, 4096, 16384), pick(16, 32, 128), pick(64, 128, 256), pick(128, 192, 256), pick(1, 2, 4), pick(2, 4)


def _bytes_without_pre_rows(T, m, d_pre, d_value, cores, elt):
    """Forgets that every slot also gathers its pre-value row."""
    return fused_forward_bytes(T, m, d_pre, d_value, cores, elt) - T * m * d_pre * elt


def _bytes_indices_as_elements(T, m, d_pre, d_value, cores, elt):
    """Counts the indices at the float element size instead of 8 bytes (int64)."""
    return fused_forward_bytes(T, m, d_pre, d_value, cores, elt) - T * m * (8 - elt)


def _bytes_naive_intermediates(T, m, d_pre, d_value, cores, elt):
    """Adds the [T, m, D] gathers the naive version writes and reads back: not the fused kernel."""
    return fused_forward_bytes(T, m, d_pre, d_value, cores, elt) + 2 * T * m * (d_pre + d_value) * elt


register(
    "nb07_bytes_moved",
    fused_forward_bytes,
    _bytes_inputs,
    wrong=[_bytes_without_pre_rows, _bytes_indices_as_elements, _bytes_naive_intermediates],
    description="Bytes the fused peer_values forward must move. Args T, m, d_pre, d_value, cores, "
    "elt (bytes per element); indices are int64; returns an int.",
)
