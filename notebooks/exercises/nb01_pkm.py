"""Exercises of notebook 01 (product-key memory, PKM arXiv 1907.05242).

* ``nb01_product_key_topk``: the exact two-stage product-key top-k, batched (PKM Sec. 3.2).
* ``nb01_cube_topk``: the same argument with three sub-key sets.
* ``nb01_usage_metrics``: memory usage and KL to uniform of a batch of selections (PKM Sec. 4.4).
* ``nb01_expected_usage``: the usage uniform random reads would reach (the baseline of usage plots).
"""
from __future__ import annotations

import math

import torch

from umv2_ref.exercises.harness import Mistake, register
from umv2_ref.retrieval import dense_topk, product_key_topk
from umv2_ref.viz import usage_metrics

from . import SMALL_PRIMES, divisible_by, draw, no_tensor_with, pick, uses_package

# ----------------------------------------------------------------------------------------------
# nb01_product_key_topk
# ----------------------------------------------------------------------------------------------


def _topk_inputs(gen: torch.Generator):
    """(s_row [B, n], s_col [B, n], k): n prime and k < n, so only a full grid has n^2 | numel."""
    b, n = draw(gen, 1, 4), pick(gen, *SMALL_PRIMES)
    k = draw(gen, 2, n - 1)
    return torch.randn(b, n, generator=gen), torch.randn(b, n, generator=gen), k


def _topk_reference(s_row, s_col, k):
    return dense_topk(s_row, s_col, k)  # brute force: the trusted answer


def _topk_diagonal_pairs(s_row, s_col, k):
    top_r, idx_r = s_row.topk(k, dim=-1)
    top_c, idx_c = s_col.topk(k, dim=-1)
    return top_r + top_c, idx_r * s_row.shape[-1] + idx_c


def _topk_candidate_index(s_row, s_col, k):
    top_r, _ = s_row.topk(k, dim=-1)
    top_c, _ = s_col.topk(k, dim=-1)
    return (top_r[..., :, None] + top_c[..., None, :]).flatten(-2).topk(k, dim=-1)


def _topk_transposed(s_row, s_col, k):
    scores, idx = dense_topk(s_row, s_col, k)
    n = s_row.shape[-1]
    return scores, (idx % n) * n + idx // n


def _topk_full_grid(s_row, s_col, k):
    grid = s_row[:, :, None] + s_col[:, None, :]  # [B, n, n]
    return grid.flatten(1).topk(k, dim=-1)


def _topk_package(s_row, s_col, k):
    return product_key_topk(s_row, s_col, k)


register(
    "nb01_product_key_topk", _topk_reference, _topk_inputs,
    notebook="01", fn_name="my_product_key_topk",
    goal="Find the exact top-k of an n x n additive grid from a k x k candidate block, for a batch.",
    mistakes=[
        Mistake("diagonal_pairs", _topk_diagonal_pairs,
                "you paired the r-th best row only with the r-th best column: k candidates instead of the "
                "k x k block. The 2nd best slot is often (best row, 2nd column) -- every pair of a top-k row "
                "and a top-k column must be a candidate."),
        Mistake("candidate_positions", _topk_candidate_index,
                "you returned positions inside the k x k candidate block; map them back to slot ids "
                "i * n + j through the candidate rows idx_r[p // k] and columns idx_c[p % k]."),
        Mistake("column_major_ids", _topk_transposed,
                "your slot ids are j * n + i (column-major); umv2_ref numbers slot (i, j) as i * n + j."),
        Mistake("scores_full_grid", _topk_full_grid,
                "you built the whole n x n grid: right answer, but that is the brute force product keys "
                "exist to avoid. Only the top-k rows, top-k columns and their k x k pairs are needed.",
                no_tensor_with("never build a tensor with n x n scores per query", divisible_by(
                    lambda a: a[0].shape[-1] ** 2))),
        uses_package(_topk_package, product_key_topk, dense_topk,
                     instead="build it from topk, broadcasting and gather."),
    ],
    spec="s_row, s_col [B, n] float32, k int (k < n) -> (scores [B, k] float32 descending, "
         "slot ids [B, k] int64 = i * n + j); no n x n grid.",
    outputs=("scores", "slot ids"),
    fingerprints=(r"gather\(\s*-?1\s*,\s*\w+\s*//\s*k\s*\)", r"\[:,\s*:,\s*None\]\s*\+\s*\w+\[:,\s*None,\s*:\]"),
)


# ----------------------------------------------------------------------------------------------
# nb01_cube_topk
# ----------------------------------------------------------------------------------------------


