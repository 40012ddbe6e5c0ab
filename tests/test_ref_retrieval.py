"""Retrieval against brute force: product keys (exact), TDQKR (exact and rank-1 prefilter), sign rule.

Tie policy (retrieval.py): ``torch.topk`` orders tied values arbitrarily, so two exact methods
return the same *indices* only when scores are distinct (continuous random inputs: ties have
probability zero); under deliberate ties they return the same *scores*, and every index they
return carries the score it claims.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from umv2_ref.layers import TuckerConfig, TuckerRetrieval
from umv2_ref.metrics import rank1_recall
from umv2_ref.retrieval import dense_topk, product_key_topk, rank1_factors, tucker_topk

# ---------------------------------------------------------------------------------------------
# Product keys (PKM)
# ---------------------------------------------------------------------------------------------

PKM_SHAPES = [((), 8, 1), ((), 8, 8), ((5,), 16, 4), ((2, 3), 10, 7), ((4, 1, 2), 32, 16), ((3,), 1, 1)]


@pytest.mark.parametrize("lead,n,k", PKM_SHAPES)
def test_product_keys_equal_dense_on_continuous_scores(lead, n, k):
    s_row, s_col = torch.randn(*lead, n), torch.randn(*lead, n)
    scores, idx = product_key_topk(s_row, s_col, k)
    ref_scores, ref_idx = dense_topk(s_row, s_col, k)
    assert scores.shape == idx.shape == (*lead, k)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(scores, ref_scores)


@pytest.mark.parametrize("lead,n,k", PKM_SHAPES)
def test_product_keys_equal_dense_scores_under_ties(lead, n, k):
    s_row = torch.randint(0, 3, (*lead, n)).float()  # many exact ties
    s_col = torch.randint(0, 3, (*lead, n)).float()
    scores, idx = product_key_topk(s_row, s_col, k)
    ref_scores, _ = dense_topk(s_row, s_col, k)
    assert torch.equal(scores, ref_scores)
    grid = (s_row[..., :, None] + s_col[..., None, :]).flatten(-2)  # [..., n*n]
    assert torch.equal(grid.gather(-1, idx), scores)  # each index carries its score
    assert all(len(set(row.tolist())) == k for row in idx.reshape(-1, k))  # no slot twice


def test_product_keys_flat_index_convention():
    s_row = torch.tensor([0.0, 5.0, 1.0])
    s_col = torch.tensor([2.0, 0.0, 9.0])
    scores, idx = product_key_topk(s_row, s_col, 1)
    assert idx.item() == 1 * 3 + 2 and scores.item() == 14.0


# ---------------------------------------------------------------------------------------------
# TDQKR: exact retrieval against a float64 numpy brute force
# ---------------------------------------------------------------------------------------------


def numpy_grid(s_row, s_col, cores):
    """Per-core grid scores in float64 numpy, slot order i * n + j: [..., n*n, c]."""
    sr, sc, cs = (t.detach().double().numpy() for t in (s_row, s_col, cores))
    grid = np.einsum("...ia,cab,...jb->...ijc", sr, cs, sc)  # [..., n, n, c]
    return grid.reshape(*grid.shape[:-3], -1, grid.shape[-1])


def brute_force_tucker(s_row, s_col, cores, m):
    """Full-grid top-m, loop-free: (per-core scores [..., m, c], flat indices [..., m])."""
    per_core = numpy_grid(s_row, s_col, cores)  # [..., n*n, c]
    order = np.argsort(-per_core.sum(-1), axis=-1, kind="stable")[..., :m]  # [..., m]
    return np.take_along_axis(per_core, order[..., None], axis=-2), order


TUCKER_SHAPES = [((), 6, 2, 1, 1), ((3,), 8, 2, 2, 5), ((2, 3), 7, 3, 2, 49), ((4,), 12, 1, 3, 12), ((2,), 5, 2, 4, 1)]


@pytest.mark.parametrize("lead,n,r,c,m", TUCKER_SHAPES)
def test_tucker_exact_equals_brute_force(lead, n, r, c, m):
    s_row, s_col = torch.randn(*lead, n, r, dtype=torch.float64), torch.randn(*lead, n, r, dtype=torch.float64)
    cores = torch.randn(c, r, r, dtype=torch.float64)
    scores, idx = tucker_topk(s_row, s_col, cores, m, exact=True)
    ref_scores, ref_idx = brute_force_tucker(s_row, s_col, cores, m)
    assert scores.shape == (*lead, m, c) and idx.shape == (*lead, m)
    np.testing.assert_array_equal(idx.numpy(), ref_idx)
    np.testing.assert_allclose(scores.numpy(), ref_scores, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("lead,n,r,c,m", [((4,), 10, 2, 2, 6), ((2, 3), 12, 3, 1, 9), ((5,), 9, 2, 3, 16)])
def test_tucker_prefilter_returns_grid_slots_with_their_scores(lead, n, r, c, m):
    s_row, s_col = torch.randn(*lead, n, r, dtype=torch.float64), torch.randn(*lead, n, r, dtype=torch.float64)
    cores = torch.rand(c, r, r, dtype=torch.float64)
    k = max(int(np.ceil(np.sqrt(m))), 4)
    scores, idx = tucker_topk(s_row, s_col, cores, m, k=k)
    grid = numpy_grid(s_row, s_col, cores)  # [..., n*n, c]
    np.testing.assert_allclose(scores.numpy(), np.take_along_axis(grid, idx.numpy()[..., None], axis=-2),
                               rtol=1e-12, atol=1e-12)
    assert (idx >= 0).all() and (idx < n * n).all()
    assert all(len(set(row.tolist())) == m for row in idx.reshape(-1, m))
    total = scores.sum(-1)
    assert (total[..., :-1] >= total[..., 1:]).all()  # sorted by the summed score


def normed_axis_scores(tokens, n, r, d_key, seed):
    """Row/col scores of random RMS-normed queries and keys (per-rank queries), as at init."""
    g = torch.Generator().manual_seed(seed)
    q = F.rms_norm(torch.randn(tokens, 2, r, d_key, generator=g), (d_key,))  # [T, 2, r, D_k]
    keys = F.rms_norm(torch.randn(2, n, r, d_key, generator=g), (d_key,))  # [2, n, r, D_k]
    cores = torch.rand(2, r, r, generator=g)  # [c, r, r], U[0, 1] as the layers
    s_row = torch.einsum("trd,nrd->tnr", q[:, 0], keys[0]) / d_key**0.5  # [T, n, r]
    s_col = torch.einsum("trd,nrd->tnr", q[:, 1], keys[1]) / d_key**0.5
    return s_row, s_col, cores


@pytest.mark.parametrize("d_key,n,m", [(192, 360, 32), (128, 64, 32)])
def test_prefilter_recall_at_random_init_is_about_one_half(d_key, n, m):
    """docs/references.md Sec. 7.5: recall ~0.5 vs the exact grid; 1.0 on pairs with two positive factors."""
    s_row, s_col, cores = normed_axis_scores(48, n, 2, d_key, seed=0)
    recall = rank1_recall(s_row, s_col, cores, m)
    recall_pos = rank1_recall(s_row, s_col, cores, m, positive_only=True)
    print(f"\nrank-1 prefilter recall D_k={d_key} n={n} m={m}: all pairs {recall:.3f}, (+,+) pairs {recall_pos:.3f}")
    assert 0.3 <= recall <= 0.7
    assert recall_pos > 0.97  # the summed core is only approximately rank 1 here


def test_prefilter_is_exact_on_positive_pairs_for_a_rank1_core():
    s_row, s_col, _ = normed_axis_scores(48, 128, 2, 64, seed=1)
    u, v = torch.tensor([0.6, 0.8]), torch.tensor([0.28, 0.96])
    cores = torch.stack([1.5 * torch.outer(u, v), 0.5 * torch.outer(u, v)])  # sum = 2 u v^T, exactly rank 1
    recall = rank1_recall(s_row, s_col, cores, 32)
    recall_pos = rank1_recall(s_row, s_col, cores, 32, positive_only=True)
    print(f"\nrank-1 core: recall all pairs {recall:.3f}, (+,+) pairs {recall_pos:.3f}")
    assert recall_pos == 1.0
    assert recall < 0.8  # (-,-) pairs are still unreachable


# ---------------------------------------------------------------------------------------------
# Two-quadrant prefilter (quadrants=2): this project's addition
# ---------------------------------------------------------------------------------------------


def brute_force_two_quadrants(s_row, s_col, cores, m, k):
    """Candidates = (top-k a x top-k b) union (top-k -a x top-k -b) as Python sets; their top-m by the summed grid."""
    u, v = rank1_factors(cores)
    a, b = (s_row @ u).numpy(), (s_col @ v).numpy()  # [T, n]
    total = numpy_grid(s_row, s_col, cores).sum(-1)  # [T, n*n]
    n, out = s_row.shape[-2], []
    for t in range(len(a)):
        top = lambda x: set(np.argsort(-x)[:k].tolist())  # noqa: E731
        pairs = {(i, j) for i in top(a[t]) for j in top(b[t])} | {(i, j) for i in top(-a[t]) for j in top(-b[t])}
        flat = sorted((i * n + j for i, j in pairs), key=lambda s: -total[t, s])
        out.append(flat[:m])
    return np.array(out)


@pytest.mark.parametrize("n,r,c,m,k", [(10, 2, 2, 6, 3), (6, 2, 2, 9, 5), (9, 3, 1, 16, 4), (12, 2, 3, 5, 12)])
def test_two_quadrant_prefilter_is_the_top_m_of_the_candidate_union(n, r, c, m, k):
    """k > n/2 makes the two quadrants share rows and columns: shared pairs must be returned once."""
    torch.manual_seed(n + k)
    s_row, s_col = torch.randn(20, n, r, dtype=torch.float64), torch.randn(20, n, r, dtype=torch.float64)
    cores = torch.rand(c, r, r, dtype=torch.float64)
    scores, idx = tucker_topk(s_row, s_col, cores, m, k=k, quadrants=2)
    np.testing.assert_array_equal(idx.numpy(), brute_force_two_quadrants(s_row, s_col, cores, m, k))
    grid = numpy_grid(s_row, s_col, cores)
    np.testing.assert_allclose(scores.numpy(), np.take_along_axis(grid, idx.numpy()[..., None], axis=-2), rtol=1e-12)
    assert all(len(set(row.tolist())) == m for row in idx)


@pytest.mark.parametrize("d_key,n,m", [(192, 360, 32), (128, 64, 32), (16, 68, 32), (64, 64, 16)])
def test_two_quadrant_recall_at_random_init(d_key, n, m):
    """Measured (seeds 0-2, 48 tokens): 1.000, 1.000, 0.999-1.000, 1.000, against 0.46-0.55 for quadrants=1."""
    s_row, s_col, cores = normed_axis_scores(48, n, 2, d_key, seed=0)
    one, two = (rank1_recall(s_row, s_col, cores, m, quadrants=q) for q in (1, 2))
    print(f"\nprefilter recall D_k={d_key} n={n} m={m}: one quadrant {one:.3f}, two quadrants {two:.3f}")
    assert two >= 0.98 and one <= 0.7


def test_two_quadrant_prefilter_is_exact_when_k_covers_the_grid():
    s_row, s_col = torch.randn(7, 6, 2, dtype=torch.float64), torch.randn(7, 6, 2, dtype=torch.float64)
    cores = torch.rand(2, 2, 2, dtype=torch.float64)
    exact = tucker_topk(s_row, s_col, cores, 10, exact=True)
    for q in (1, 2):
        approx = tucker_topk(s_row, s_col, cores, 10, k=6, quadrants=q)
        assert torch.equal(approx[1], exact[1]) and torch.equal(approx[0], exact[0])


@pytest.mark.parametrize("bad", [0, 3, -1, True, 2.0, "2", None])
def test_quadrants_must_be_one_or_two(bad):
    s = torch.randn(3, 6, 2)
    with pytest.raises(ValueError, match=r"quadrants must be 1 or 2, got"):
        tucker_topk(s, s, torch.rand(2, 2, 2), 4, quadrants=bad)
    with pytest.raises(ValueError, match=r"TuckerConfig.prefilter_quadrants must be 1 or 2"):
        TuckerConfig(d_model=8, prefilter_quadrants=bad)


def test_layer_uses_its_prefilter_quadrants():
    """quadrants=2 in the config reaches tucker_topk: the layer's picks equal the function's."""
    torch.manual_seed(0)
    ret = TuckerRetrieval(TuckerConfig(d_model=16, n_keys=16, d_key=8, topm=8, prefilter_quadrants=2))
    x = torch.randn(40, 16)
    scores, idx, _ = ret(x)
    s_row, s_col = ret.axis_scores(x)
    rank1 = (ret.rank1_u, ret.rank1_v)
    for q, same in ((2, True), (1, False)):
        ref = tucker_topk(s_row, s_col, ret.cores, 8, rank1=rank1, quadrants=q)[1]
        assert torch.equal(idx, ref) == same


# ---------------------------------------------------------------------------------------------
# Sign rule of the rank-1 factors
# ---------------------------------------------------------------------------------------------


def test_rank1_factors_are_the_leading_singular_pair_of_the_summed_core():
    cores = torch.rand(3, 4, 4, dtype=torch.float64)
    u, v = rank1_factors(cores)
    U, S, Vh = torch.linalg.svd(cores.sum(0))
    torch.testing.assert_close(torch.outer(u, v) * S[0], S[0] * torch.outer(U[:, 0], Vh[0]))  # one SVD of sum_c C_c
    assert u.sum() >= 0


def test_negative_core_prefilter_ranks_by_the_rank1_score():
    """A negative summed core gives (u > 0, v < 0); flipping v alone would rank by minus the score."""
    s_row, s_col, _ = normed_axis_scores(48, 128, 2, 64, seed=2)
    cores = -torch.rand(2, 2, 2, generator=torch.Generator().manual_seed(3))
    u, v = rank1_factors(cores)
    assert (u > 0).all() and (v < 0).all()  # joint sign choice keeps u v^T ~ sum_c C_c / lambda_1
    wrong = (u * u.sum().sign(), v * v.sum().sign())  # independent signs: both positive
    right_recall = rank1_recall(s_row, s_col, cores, 32)
    wrong_recall = rank1_recall(s_row, s_col, cores, 32, rank1=wrong)
    print(f"\nnegative core: recall joint sign {right_recall:.3f}, independent signs {wrong_recall:.3f}")
    assert 0.3 <= right_recall <= 0.7
    assert wrong_recall < 0.05


def test_refresh_keeps_the_sign_closest_to_the_previous_pair():
    cores = torch.rand(2, 3, 3, dtype=torch.float64)
    u, v = rank1_factors(cores)
    flipped = rank1_factors(cores, previous=(-u, -v))
    torch.testing.assert_close(flipped[0], -u)
    torch.testing.assert_close(flipped[1], -v)
    nudged = cores + 0.01 * torch.randn_like(cores)
    un, vn = rank1_factors(nudged, previous=(-u, -v))
    assert (un + u).abs().sum() + (vn + v).abs().sum() < 0.1  # smooth: stays near the previous pair


def test_module_refresh_is_smooth_across_steps():
    ret = TuckerRetrieval(TuckerConfig(d_model=16, n_keys=8, d_key=8, rank=3))
    with torch.no_grad():
        ret.rank1_u.neg_()  # a previous step chose the other (equally valid) sign
        ret.rank1_v.neg_()
        before = (ret.rank1_u.clone(), ret.rank1_v.clone())
        ret.cores.add_(0.01 * torch.randn_like(ret.cores))
    ret.refresh_rank1()
    assert (ret.rank1_u - before[0]).abs().sum() + (ret.rank1_v - before[1]).abs().sum() < 0.1
    u, v = rank1_factors(ret.cores)
    torch.testing.assert_close(ret.rank1_u, -u)  # the default sign would have jumped
    torch.testing.assert_close(ret.rank1_v, -v)
