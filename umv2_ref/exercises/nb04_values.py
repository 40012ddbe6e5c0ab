"""Exercises of notebook 04 (PEER and UltraMemV2 "FFN values").

* ``nb04_peer_expert``: PEER's layer output ``sum_i g_i gelu(u_i . x) v_i`` over selected experts.
* ``nb04_multicore_values``: UltraMemV2 pooled values with per-core channel slices (Eq. 15 + MCS).
* ``nb04_contribution_norms``: the norm of each selected slot's contribution to the pooled vector.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..values import peer_values
from .harness import register


def _lookup_inputs(gen: torch.Generator, d_pre: int, d_value: int, cores: int | None):
    """(x_pre [T, D_p], pre_table [N, D_p], table [N, D_v], indices [T, m], scores [T, m(, c)])."""
    t = int(torch.randint(2, 6, (), generator=gen))
    n_rows = int(torch.randint(12, 40, (), generator=gen))
    m = int(torch.randint(2, 7, (), generator=gen))
    x_pre = torch.randn(t, d_pre, generator=gen)
    pre_table = torch.randn(n_rows, d_pre, generator=gen) / d_pre**0.5
    table = torch.randn(n_rows, d_value, generator=gen)
    indices = torch.randint(0, n_rows, (t, m), generator=gen)
    shape = (t, m) if cores is None else (t, m, cores)
    scores = torch.rand(*shape, generator=gen) + 0.1
    return x_pre, pre_table, table, indices, scores


# ----------------------------------------------------------------------------------------------
# nb04_peer_expert
# ----------------------------------------------------------------------------------------------


def _peer_inputs(gen: torch.Generator):
    d = int(torch.randint(3, 9, (), generator=gen))
    x, u, v, idx, g = _lookup_inputs(gen, d, d, None)
    return x, u, v, idx, g.softmax(-1)


def _peer_reference(x, u, v, idx, g):
    return peer_values(x, u, v, idx, g, activation="gelu")


def _peer_no_activation(x, u, v, idx, g):
    """Forgets the expert's non-linearity (that is UltraMemV2's choice, not PEER's)."""
    return peer_values(x, u, v, idx, g, activation=None)


def _peer_activation_after_gate(x, u, v, idx, g):
    """Applies GELU to the gated pre-activation g_i * (u_i . x) instead of to u_i . x alone."""
    a = torch.einsum("tkd,td->tk", u[idx], x)
    return torch.einsum("tk,tkd->td", F.gelu(g * a), v[idx])


def _peer_ignores_router(x, u, v, idx, g):
    """Sums the selected experts without the router weights g_i."""
    return peer_values(x, u, v, idx, torch.ones_like(g), activation="gelu")


register(
    "nb04_peer_expert",
    _peer_reference,
    _peer_inputs,
    wrong=[_peer_no_activation, _peer_activation_after_gate, _peer_ignores_router],
    description="PEER: f(x) = sum_i g_i * gelu(u_i . x) * v_i over the selected experts. "
    "Args x [T, d], u [N, d], v [N, d], idx [T, k], g [T, k]; returns [T, d].",
)


# ----------------------------------------------------------------------------------------------
# nb04_multicore_values
# ----------------------------------------------------------------------------------------------


def _multicore_inputs(gen: torch.Generator):
    cores = (2, 4)[int(torch.randint(0, 2, (), generator=gen))]
    d_pre = int(torch.randint(2, 7, (), generator=gen))
    d_value = cores * int(torch.randint(2, 5, (), generator=gen))  # >= 2 channels per slice
    return _lookup_inputs(gen, d_pre, d_value, cores)


def _multicore_reference(x_pre, pre_table, table, indices, scores):
    return peer_values(x_pre, pre_table, table, indices, scores)


def _multicore_summed_cores(x_pre, pre_table, table, indices, scores):
    """Adds the core scores and weights the whole row: the ranking score, not the pooling rule."""
    return peer_values(x_pre, pre_table, table, indices, scores.sum(-1))


def _multicore_interleaved(x_pre, pre_table, table, indices, scores):
    """Gives channel j to core j % c (interleaved) instead of contiguous slices."""
    c = scores.shape[-1]
    a = torch.einsum("tmd,td->tm", pre_table[indices], x_pre)  # [T, m]
    rows = table[indices].unflatten(-1, (-1, c))  # [T, m, D_v/c, c]
    return torch.einsum("tmjc,tmc->tjc", rows, a[..., None] * scores).flatten(-2)


def _multicore_with_gelu(x_pre, pre_table, table, indices, scores):
    """Keeps PEER's activation on the pre-scores; UltraMemV2 Eq. 15 removes it."""
    return peer_values(x_pre, pre_table, table, indices, scores, activation="gelu")


register(
    "nb04_multicore_values",
    _multicore_reference,
    _multicore_inputs,
    wrong=[_multicore_summed_cores, _multicore_interleaved, _multicore_with_gelu],
    description="UltraMemV2 Eq. 15 with multi-core slices: a_i = <P[i], x_pre>, "
    "z[slice c] = sum_i a_i * s_i^(c) * V[i, slice c]. Args x_pre [T, D_p], pre_table [N, D_p], "
    "table [N, D_v], indices [T, m], scores [T, m, c]; returns z [T, D_v].",
)


# ----------------------------------------------------------------------------------------------
# nb04_contribution_norms
# ----------------------------------------------------------------------------------------------


def _contribution_reference(x_pre, pre_table, table, indices, scores):
    c = scores.shape[-1]
    a = torch.einsum("tmd,td->tm", pre_table[indices], x_pre)  # [T, m]
    w = a[..., None] * scores  # [T, m, c]
    rows = table[indices].unflatten(-1, (c, -1))  # [T, m, c, D_v/c]
    return (w[..., None] * rows).flatten(-2).norm(dim=-1)  # [T, m]


def _contribution_without_prescore(x_pre, pre_table, table, indices, scores):
    """Forgets the pre-score a_i: measures what the slot *could* add, not what it adds."""
    c = scores.shape[-1]
    rows = table[indices].unflatten(-1, (c, -1))
    return (scores[..., None] * rows).flatten(-2).norm(dim=-1)


def _contribution_mean_score(x_pre, pre_table, table, indices, scores):
    """Weights the whole row by the mean core score instead of weighting each slice by its core."""
    a = torch.einsum("tmd,td->tm", pre_table[indices], x_pre)
    return (a * scores.mean(-1)).abs() * table[indices].norm(dim=-1)


register(
    "nb04_contribution_norms",
    _contribution_reference,
    _multicore_inputs,
    wrong=[_contribution_without_prescore, _contribution_mean_score],
    description="Norm of slot i's contribution to z: || concat_c a_i s_i^(c) V[i, slice c] ||. "
    "Same arguments as nb04_multicore_values; returns [T, m].",
)
