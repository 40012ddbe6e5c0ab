"""Exercises of notebook 03 (value expansion: UltraMem IVE and UltraMemV2's shared projection).

* ``nb03_implicit_expansion``: UltraMem's ``o = sum_p W_p^T (V^T s_p)`` without building a virtual table.
* ``nb03_shared_projection``: UltraMemV2 Eq. 12, one projector ``W`` for every block.
* ``nb03_distinct_rows``: how many different physical rows a token's grid slots fold onto.
* ``nb03_v2_macs``: multiply-accumulates per token of an UltraMemV2 layer with prefilter width k.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from umv2_ref import costs
from umv2_ref.exercises.harness import Mistake, register
from umv2_ref.values import expanded_lookup, weighted_sum

from . import divisible_by, draw, module_functions, no_tensor_with, pick, uses_package


def _expansion_inputs(gen: torch.Generator):
    """(table [N, D], virtual [T, m], scores [T, m], shuffle [E*N], blocks E).

    N is a prime in 17..23 and every other size is below 11, so a tensor with both an N-sized and a
    d_out-sized (11 or 13) dimension is recognisable by its number of entries.
    """
    blocks, n_rows, d = draw(gen, 2, 4), pick(gen, 17, 19, 23), draw(gen, 2, 6)
    t, m = draw(gen, 2, 4), draw(gen, 3, 8)
    table = torch.randn(n_rows, d, generator=gen)
    virtual = torch.randint(0, blocks * n_rows, (t, m), generator=gen)
    scores = torch.randn(t, m, generator=gen)
    shuffle = torch.randperm(blocks * n_rows, generator=gen)
    return table, virtual, scores, shuffle, blocks


# ----------------------------------------------------------------------------------------------
# nb03_implicit_expansion
# ----------------------------------------------------------------------------------------------


def _ive_inputs(gen: torch.Generator):
    table, virtual, scores, shuffle, blocks = _expansion_inputs(gen)
    d_out = pick(gen, 11, 13)
    proj = torch.randn(blocks, table.shape[1], d_out, generator=gen)  # [E, D, d_out] one W_p per block
    return table, virtual, scores, shuffle, proj


def _ive_reference(table, virtual, scores, shuffle, proj):
    z = expanded_lookup(table, virtual, scores, shuffle, proj.shape[0])  # [T, E, D]
    return torch.einsum("ted,edo->to", z, proj)


def _ive_no_shuffle(table, virtual, scores, shuffle, proj):
    return _ive_reference(table, virtual, scores, torch.arange(shuffle.numel()), proj)


def _ive_block_row_swapped(table, virtual, scores, shuffle, proj):
    blocks = proj.shape[0]
    phys = shuffle[virtual]  # [T, m]
    rows, block = phys // blocks, phys % blocks
    w = F.one_hot(block, blocks).to(scores.dtype) * scores[..., None]  # [T, m, E]
    return torch.einsum("ted,edo->to", torch.einsum("tme,tmd->ted", w, table[rows]), proj)


def _ive_one_projector(table, virtual, scores, shuffle, proj):
    return _ive_reference(table, virtual, scores, shuffle, proj[:1].expand_as(proj))


def _ive_materialised(table, virtual, scores, shuffle, proj):
    virtual_table = torch.einsum("nd,edo->eno", table, proj).reshape(-1, proj.shape[-1])  # [E*N, d_out]
    return torch.einsum("tm,tmo->to", scores, virtual_table[shuffle[virtual]])  # row p*N + r = V[r] W_p


register(
    "nb03_implicit_expansion", _ive_reference, _ive_inputs,
    notebook="03", fn_name="my_implicit_expansion",
    goal="Read E*N virtual slots from N stored rows: pool per block first, project each block after.",
    mistakes=[
        Mistake("no_shuffle", _ive_no_shuffle,
                "you decomposed the virtual id v itself; first map it through the shuffle, pi(v) = "
                "shuffle[v], then block = pi(v) // N and row = pi(v) % N."),
        Mistake("block_row_swapped", _ive_block_row_swapped,
                "you read block = pi(v) % E and row = pi(v) // E (interleaved blocks); the virtual tables "
                "are contiguous: block = pi(v) // N, row = pi(v) % N."),
        Mistake("one_projector", _ive_one_projector,
                "you projected every block with W_1 -- that is UltraMemV2's shared projection; UltraMem's IVE "
                "has one projector W_p per block p."),
        Mistake("materialises_virtual_tables", _ive_materialised,
                "right values, but you built projected tables V W_p (N x d_out entries each), which the "
                "exercise forbids: pool the m selected rows per block ([T, E, D]) and project only that.",
                no_tensor_with("never build a projected table V W_p (a tensor with N x d_out entries)",
                               divisible_by(lambda a: a[0].shape[0] * a[4].shape[-1]))),
        uses_package(_ive_reference, expanded_lookup, instead="pool the rows per block yourself (one_hot or "
                     "index_add over the block id)."),
    ],
    spec="table [N, D], virtual [T, m] int64, scores [T, m], shuffle [E*N] int64, proj [E, D, d_out] (all "
         "float32 where real) -> o [T, d_out] float32 = sum_p W_p^T sum_{slots in block p} s V[row]; "
         "no projected table.",
    outputs=("o",),
    fingerprints=(r"one_hot\(\s*\w+\s*//\s*N\s*,\s*E\)", r"one_hot\(\s*block\s*,\s*E\)",
                  r"one_hot\(\s*block\s*,\s*blocks\)"),
)


# ----------------------------------------------------------------------------------------------
# nb03_shared_projection
# ----------------------------------------------------------------------------------------------


def _shared_inputs(gen: torch.Generator):
    table, virtual, scores, shuffle, blocks = _expansion_inputs(gen)
    return table, virtual, scores, shuffle, blocks, torch.randn(table.shape[1], draw(gen, 2, 6), generator=gen)


def _shared_reference(table, virtual, scores, shuffle, blocks, w):
    return expanded_lookup(table, virtual, scores, shuffle, blocks).sum(-2) @ w


def _shared_mean_of_blocks(table, virtual, scores, shuffle, blocks, w):
    return expanded_lookup(table, virtual, scores, shuffle, blocks).mean(-2) @ w


def _shared_no_shuffle(table, virtual, scores, shuffle, blocks, w):
    rows = virtual % table.shape[0]
    return torch.einsum("tm,tmd->td", scores, table[rows]) @ w


def _shared_first_block_only(table, virtual, scores, shuffle, blocks, w):
    return expanded_lookup(table, virtual, scores, shuffle, blocks)[:, 0] @ w


def _shared_package(table, virtual, scores, shuffle, blocks, w):
    return weighted_sum(table, shuffle[virtual] % table.shape[0], scores) @ w


register(
    "nb03_shared_projection", _shared_reference, _shared_inputs,
    notebook="03", fn_name="my_shared_projection",
    goal="See that one shared projector lets the blocks be summed first: a plain weighted sum over physical rows.",
    mistakes=[
        Mistake("mean_of_blocks", _shared_mean_of_blocks,
                "you averaged the E block sums; W^T sum_p V^T s_p adds them."),
        Mistake("no_shuffle", _shared_no_shuffle,
                "you folded the virtual id straight onto a row (v % N); the physical row is pi(v) % N with "
                "pi(v) = shuffle[v]."),
        Mistake("first_block_only", _shared_first_block_only,
                "you kept only block 0's pooled vector; every block contributes."),
        uses_package(_shared_package, weighted_sum, expanded_lookup,
                     instead="gather the rows and weight them yourself."),
    ],
    spec="table [N, D], virtual [T, m] int64, scores [T, m], shuffle [E*N] int64, blocks E int, w [D, d_out] -> "
         "o [T, d_out] float32 = W^T sum_p V^T s_p.",
    outputs=("o",),
    fingerprints=(r"shuffle\[\s*virtual\s*\]\s*%\s*\w+\s*,\s*s\s*\)\s*@", r"z\.sum\(1\)\s*@",
                  r"scores\[\.\.\.,\s*None\]\s*\*\s*table\["),
)


# ----------------------------------------------------------------------------------------------
# nb03_distinct_rows
# ----------------------------------------------------------------------------------------------


def _distinct_inputs(gen: torch.Generator):
    """Few physical rows behind many grid slots, so a token's m distinct slots often share rows."""
    blocks, n_rows, t = pick(gen, 2, 4), draw(gen, 4, 9), draw(gen, 2, 6)
    m = draw(gen, 3, min(8, blocks * n_rows))
    virtual = torch.stack([torch.randperm(blocks * n_rows, generator=gen)[:m] for _ in range(t)])  # distinct slots
    return virtual, torch.randperm(blocks * n_rows, generator=gen), n_rows