def _cube_inputs(gen: torch.Generator):
    b, n = draw(gen, 1, 3), pick(gen, *SMALL_PRIMES)
    k = draw(gen, 2, min(n - 1, 6))
    return tuple(torch.randn(b, n, generator=gen) for _ in range(3)) + (k,)


def _cube_grid(s1, s2, s3):
    return s1[:, :, None, None] + s2[:, None, :, None] + s3[:, None, None, :]  # [B, n, n, n]


def _cube_reference(s1, s2, s3, k):
    return _cube_grid(s1, s2, s3).flatten(1).topk(k, dim=-1)  # id = (i * n + j) * n + l


def _cube_diagonal(s1, s2, s3, k):
    (a, i), (b, j), (c, m) = s1.topk(k, -1), s2.topk(k, -1), s3.topk(k, -1)
    n = s1.shape[-1]
    return a + b + c, (i * n + j) * n + m


def _cube_reversed_ids(s1, s2, s3, k):
    scores, idx = _cube_reference(s1, s2, s3, k)
    n = s1.shape[-1]
    i, j, m = idx // (n * n), idx // n % n, idx % n
    return scores, (m * n + j) * n + i


def _cube_best_third_only(s1, s2, s3, k):
    pair_scores, pair_ids = product_key_topk(s1, s2, k)  # [B, k]
    best, l_best = s3.max(-1, keepdim=True)  # [B, 1]
    return pair_scores + best, pair_ids * s1.shape[-1] + l_best


register(
    "nb01_cube_topk", _cube_reference, _cube_inputs,
    notebook="01", fn_name="my_cube_topk",
    goal="Extend the exactness argument of product keys to three sub-key sets (n^3 slots).",
    mistakes=[
        Mistake("diagonal_triples", _cube_diagonal,
                "you combined the r-th best of each axis only with the r-th best of the others; all "
                "k x k x k combinations of the per-axis top-k (or two product-key stages) are candidates."),
        Mistake("reversed_ids", _cube_reversed_ids,
                "your ids number the axes in reverse; slot (i, j, l) is (i * n + j) * n + l."),
        Mistake("best_third_only", _cube_best_third_only,
                "you combined the top-k (i, j) pairs only with the single best l; the 2nd best slot may "
                "reuse the best pair with the 2nd best l, so keep k candidates on every axis."),
        Mistake("scores_full_grid", lambda s1, s2, s3, k: _cube_reference(s1, s2, s3, k),
                "you scored the whole n x n x n cube (or an n x n face of it); the argument of section 3 "
                "shows the top-k lie in the product of the per-axis top-k.",
                no_tensor_with("never build a tensor with n x n (or more) scores per query", divisible_by(
                    lambda a: a[0].shape[-1] ** 2))),
    ],
    spec="s1, s2, s3 [B, n] float32, k int (k < n) -> (scores [B, k] float32 descending, slot ids [B, k] "
         "int64 = (i * n + j) * n + l) for the grid s1[i] + s2[j] + s3[l]; no n x n grid.",
    outputs=("scores", "slot ids"),
    fingerprints=(r"\w+\[:,\s*:,\s*None,\s*None\]",),
)


# ----------------------------------------------------------------------------------------------
# nb01_usage_metrics
# ----------------------------------------------------------------------------------------------


def _usage_inputs(gen: torch.Generator):
    """(indices [T, k] drawn from a skewed distribution so some slots stay dead, N)."""
    n_slots, t, k = draw(gen, 16, 64), draw(gen, 5, 39), draw(gen, 1, 4)
    skew = torch.rand(n_slots, generator=gen) ** 4
    skew[-1] = 0.0  # the last slot is never read: a forgotten minlength shows
    indices = torch.multinomial(skew / skew.sum(), t * k, replacement=True, generator=gen).view(t, k)
    return indices, n_slots


def _usage_from_counts(counts, n_slots, entropy_only=False, normalise=True):
    counts = counts.double()
    z = counts / counts.sum() if normalise else counts
    nz = z[z > 0]
    kl = -(nz * nz.log()).sum() if entropy_only else math.log(n_slots) + (nz * nz.log()).sum()
    return torch.stack([(counts > 0).double().mean(), kl])


def _usage_reference(indices, n_slots):
    return _usage_from_counts(torch.bincount(indices.reshape(-1), minlength=n_slots), n_slots)


def _usage_per_selection(indices, n_slots):
    counts = torch.bincount(indices.reshape(-1), minlength=n_slots).double()
    return torch.stack([(counts > 0).sum() / indices.numel(), _usage_reference(indices, n_slots)[1]])


