"""What a memory layer returns once it knows which slots to read: the value paths.

* PKM / Memory+: a score-weighted sum of value rows (EmbeddingBag semantics), PKM Sec. 3.
* PEER (arXiv 2407.04153): every slot is a one-neuron expert ``sigma(u_i . x) v_i``.
* UltraMemV2 (arXiv 2508.18756 Sec. 3.4, Eq. 15): "FFN values" without activation:
  ``a_i = <P[i], W_pre x>``, ``w_i = a_i * s_i``, ``z = sum_i w_i V[i]``, ``o = W_v z``.
* UltraMem implicit value expansion (IVE, arXiv 2411.12364; UltraMemV2 Eqs. 8-9): virtual slots
  map to (block, physical row); each block has its own projector; UltraMemV2 Eq. 12 shares one.
* Multi-core scoring (UltraMem Eqs. 16-17): with scores ``[..., m, c]`` core c weights channel
  slice c of each value row (``D_v`` divisible by c).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .checks import (
    require_float,
    require_indices_in_range,
    require_int,
    require_min_ndim,
    require_ndim,
    require_same,
    require_tensor,
)

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}


def get_activation(activation: str | None) -> Callable[[Tensor], Tensor] | None:
    """``None`` (UltraMemV2 default, Eq. 15) or one of ``ACTIVATIONS``."""
    if activation is None:
        return None
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be None or one of {sorted(ACTIVATIONS)}, got {activation!r}")
    return ACTIVATIONS[activation]


def check_lookup(table: Tensor, indices: Tensor, weights: Tensor, table_name: str = "table") -> int:
    """Validate a (table, indices, weights) triple; returns the number of weight channels c.

    table ``[N, D]``; indices ``[..., m]``; weights ``[..., m]`` or ``[..., m, c]`` with D % c == 0.
    Shared by the reference and the Triton kernels, so both refuse the same inputs.
    """
    for name, t in ((table_name, table), ("indices", indices), ("weights", weights)):
        require_tensor(name, t)
    require_float(table_name, table)
    require_float("weights", weights)
    require_int("indices", indices)
    require_ndim(table_name, table, 2, "[N, D]")
    require_min_ndim("indices", indices, 1, "[..., m]")
    require_same("device", **{table_name: table, "indices": indices, "weights": weights})
    require_same("dtype", **{table_name: table, "weights": weights})
    if weights.shape == indices.shape:
        c = 1
    elif weights.dim() == indices.dim() + 1 and weights.shape[:-1] == indices.shape:
        c = weights.shape[-1]
    else:
        raise ValueError(
            f"weights must have shape [..., m] or [..., m, c] matching indices {tuple(indices.shape)}; "
            f"got {tuple(weights.shape)}"
        )
    if c == 0:
        raise ValueError(f"weights [..., m, c] must have c >= 1 cores; got shape {tuple(weights.shape)}")
    if table.shape[1] % c:
        raise ValueError(f"{table_name} width D={table.shape[1]} must be divisible by the number of cores c={c}")
    require_indices_in_range("indices", indices, table.shape[0], table_name)
    return c


def check_peer_inputs(x_pre: Tensor, pre_table: Tensor, table: Tensor, indices: Tensor, scores: Tensor) -> int:
    """Validate ``peer_values``' inputs (shared with the Triton kernel); returns the number of cores c."""
    c = check_lookup(table, indices, scores)
    require_tensor("x_pre", x_pre)
    require_tensor("pre_table", pre_table)
    require_ndim("pre_table", pre_table, 2, "[N, D_p]")
    if pre_table.shape[0] != table.shape[0]:
        raise ValueError(f"pre_table and table must have the same rows N; got {pre_table.shape[0]} and {table.shape[0]}")
    if x_pre.shape != (*indices.shape[:-1], pre_table.shape[1]):
        raise ValueError(
            f"x_pre must have shape [..., D_p] = {(*indices.shape[:-1], pre_table.shape[1])}; got {tuple(x_pre.shape)}"
        )
    require_same("dtype", x_pre=x_pre, pre_table=pre_table, table=table)
    require_same("device", x_pre=x_pre, pre_table=pre_table, table=table)
    return c


