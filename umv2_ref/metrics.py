"""Slot-usage and retrieval statistics for memory layers (PKM Sec. "dead keys"; docs/references.md Secs. 2.3, 7.7).

Public API:

* :func:`slot_counts` -- per-slot access counts (or score mass) from the indices a layer returned;
* :func:`usage_fraction`, :func:`dead_slots`, :func:`kl_to_uniform` -- summaries of a count vector;
* :func:`uniform_usage_baseline` -- expected usage under uniformly random access (sanity line for plots);
* :func:`score_means` -- mean top-1 and mean top-m score (what the official code logs);
* :func:`tucker_singular_values` -- spectrum of ``sum_c C_c`` (lambda_1 vs lambda_2 drives prefilter quality);
* :func:`rank1_recall` -- fraction of the exact top-m that the rank-1 prefilter finds;
* :class:`UsageTracker` -- accumulates counts over a training or evaluation loop.

``indices`` are whatever :class:`~umv2_ref.layers.MemoryOutput` carries (physical value rows) and
``n_slots`` is the size of the table they index.  Weighted statistics use the absolute score mass:
a slot's weight is ``|sum over cores of its score|`` (PKM's softmax weights are already positive).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .checks import require_float, require_indices_in_range, require_int, require_positive_int, require_tensor
from .retrieval import rank1_factors, tucker_topk


def _slot_scores(indices: Tensor, weights: Tensor) -> Tensor:
    """``[..., S]`` slot scores from ``[..., S]`` or per-core ``[..., S, c]`` scores (summed over cores)."""
    require_tensor("indices", indices)
    require_tensor("weights", weights)
    require_float("weights", weights)
    if weights.shape == indices.shape:
        return weights
    if weights.dim() == indices.dim() + 1 and weights.shape[:-1] == indices.shape:
        return weights.sum(-1)
    raise ValueError(
        f"weights must have shape [..., S] or [..., S, c] matching indices {tuple(indices.shape)}; "
        f"got {tuple(weights.shape)}"
    )


def slot_counts(indices: Tensor, n_slots: int, weights: Tensor | None = None) -> Tensor:
    """Per-slot totals ``[n_slots]`` (float64): access counts, or absolute score mass ``|sum_c s|`` with ``weights``.

    XLM's evaluator: ``u'_i`` = number of accesses, ``z'_i = sum_x w_i(x)`` (docs/references.md Sec. 2.3).
    """
    require_tensor("indices", indices)
    require_int("indices", indices)
    require_positive_int("n_slots", n_slots)
    require_indices_in_range("indices", indices, n_slots, "the slot table")
    flat = indices.reshape(-1)
    mass = torch.ones(flat.shape, dtype=torch.float64, device=indices.device)
    if weights is not None:
        mass = _slot_scores(indices, weights).detach().abs().reshape(-1).to(torch.float64)
    return torch.zeros(n_slots, dtype=torch.float64, device=indices.device).index_add_(0, flat, mass)


def usage_fraction(counts: Tensor) -> float:
    """Fraction of slots read at least once, ``#{i: z_i > 0} / N``."""
    return (counts > 0).double().mean().item()


def dead_slots(counts: Tensor) -> int:
    """Number of slots never read (their values get no gradient)."""
    return int((counts == 0).sum())


def kl_to_uniform(counts: Tensor) -> float:
    """``KL(z || uniform) = log N + sum_i z_i log z_i`` with ``z = counts / sum(counts)`` and ``0 log 0 = 0``.

    0 for perfectly uniform use; ``log(1/f)`` when a fraction f of the slots is used uniformly
    (docs/references.md Sec. 7.7).
    """
    total = counts.sum()
    if total <= 0:
        raise ValueError("counts must have a positive sum (no slot was read)")
    z = counts.double() / total
    nz = z[z > 0]
    return math.log(counts.numel()) + (nz * nz.log()).sum().item()


def uniform_usage_baseline(n_lookups: int, n_slots: int) -> float:
    """Expected usage under uniformly random access: ``1 - (1 - 1/N)^A`` (docs/references.md Sec. 7.7)."""
    return 1.0 - (1.0 - 1.0 / n_slots) ** n_lookups


