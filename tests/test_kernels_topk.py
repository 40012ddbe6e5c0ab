"""kernels.tucker_topk against umv2_ref.retrieval.tucker_topk and a brute-force contract (interpreter on CPU).

fp32: continuous random scores have no ties, so the kernel must return exactly the reference's slots
in the reference's order.  bf16: the reference ranks bf16-rounded values, which tie often; the kernel
rounds at the same places, so the *values* it ranks by must agree exactly, its per-pair scores must
equal the reference's formula bit for bit, and among equal values it takes the smaller slot id.
``quadrants=2`` is checked against ``contract_topk``, a per-token brute force of the contract.

Interpreter cost: the whole file takes about 70 s of CPU time (36 tests, measured on a 2-core
machine shared with other jobs); the slowest are the recall test (16 tokens, n = 64), the two
float64 gradchecks and the torch.compile test.
"""
import pytest
import torch

import kernels
from kernels import config, topk
from umv2_ref import retrieval
from umv2_ref.layers import TuckerConfig, TuckerRetrieval


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    def nan_empty(shape, dtype, device):
        t = torch.empty(shape, dtype=dtype, device=device)
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-1)

    monkeypatch.setattr(config, "empty", nan_empty)


def make_inputs(lead=(2, 3), n=23, r=2, c=2, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    s_row = torch.randn(*lead, n, r, generator=g).to(dtype).requires_grad_()  # [..., n, r]
    s_col = torch.randn(*lead, n, r, generator=g).to(dtype).requires_grad_()  # [..., n, r]
    cores = torch.rand(c, r, r, generator=g).to(dtype).requires_grad_()  # [c, r, r]
    return s_row, s_col, cores


def ranking_values(s_row, s_col, cores, idx):
    """The value the reference ranks candidates by: ``(s_row[i] @ sum_c C_c) @ s_col[j]``, in the input dtype."""
    n, r = s_row.shape[-2:]
    rows, cols = idx // n, idx % n
    sr = s_row.gather(-2, rows[..., None].expand(*rows.shape, r))  # [..., m, r]
    sc = s_col.gather(-2, cols[..., None].expand(*cols.shape, r))  # [..., m, r]
    return ((sr @ cores.sum(0))[..., None, :] @ sc[..., :, None])[..., 0, 0]  # [..., m]


def contract_topk(s_row, s_col, cores, m, k, rank1=None, quadrants=1):
    """Brute force of the tucker_topk contract with the kernel's explicit tie rule, token by token.

    Candidates: top-k rows of a = s_row @ u x top-k columns of b = s_col @ v, plus (quadrants=2) top-k
    of -a x top-k of -b; the union, each pair once; the top m by grid value; output scores per core,
    ordered by their sum.  Values are compared *before* their final rounding to the input dtype (the
    reference ranks the rounded values; rounding is monotone, so this is one of its possible orders),
    then by the smaller index / slot id.
    """
    lead, (n, r) = s_row.shape[:-2], s_row.shape[-2:]
    dtype = s_row.dtype
    s_row, s_col, cores = (x.detach() for x in (s_row.reshape(-1, n, r), s_col.reshape(-1, n, r), cores))
    u, v = retrieval.rank1_factors(cores) if rank1 is None else rank1
    f = torch.float64 if dtype == torch.float64 else torch.float32
    out_s, out_i = [], []
    for t in range(s_row.shape[0]):
        a = (s_row[t].to(f) * u.to(dtype).to(f)).sum(-1).tolist()  # [n] unrounded axis scores
        b = (s_col[t].to(f) * v.to(dtype).to(f)).sum(-1).tolist()
        cand = set()
        for sign in (1, -1)[:quadrants]:
            rows = sorted(range(n), key=lambda i: (-sign * a[i], i))[:k]
            cols = sorted(range(n), key=lambda j: (-sign * b[j], j))[:k]
            cand |= {i * n + j for i in rows for j in cols}
        ids = torch.tensor(sorted(cand))
        p = s_row[t][ids // n] @ cores.sum(0)  # [K, r] rounded to the dtype, as the reference
        val = (p.to(f) * s_col[t][ids % n].to(f)).sum(-1).tolist()  # unrounded grid values
        win = ids[sorted(range(len(ids)), key=lambda x: (-val[x], ids[x].item()))[:m]]
        scores = retrieval._gather_pair_scores(s_row[t], s_col[t], cores, win // n, win % n)  # [m, c]
        total = scores.to(f).sum(-1).tolist()
        order = sorted(range(m), key=lambda x: (-total[x], win[x].item()))
        out_s.append(scores[order])
        out_i.append(win[order])
    return torch.stack(out_s).reshape(*lead, m, -1), torch.stack(out_i).reshape(*lead, m)


def grads(scores, inputs, g):
    return torch.autograd.grad(scores, inputs, g)


def assert_matches_reference(args, m, **kw):
    """fp32: same slots, same order, same scores and gradients as the reference."""
    scores, idx = kernels.tucker_topk(*args, m, **kw)
    ref_scores, ref_idx = retrieval.tucker_topk(*args, m, **kw)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(scores, ref_scores, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(scores)
    for a, b in zip(grads(scores, args, g), grads(ref_scores, args, g)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# fp32: identical to the reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("km,n,lead,c", [(8, 23, (2, 3), 2), (16, 40, (3,), 1), (32, 64, (2,), 2), (128, 128, (2,), 1)])
def test_k_equals_m(km, n, lead, c):
    assert_matches_reference(make_inputs(lead=lead, n=n, c=c, seed=km), km)


@pytest.mark.parametrize("r,c", [(2, 2), (3, 1)])
def test_k_larger_than_m_and_padding(r, c):
    args = make_inputs(r=r, c=c)
    assert_matches_reference(args, 11, k=6)  # BLOCK_K = 8 > k, BLOCK_M = 16 > m
    scores, idx = kernels.tucker_topk(*args, 11, k=6)
    total = scores.sum(-1)  # [..., m]
    assert (total[..., :-1] >= total[..., 1:]).all()
    assert ((idx >= 0) & (idx < 23 * 23)).all() and torch.isfinite(scores).all()


def test_default_k_and_given_rank1():
    args = make_inputs(lead=(3,), n=9)
    assert_matches_reference(args, 4)  # k = m = 4
    u, v = retrieval.rank1_factors(args[2])
    assert_matches_reference(args, 5, k=3, rank1=(-u, -v))  # the opposite quadrant


def test_exact_delegates_to_reference():
    args = make_inputs(lead=(4,), n=7)
    got = kernels.tucker_topk(*args, 5, exact=True)
    want = retrieval.tucker_topk(*args, 5, exact=True)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])


def test_strided_views_and_empty():
    """The layers' einsum returns s_row as a permuted view (n has stride 1): read through strides."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(6, 2, 16, generator=g)  # [T, r, D_k]
    keys = torch.randn(32, 2, 16, generator=g)  # [n, r, D_k]
    s_row = torch.einsum("trd,nrd->tnr", q, keys).requires_grad_()  # [T, n, r] permuted strides
    s_col = torch.einsum("trd,nrd->tnr", q.flip(0), keys).requires_grad_()
    assert s_row.stride(1) == 1 or not s_row.is_contiguous()
    assert_matches_reference((s_row, s_col, torch.rand(2, 2, 2, generator=g).requires_grad_()), 8)
    scores, idx = kernels.tucker_topk(*make_inputs(lead=(0, 3)), 4)
    assert scores.shape == (0, 3, 4, 2) and idx.shape == (0, 3, 4)


# ---------------------------------------------------------------------------------------------
# bf16: the same ranking values, bit-exact scores, explicit ties
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("km,n,quadrants", [(16, 64, 1), (32, 64, 2)])
def test_bf16_same_values_and_tie_rule(km, n, quadrants):
    s_row, s_col, cores = make_inputs(lead=(4,), n=n, dtype=torch.bfloat16, seed=km)
    scores, idx = kernels.tucker_topk(s_row, s_col, cores, km, quadrants=quadrants)
    want_scores, want_idx = contract_topk(s_row, s_col, cores, km, km, quadrants=quadrants)
    _, ref_idx = retrieval.tucker_topk(s_row, s_col, cores, km, quadrants=quadrants)
    # the reference breaks ties its own way: compare what it ranked by, as sorted multisets
    got_v = ranking_values(s_row, s_col, cores, idx).detach().float().sort(-1).values
    ref_v = ranking_values(s_row, s_col, cores, ref_idx).detach().float().sort(-1).values
    assert torch.equal(got_v, ref_v)
    assert torch.equal(idx, want_idx)  # the contract with ties to the smaller id, exactly
    n_ = s_row.shape[-2]
    exact = retrieval._gather_pair_scores(s_row.detach(), s_col.detach(), cores.detach(), idx // n_, idx % n_)
    assert torch.equal(scores, exact) and torch.equal(scores, want_scores)


def test_bf16_gradients_at_the_kernels_selection():
    s_row, s_col, cores = make_inputs(lead=(3,), n=40, dtype=torch.bfloat16, seed=5)
    scores, idx = kernels.tucker_topk(s_row, s_col, cores, 16)
    n = s_row.shape[-2]
    ref = retrieval._gather_pair_scores(s_row, s_col, cores, idx // n, idx % n)  # reference autograd, same pairs
    g = torch.randn_like(scores)
    for a, b in zip(grads(scores, (s_row, s_col, cores), g), grads(ref, (s_row, s_col, cores), g)):
        assert a.dtype == b.dtype == torch.bfloat16
        # the kernel sums in fp32 and rounds once; the reference accumulates in bf16
        torch.testing.assert_close(a.float(), b.float(), atol=0.1, rtol=2e-2)


def test_massive_ties_pick_smallest_ids():
    """All grid values equal: the m smallest slot ids, every score equal to the reference's."""
    s_row = torch.ones(2, 12, 2)
    s_col = torch.ones(2, 12, 2)
    cores = torch.ones(1, 2, 2)
    scores, idx = kernels.tucker_topk(s_row, s_col, cores, 6, k=4)
    ref_scores, _ = retrieval.tucker_topk(s_row, s_col, cores, 6, k=4)
    assert torch.equal(idx, torch.tensor([[0, 1, 2, 3, 12, 13]] * 2))  # rows 0-3 x cols 0-3, by id
    assert torch.equal(scores, ref_scores)
    # ties at the threshold only: two distinct values, the boundary inside the larger group
    s_row = torch.zeros(1, 8, 2)
    s_row[0, :3] = 1.0  # rows 0-2 score 4 with every column, the rest 0
    scores, idx = kernels.tucker_topk(s_row, torch.ones(1, 8, 2), torch.ones(1, 2, 2), 5, k=4)
    assert idx.tolist() == [[0, 1, 2, 3, 8]] and scores.sum(-1).tolist() == [[4.0] * 5]


# ---------------------------------------------------------------------------------------------
# quadrants = 2: the contract by brute force, recall at init
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,k,m,c", [(23, 6, 11, 2), (9, 5, 8, 1), (64, 16, 16, 2)])
def test_two_quadrants_match_reference_and_contract(n, k, m, c):
    """k = 5 of n = 9: the (+) and (-) candidate sets overlap and shared pairs count once."""
    args = make_inputs(lead=(3,), n=n, c=c, seed=n)
    assert_matches_reference(args, m, k=k, quadrants=2)
    scores, idx = kernels.tucker_topk(*args, m, k=k, quadrants=2)
    want_scores, want_idx = contract_topk(*args, m, k, quadrants=2)
    assert torch.equal(idx, want_idx)
    torch.testing.assert_close(scores, want_scores, atol=1e-5, rtol=1e-5)
    assert all(len(set(row)) == m for row in idx.tolist())  # distinct slots


def test_two_quadrants_with_an_empty_second_quadrant(monkeypatch):
    """k = n: every (-,-) pair is a (+,+) candidate already, so the second quadrant writes no winner.
    Its slots must count as empty: with scratch memory that held slot id 0 (the best pair here), a
    stale slot would enter the final top m a second time."""
    def zero_empty(shape, dtype, device):
        t = torch.empty(shape, dtype=dtype, device=device)
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(0)

    monkeypatch.setattr(config, "empty", zero_empty)
    s_row, s_col, cores = (x.detach() for x in make_inputs(lead=(3,), n=4, r=2, c=2, seed=3))
    cores = cores.abs() + 0.1  # positive cores: the best pair is the one with the largest factors
    s_row[:, 0], s_col[:, 0] = 5.0, 5.0  # slot id 0 = (row 0, column 0) has the largest grid value
    scores, idx = kernels.tucker_topk(s_row, s_col, cores, 16, k=4, quadrants=2)
    want_s, want_i = contract_topk(s_row, s_col, cores, 16, 4, quadrants=2)
    assert all(len(set(row.tolist())) == 16 for row in idx)  # all 16 pairs, none twice
    assert torch.equal(idx, want_i)
    torch.testing.assert_close(scores, want_s)


def test_two_quadrants_recall_at_init():
    """Recall of the exact top-m at init (random tokens through a fresh TuckerRetrieval): >= 0.98."""
    torch.manual_seed(0)
    cfg = TuckerConfig(d_model=64, n_keys=64, d_key=32, rank=2, cores=2, topm=16)
    layer = TuckerRetrieval(cfg)
    with torch.no_grad():
        s_row, s_col = layer.axis_scores(torch.randn(16, cfg.d_model))  # [T, n, r]
        _, exact = retrieval.tucker_topk(s_row, s_col, layer.cores, cfg.topm, exact=True)
        _, one = retrieval.tucker_topk(s_row, s_col, layer.cores, cfg.topm)
        _, two = kernels.tucker_topk(s_row, s_col, layer.cores, cfg.topm, quadrants=2)
        assert torch.equal(two, retrieval.tucker_topk(s_row, s_col, layer.cores, cfg.topm, quadrants=2)[1])
    recall = [(exact[..., :, None] == got[..., None, :]).any(-1).float().mean().item() for got in (one, two)]
    assert recall[1] >= 0.98 and recall[0] < 0.7, recall


# ---------------------------------------------------------------------------------------------
# gradients, torch.compile, validation, AOT specs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quadrants", [1, 2])
def test_gradcheck_float64(quadrants):
    args = make_inputs(lead=(2,), n=6, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda *a: kernels.tucker_topk(*a, 4, k=3, quadrants=quadrants)[0], args,
                                    fast_mode=True)


def test_backward_rows_picked_twice_sum_exactly():
    """k = m = 8 of n = 8 with a near-rank-1 core: rows repeat across the selected pairs."""
    args = make_inputs(lead=(2,), n=8, seed=7)
    assert_matches_reference(args, 8)
    _, idx = kernels.tucker_topk(*args, 8)
    assert any(len(set((row // 8).tolist())) < 8 for row in idx)  # some row was picked twice


def test_compiles_without_graph_breaks():
    import torch._dynamo

    torch._dynamo.reset()
    args = make_inputs(lead=(2,), n=9)
    u, v = retrieval.rank1_factors(args[2])

    def step(s_row, s_col, cores):
        scores, idx = kernels.tucker_topk(s_row, s_col, cores, 4, k=3, rank1=(u, v), quadrants=2)
        return scores.sum(), idx

    explained = torch._dynamo.explain(step)(*args)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    loss, idx = compiled(*args)
    got = torch.autograd.grad(loss, args)
    want_loss, want_idx = step(*args)
    assert torch.equal(idx, want_idx)
    for a, b in zip(got, torch.autograd.grad(want_loss, args)):
        torch.testing.assert_close(a, b)


def bad_inputs():
    s_row, s_col, cores = (t.detach() for t in make_inputs(lead=(3,), n=8))
    return [
        ("shape mismatch", (s_row, s_col[:, :5], cores, 4), {}),
        ("core rank", (s_row, s_col, torch.rand(2, 3, 3), 4), {}),
        ("cores 2-d", (s_row, s_col, cores[0], 4), {}),
        ("int scores", (s_row.long(), s_col.long(), cores, 4), {}),
        ("dtype mismatch", (s_row, s_col, cores.double(), 4), {}),
        ("m too large", (s_row, s_col, cores, 65), {}),
        ("m zero", (s_row, s_col, cores, 0), {}),
        ("k > n", (s_row, s_col, cores, 4), {"k": 9}),
        ("k*k < m", (s_row, s_col, cores, 10), {"k": 3}),
        ("s_row 1-d", (s_row[0, :, 0], s_col[0, :, 0], cores, 4), {}),
        ("quadrants 3", (s_row, s_col, cores, 4), {"quadrants": 3}),
        ("quadrants bool", (s_row, s_col, cores, 4), {"quadrants": True}),
        ("quadrants with exact", (s_row, s_col, cores, 4), {"quadrants": 0, "exact": True}),
    ]


@pytest.mark.parametrize("label,args,kw", bad_inputs(), ids=[b[0] for b in bad_inputs()])
def test_bad_input_refused_like_reference(label, args, kw):
    with pytest.raises(Exception) as want:
        retrieval.tucker_topk(*args, **kw)
    with pytest.raises(type(want.value)) as got:
        kernels.tucker_topk(*args, **kw)
    assert str(got.value) == str(want.value)


def test_bad_rank1_refused_before_launch():
    """The kernel reads r entries of u and v: a wrong shape is refused, not read out of bounds."""
    args = make_inputs(lead=(2,), n=8)
    u, v = retrieval.rank1_factors(args[2])
    for bad, match in [((u[:1], v), r"rank1\[0\] must have shape \[r\] = \[2\]"), ((u, v[None]), r"rank1\[1\]"),
                       (u, "rank1 must be a pair"), ((u, v.long()), "floating-point")]:
        with pytest.raises((ValueError, TypeError), match=match):
            kernels.tucker_topk(*args, 4, rank1=bad)


def test_aot_specs_cover_the_kernels_arguments():
    specs = topk.aot_specs()
    names = [s["name"] for s in specs]
    assert len(names) == len(set(names)) and len(specs) >= 16
    for s in specs:
        args = s["fn"].arg_names
        assert set(s["signature"]) == set(args), s["name"]
        const = {a for a, ty in s["signature"].items() if ty == "constexpr"}
        assert const == set(s["constexprs"]), s["name"]
        assert s["num_warps"] in (4, 8, 16) and s["num_stages"] >= 1
    covered = {(s["constexprs"].get("K"), s["constexprs"].get("C"), s["constexprs"].get("QUAD"), s["signature"]["srow_ptr"])
               for s in specs if s["fn"] is topk._tucker_topk_fwd_kernel}
    assert covered == {(km, c, q, dt) for km in (32, 128) for c in (1, 2) for q in (1, 2) for dt in ("*bf16", "*fp32")}