def _distinct_reference(virtual, shuffle, n_rows):
    rows = shuffle[virtual] % n_rows  # [T, m]
    return torch.tensor([len(set(r)) for r in rows.tolist()], dtype=torch.int64)


def _distinct_no_fold(virtual, shuffle, n_rows):
    return torch.tensor([len(set(r)) for r in shuffle[virtual].tolist()], dtype=torch.int64)


def _distinct_no_shuffle(virtual, shuffle, n_rows):
    return _distinct_reference(virtual, torch.arange(shuffle.numel()), n_rows)


def _distinct_blocks(virtual, shuffle, n_rows):
    return torch.tensor([len(set(r)) for r in (shuffle[virtual] // n_rows).tolist()], dtype=torch.int64)


register(
    "nb03_distinct_rows", _distinct_reference, _distinct_inputs,
    notebook="03", fn_name="my_distinct_rows",
    goal="With expansion as addressing, several grid slots of one token can land on the same physical row.",
    mistakes=[
        Mistake("counts_virtual_slots", _distinct_no_fold,
                "you counted distinct shuffled virtual positions (always m); fold them onto the physical "
                "rows with % N first -- that is where the repeats appear."),
        Mistake("no_shuffle", _distinct_no_shuffle,
                "you folded the virtual id itself (v % N); the row is shuffle[v] % N."),
        Mistake("counts_blocks", _distinct_blocks,
                "you counted distinct blocks pi(v) // N; the question is about physical rows pi(v) % N."),
    ],
    spec="virtual [T, m] int64 (distinct per token), shuffle [E*N] int64, n_rows N int -> [T] int64, the "
         "number of different physical rows shuffle[v] % N among each token's m slots.",
    outputs=("distinct rows",),
    fingerprints=(r"unique\(", r"len\(set\(", r"\[:,\s*1:\]\s*!=\s*\w+\[:,\s*:-1\]"),
)


# ----------------------------------------------------------------------------------------------
# nb03_v2_macs
# ----------------------------------------------------------------------------------------------


def _macs_inputs(gen: torch.Generator):
    """(d, n_keys, d_key, rank, cores, topm, d_pre, d_value, k) as Python ints, k != m."""
    d, n_keys, d_key = draw(gen, 64, 1024), draw(gen, 64, 1200), draw(gen, 16, 256)
    rank, cores, topm = draw(gen, 2, 4), draw(gen, 1, 3), draw(gen, 8, 64)
    d_pre, d_value = draw(gen, 16, 256), draw(gen, 16, 256)
    k = topm + draw(gen, 1, 32)  # a wider prefilter than the official k = m
    return d, n_keys, d_key, rank, cores, topm, d_pre, d_value, k


def _macs_reference(d, n_keys, d_key, rank, cores, topm, d_pre, d_value, k):
    return costs.ultramemv2_cost(d, n_keys, d_key, rank, cores, topm, d_pre, d_value, prefilter_k=k).macs


def _macs_one_query(d, n_keys, d_key, rank, cores, topm, d_pre, d_value, k):
    return costs.ultramemv2_cost(d, n_keys, d_key, rank, cores, topm, d_pre, d_value, per_rank_queries=False,
                                 prefilter_k=k).macs


def _macs_rescoring_with_m(d, n_keys, d_key, rank, cores, topm, d_pre, d_value, k):
    return costs.ultramemv2_cost(d, n_keys, d_key, rank, cores, topm, d_pre, d_value).macs


def _macs_no_rescoring(d, n_keys, d_key, rank, cores, topm, d_pre, d_value, k):
    return _macs_reference(d, n_keys, d_key, rank, cores, topm, d_pre, d_value, k) - cores * (k * rank**2
                                                                                              + k**2 * rank)


def _macs_no_pre_projection(d, n_keys, d_key, rank, cores, topm, d_pre, d_value, k):
    return _macs_reference(d, n_keys, d_key, rank, cores, topm, d_pre, d_value, k) - d * d_pre


register(
    "nb03_v2_macs", _macs_reference, _macs_inputs,
    notebook="03", fn_name="my_v2_macs",
    goal="Count an UltraMemV2 layer's compute per token term by term, for any prefilter width k.",
    mistakes=[
        Mistake("one_shared_query", _macs_one_query,
                "you counted one query per axis (2 d D_k, UltraMem v1); UltraMemV2 has one per Tucker rank: "
                "2 r d D_k."),
        Mistake("rescoring_with_m", _macs_rescoring_with_m,
                "you rescored m x m candidates; the prefilter keeps k per axis, so the rescoring costs "
                "c (k r^2 + k^2 r) -- the notebook's formula is the special case k = m."),
        Mistake("no_rescoring", _macs_no_rescoring,
                "you forgot the full-core rescoring of the k x k candidates, c (k r^2 + k^2 r)."),
        Mistake("no_pre_projection", _macs_no_pre_projection,
                "you forgot the pre-projection W_pre x (d D_p multiply-adds)."),
        uses_package(_macs_reference, *module_functions(costs), instead="add up the terms yourself."),
    ],
    spec="d, n_keys, d_key, rank, cores, topm, d_pre, d_value, k: ints -> int, MACs per token with per-rank "
         "queries and k candidates per axis.",
    outputs=("MACs",),
    rtol=0.0, atol=0.0,
    fingerprints=(r"2\s*\*\s*\w+\s*\*\s*\w+\s*\*\s*\w+\s*\+\s*2\s*\*\s*\w+\s*\*\s*\w+\s*\*\s*\w+\s*\+\s*2\s*\*",
                  r"c\w*\s*\*\s*\(\s*\w+\s*\*\s*\w+\s*\*\*\s*2\s*\+\s*\w+\s*\*\*\s*2\s*\*\s*\w+\)"),
)