def score_means(scores: Tensor, indices: Tensor) -> dict[str, float]:
    """Mean best score and mean score over the selected slots (what the official code logs).

    ``scores`` ``[..., S]`` or per-core ``[..., S, c]`` (summed over cores), ``indices`` ``[..., S]``
    as in :class:`~umv2_ref.layers.MemoryOutput`; ``top1`` is the mean over tokens of the largest one.
    """
    total = _slot_scores(indices, scores).detach()  # [..., S]
    return {"top1": total.max(-1).values.mean().item(), "topm": total.mean().item()}


def tucker_singular_values(cores: Tensor) -> Tensor:
    """Singular values (descending, float64) of ``sum_c C_c``; UltraMemV2 reports lambda_1 > 4 lambda_2 in training."""
    require_tensor("cores", cores)
    return torch.linalg.svdvals(cores.detach().to(torch.float64).sum(0))


def rank1_recall(
    s_row: Tensor,
    s_col: Tensor,
    cores: Tensor,
    m: int,
    *,
    k: int | None = None,
    rank1: tuple[Tensor, Tensor] | None = None,
    positive_only: bool = False,
    quadrants: int = 1,
) -> float:
    """Fraction of the exact top-m slots that the rank-1 prefilter also returns, averaged over tokens.

    Runs :func:`~umv2_ref.retrieval.tucker_topk` both ways (``exact=True`` and the prefilter with
    ``k`` candidates per axis, factors ``rank1`` and ``quadrants`` sign quadrants).  With ``positive_only`` the exact top-m is
    restricted to pairs whose rank-1 factors ``s_row @ u`` and ``s_col @ v`` are both positive (the
    only pairs the prefilter can propose, docs/references.md Sec. 5.4); tokens with no such pair are skipped.
    """
    n = s_row.shape[-2]
    _, exact = tucker_topk(s_row, s_col, cores, m, exact=True)  # [..., m]
    _, approx = tucker_topk(s_row, s_col, cores, m, k=k, rank1=rank1, quadrants=quadrants)  # [..., m]
    hit = (exact[..., :, None] == approx[..., None, :]).any(-1)  # [..., m]
    if not positive_only:
        return hit.double().mean().item()
    u, v = rank1_factors(cores) if rank1 is None else rank1
    a = (s_row @ u.to(s_row.dtype)).gather(-1, exact // n)  # [..., m]
    b = (s_col @ v.to(s_col.dtype)).gather(-1, exact % n)  # [..., m]
    pos = (a > 0) & (b > 0)  # [..., m]
    if not pos.any():
        raise ValueError("no exact top-m pair has two positive rank-1 factors; positive-only recall is undefined")
    return (hit & pos).double().sum().item() / pos.double().sum().item()


class UsageTracker:
    """Accumulates slot counts over many batches (training loops, evaluation sweeps).

    ``update(indices, weights=None)`` adds one batch; ``counts`` (accesses) and ``mass`` (absolute
    score mass, when weights were given) are float64 ``[n_slots]`` tensors for heatmaps;
    ``summary()`` returns the scalar statistics; ``reset()`` starts over.
    """

    def __init__(self, n_slots: int):
        self.n_slots = require_positive_int("n_slots", n_slots)
        self.reset()

    def reset(self) -> None:
        self.counts = torch.zeros(self.n_slots, dtype=torch.float64)
        self.mass = torch.zeros(self.n_slots, dtype=torch.float64)
        self.lookups = 0

    def update(self, indices: Tensor, weights: Tensor | None = None) -> None:
        """Add the slots of one batch (``MemoryOutput.indices``, optionally ``MemoryOutput.scores``)."""
        self.counts += slot_counts(indices, self.n_slots).cpu()
        if weights is not None:
            self.mass += slot_counts(indices, self.n_slots, weights).cpu()
        self.lookups += indices.numel()

    def summary(self) -> dict[str, float]:
        """``usage``, ``dead``, ``kl`` (unweighted), ``kl_weighted`` (if weights were seen), ``lookups``,
        and ``uniform_usage`` (what uniformly random access would have covered with as many lookups)."""
        if self.lookups == 0:
            raise ValueError("UsageTracker.summary() needs at least one update()")
        out = {
            "usage": usage_fraction(self.counts),
            "dead": float(dead_slots(self.counts)),
            "kl": kl_to_uniform(self.counts),
            "lookups": float(self.lookups),
            "uniform_usage": uniform_usage_baseline(self.lookups, self.n_slots),
        }
        if self.mass.sum() > 0:
            out["kl_weighted"] = kl_to_uniform(self.mass)
        return out