def _usage_entropy_only(indices, n_slots):
    return _usage_from_counts(torch.bincount(indices.reshape(-1), minlength=n_slots), n_slots, entropy_only=True)


def _usage_unnormalised(indices, n_slots):
    return _usage_from_counts(torch.bincount(indices.reshape(-1), minlength=n_slots), n_slots, normalise=False)


def _usage_no_minlength(indices, n_slots):
    return _usage_from_counts(torch.bincount(indices.reshape(-1)), n_slots)


def _usage_package(indices, n_slots):
    m = usage_metrics(torch.bincount(indices.reshape(-1), minlength=n_slots))
    return torch.tensor([m["fraction_used"], m["kl_uniform"]], dtype=torch.float64)


register(
    "nb01_usage_metrics", _usage_reference, _usage_inputs,
    notebook="01", fn_name="my_usage_metrics",
    goal="Measure how much of a memory is used: fraction of slots read and KL of the access distribution to uniform.",
    mistakes=[
        Mistake("per_selection", _usage_per_selection,
                "you divided the number of used slots by the number of selections T * k; usage is a "
                "fraction of the N slots."),
        Mistake("entropy_not_kl", _usage_entropy_only,
                "you returned the entropy -sum z log z; the KL to uniform is log N + sum z log z "
                "(0 for uniform access)."),
        Mistake("unnormalised_counts", _usage_unnormalised,
                "you used the raw counts in the KL; z must be a distribution, z = counts / sum(counts)."),
        Mistake("no_minlength", _usage_no_minlength,
                "bincount without minlength=N stops at the largest index read, so slots above it are not "
                "counted as dead."),
        uses_package(_usage_package, usage_metrics, instead="count with torch.bincount and write the two formulas."),
    ],
    spec="indices [T, k] int64, n_slots int -> float64 tensor [2] = [fraction of the N slots read at least "
         "once, KL(z || uniform) = log N + sum_i z_i log z_i with 0 log 0 = 0].",
    outputs=("[usage, KL]",),
    rtol=1e-9, atol=1e-12,
    fingerprints=(r"log\(\s*n_slots\s*\)\s*\+",),
)


# ----------------------------------------------------------------------------------------------
# nb01_expected_usage
# ----------------------------------------------------------------------------------------------


def _expected_inputs(gen: torch.Generator):
    b = 6
    n_slots = torch.randint(16, 257, (b,), generator=gen).double()
    k = torch.randint(1, 9, (b,), generator=gen).double()
    tokens = torch.randint(1, 200, (b,), generator=gen).double()
    heads = torch.randint(1, 5, (b,), generator=gen).double()
    return n_slots, tokens, heads, k


def _expected_reference(n_slots, tokens, heads, k):
    return 1 - (1 - k / n_slots) ** (tokens * heads)


def _expected_with_replacement(n_slots, tokens, heads, k):
    return 1 - (1 - 1 / n_slots) ** (tokens * heads * k)


def _expected_exponential(n_slots, tokens, heads, k):
    return 1 - torch.exp(-tokens * heads * k / n_slots)


def _expected_no_heads(n_slots, tokens, heads, k):
    return 1 - (1 - k / n_slots) ** tokens


def _expected_dead_fraction(n_slots, tokens, heads, k):
    return (1 - k / n_slots) ** (tokens * heads)


register(
    "nb01_expected_usage", _expected_reference, _expected_inputs,
    notebook="01", fn_name="my_expected_usage",
    goal="Derive the usage uniform random reads reach when every head reads k distinct slots per token.",
    mistakes=[
        Mistake("independent_reads", _expected_with_replacement,
                "you treated the T*H*k reads as independent picks with replacement, (1 - 1/N)^(T H k); a "
                "head reads k *distinct* slots, so one head misses a given slot with probability 1 - k/N."),
        Mistake("exponential_approximation", _expected_exponential,
                "1 - exp(-T H k / N) is the large-N approximation; the exercise asks for the exact "
                "probability, which differs for small N."),
        Mistake("forgot_heads", _expected_no_heads,
                "every one of the H heads makes its own selection per token: the exponent is T * H."),
        Mistake("dead_fraction", _expected_dead_fraction,
                "that is the expected fraction of *dead* slots; usage is one minus it."),
    ],
    spec="n_slots, tokens, heads, k: float64 tensors [B] (one configuration per entry) -> [B] expected "
         "fraction of the N slots read at least once.",
    outputs=("expected usage",),
    rtol=1e-9, atol=0.0,
    fingerprints=(r"1\s*-\s*k\s*/\s*n_slots",),
)
