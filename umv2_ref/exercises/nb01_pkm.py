"""Exercises of notebook 01 (product-key memory).

* ``nb01_product_key_topk``: the exact two-stage product-key top-k (PKM Sec. 3.2).
* ``nb01_usage_metrics``: memory usage and KL to uniform of a batch of selections (docs/references.md Sec. 2.3).
"""
from __future__ import annotations

import math

import torch

from ..retrieval import product_key_topk
from .harness import register

# ----------------------------------------------------------------------------------------------
# nb01_product_key_topk
# ----------------------------------------------------------------------------------------------


def _topk_inputs(gen: torch.Generator):
    """(s_row [B, n], s_col [B, n], k) with continuous scores (no ties)."""
    b = int(torch.randint(1, 5, (), generator=gen))
    n = int(torch.randint(4, 13, (), generator=gen))
    k = int(torch.randint(2, n + 1, (), generator=gen))
    return torch.randn(b, n, generator=gen), torch.randn(b, n, generator=gen), k


def _topk_reference(s_row, s_col, k):
    return product_key_topk(s_row, s_col, k)


def _topk_diagonal_pairs(s_row, s_col, k):
    """Pairs the r-th best row with the r-th best column: k candidates instead of k x k."""
    top_r, idx_r = s_row.topk(k, dim=-1)
    top_c, idx_c = s_col.topk(k, dim=-1)
    return top_r + top_c, idx_r * s_row.shape[-1] + idx_c


def _topk_candidate_index(s_row, s_col, k):
    """Returns the position in the k x k candidate block instead of the slot id i * n + j."""
    top_r, _ = s_row.topk(k, dim=-1)
    top_c, _ = s_col.topk(k, dim=-1)
    return (top_r[..., :, None] + top_c[..., None, :]).flatten(-2).topk(k, dim=-1)


def _topk_transposed(s_row, s_col, k):
    """Flattens column-major (j * n + i) instead of the row-major slot id i * n + j."""
    scores, idx = product_key_topk(s_row, s_col, k)
    n = s_row.shape[-1]
    return scores, (idx % n) * n + idx // n


register(
    "nb01_product_key_topk",
    _topk_reference,
    _topk_inputs,
    wrong=[_topk_diagonal_pairs, _topk_candidate_index, _topk_transposed],
    description="Exact top-k of the grid s_row[i] + s_col[j]. Args s_row, s_col [B, n], k; returns "
    "(scores [B, k] descending, slot ids [B, k] = i * n + j).",
)


# ----------------------------------------------------------------------------------------------
# nb01_usage_metrics
# ----------------------------------------------------------------------------------------------


def _usage_inputs(gen: torch.Generator):
    """(indices [T, k] drawn from a skewed distribution so some slots stay dead, N)."""
    n_slots = int(torch.randint(16, 65, (), generator=gen))
    t = int(torch.randint(5, 40, (), generator=gen))
    k = int(torch.randint(1, 5, (), generator=gen))
    skew = torch.rand(n_slots, generator=gen) ** 4
    indices = torch.multinomial(skew / skew.sum(), t * k, replacement=True, generator=gen).view(t, k)
    return indices, n_slots


def _usage_reference(indices, n_slots):
    counts = torch.bincount(indices.reshape(-1), minlength=n_slots).double()  # [N]
    z = counts / counts.sum()
    nz = z[z > 0]
    return torch.stack([(counts > 0).double().mean(), math.log(n_slots) + (nz * nz.log()).sum()])


def _usage_per_selection(indices, n_slots):
    """Divides the number of used slots by the number of selections T*k instead of by N."""
    counts = torch.bincount(indices.reshape(-1), minlength=n_slots).double()
    z = counts / counts.sum()
    nz = z[z > 0]
    return torch.stack([(counts > 0).sum() / indices.numel(), math.log(n_slots) + (nz * nz.log()).sum()])


def _usage_entropy_only(indices, n_slots):
    """Returns the entropy -sum z log z instead of the KL log N + sum z log z."""
    counts = torch.bincount(indices.reshape(-1), minlength=n_slots).double()
    z = counts / counts.sum()
    nz = z[z > 0]
    return torch.stack([(counts > 0).double().mean(), -(nz * nz.log()).sum()])


def _usage_unnormalised(indices, n_slots):
    """Uses raw counts in the KL instead of the distribution z = counts / sum(counts)."""
    counts = torch.bincount(indices.reshape(-1), minlength=n_slots).double()
    nz = counts[counts > 0]
    return torch.stack([(counts > 0).double().mean(), math.log(n_slots) + (nz * nz.log()).sum()])


register(
    "nb01_usage_metrics",
    _usage_reference,
    _usage_inputs,
    wrong=[_usage_per_selection, _usage_entropy_only, _usage_unnormalised],
    description="Memory usage of selections indices [T, k] over N slots: returns a float64 tensor "
    "[fraction of slots used, KL(z || uniform)] with z the normalised access counts.",
)