def pool(rows: Tensor, weights: Tensor) -> Tensor:
    """``sum_m weights[..., m] * rows[..., m, :]``; with weights ``[..., m, c]`` core c weights slice c.

    rows ``[..., m, D]`` -> ``[..., D]``.  The pooling rule every value path computes, written as
    einsums over materialised rows: the definition the fast paths below are tested against.
    """
    if weights.dim() == rows.dim() - 1:
        return torch.einsum("...md,...m->...d", rows, weights)
    c = weights.shape[-1]
    sliced = rows.unflatten(-1, (c, rows.shape[-1] // c))  # [..., m, c, D/c]
    return torch.einsum("...mcd,...mc->...cd", sliced, weights).flatten(-2)  # [..., D]


def bag_sum(table: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
    """``pool(table[indices], weights)`` with PyTorch's fused gathers (inputs assumed valid, :func:`check_lookup`).

    One weight per slot: ``F.embedding_bag(mode="sum", per_sample_weights=...)``, the fused
    gather-and-sum (forward and backward).  With c cores (a weight per channel slice) embedding_bag
    would need one bag per (token, core) over the ``[N c, D/c]`` view of the table, which measured
    ~1.4x slower here (forward + backward, 1024 tokens, m=32, D=32, c=2, one CPU thread) than one
    ``index_select`` of the rows followed by a broadcast multiply-sum; the latter is used.
    """
    *lead, m = indices.shape
    D = table.shape[1]
    if m == 0 or not lead:  # no slots, or no batch dim: the definition (embedding_bag needs both)
        return pool(table[indices], weights)
    flat = indices.reshape(math.prod(lead), m)  # [B, m]
    if weights.dim() == indices.dim():  # one weight per slot
        out = F.embedding_bag(flat, table, per_sample_weights=weights.reshape(flat.shape), mode="sum")  # [B, D]
        return out.view(*lead, D)
    c = weights.shape[-1]
    rows = table.index_select(0, flat.reshape(-1)).view(*flat.shape, c, D // c)  # [B, m, c, D/c]
    out = (rows * weights.reshape(*flat.shape, c, 1)).sum(1)  # [B, c, D/c]
    return out.view(*lead, D)


def weighted_sum(table: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
    """PKM value read ``sum_k weights[..., k] * table[indices[..., k]]`` (EmbeddingBag 'sum').

    table ``[N, D]``, indices ``[..., k]``, weights ``[..., k]`` (or ``[..., k, c]`` for per-core
    channel slices) -> ``[..., D]``.  Duplicate indices contribute once per occurrence.
    What it computes: ``pool(table[indices], weights)``; computed by :func:`bag_sum`.
    """
    check_lookup(table, indices, weights)
    return bag_sum(table, indices, weights)  # [..., D]


def peer_values(
    x_pre: Tensor,
    pre_table: Tensor,
    table: Tensor,
    indices: Tensor,
    scores: Tensor,
    activation: str | None = None,
) -> Tensor:
    """PEER / UltraMemV2 "FFN values" (UltraMemV2 Eqs. 13-15; PEER Sec. 2).

    ``a_i = act(<pre_table[i], x_pre>)``, ``w_i = a_i * s_i``, ``z = sum_i w_i table[i]``.
    What it computes, in two einsums::

        a = act(einsum("...md,...d->...m", pre_table[indices], x_pre))
        z = pool(table[indices], a * scores)   # a[..., None] * scores with c cores

    Computed with a batched gather + dot for ``a`` (``index_select`` then a multiply-sum over
    ``D_p``, whose backward is an ``index_add``) and :func:`bag_sum` for ``z``.

    Args:
        x_pre: ``[..., D_p]`` pre-projected input ``W_pre x`` (PEER: x itself).
        pre_table: ``[N, D_p]`` pre-values P (PEER: the down vectors u_i).
        table: ``[N, D_v]`` values V (PEER: the up vectors v_i).
        indices: ``[..., m]`` selected rows.
        scores: ``[..., m]`` or ``[..., m, c]`` retrieval scores (core c weights channel slice c).
        activation: None (UltraMemV2 default) or 'gelu'/'relu'/'silu' (PEER uses GELU).

    Returns:
        ``[..., D_v]`` pooled values z (the caller applies ``W_v``).
    """
    act = get_activation(activation)
    check_peer_inputs(x_pre, pre_table, table, indices, scores)
    d_pre = pre_table.shape[1]
    rows = pre_table.index_select(0, indices.reshape(-1)).view(*indices.shape, d_pre)  # [..., m, D_p]
    pre = (rows * x_pre[..., None, :]).sum(-1)  # [..., m]
    if act is not None:
        pre = act(pre)
    w = pre[..., None] * scores if scores.dim() > pre.dim() else pre * scores  # [..., m(, c)]
    return bag_sum(table, indices, w)  # [..., D_v]


def expanded_lookup(table: Tensor, virtual: Tensor, scores: Tensor, shuffle: Tensor, blocks: int) -> Tensor:
    """UltraMem implicit value expansion: pooled value per virtual block (arXiv 2411.12364, IVE).

    The grid has ``blocks * N`` virtual slots over a physical table of N rows.  A fixed random
    permutation ``shuffle`` maps virtual slot v to ``pi(v)``; its block is ``pi(v) // N`` and its
    physical row ``pi(v) % N``.  Returns ``z[..., e, :] = sum_{k: block_k = e} s_k table[row_k]``,
    ``[..., blocks, D]``.  Several selected virtual slots can land on the same physical row (and
    block): their contributions are *summed* (a one-hot contraction, never a scatter that
    overwrites).  The caller projects each block with its own ``W_e`` (UltraMem) or sums the
    blocks and applies one shared projector (UltraMemV2 Eq. 12; identical to sharing W).

    table ``[N, D]``; virtual ``[..., m]``; scores ``[..., m]`` or ``[..., m, c]``; shuffle ``[blocks*N]``.
    """
    n_rows = table.shape[0]
    require_int("shuffle", shuffle)
    if shuffle.shape != (blocks * n_rows,):
        raise ValueError(f"shuffle must have shape [blocks * N] = [{blocks * n_rows}], got {tuple(shuffle.shape)}")
    require_indices_in_range("virtual", virtual, blocks * n_rows, "the virtual grid")
    physical = shuffle[virtual]  # [..., m]
    rows = physical % n_rows  # [..., m]
    onehot = F.one_hot(physical // n_rows, blocks).to(scores.dtype)  # [..., m, E]
    check_lookup(table, rows, scores)
    if scores.dim() == virtual.dim():
        w = onehot * scores[..., None]  # [..., m, E]
        return torch.einsum("...me,...md->...ed", w, table[rows])  # [..., E, D]
    c = scores.shape[-1]
    w = onehot[..., None] * scores[..., None, :]  # [..., m, E, c]
    sliced = table[rows].unflatten(-1, (c, table.shape[1] // c))  # [..., m, c, D/c]
    return torch.einsum("...mec,...mcd->...ecd", w, sliced).flatten(-2)  # [..., E, D]
