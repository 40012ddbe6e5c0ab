"""kernels.tucker_topk against umv2_ref.retrieval.tucker_topk (approximate mode, interpreter on CPU).

Awkward sizes: n = 23 keys per axis, k = 6 candidates (BLOCK_K = 8 pads the grid), m = 11 slots,
lead dims (2, 5).  Continuous random scores, so ties have probability zero and the selected
indices must agree exactly.
"""
import pytest
import torch

import kernels
from kernels import config
from umv2_ref import retrieval


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    def nan_empty(shape, dtype, device):
        t = torch.empty(shape, dtype=dtype, device=device)
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-1)

    monkeypatch.setattr(config, "empty", nan_empty)


def make_inputs(lead=(2, 5), n=23, r=2, c=2, dtype=torch.float32):
    s_row = torch.randn(*lead, n, r, dtype=dtype, requires_grad=True)  # [..., n, r]
    s_col = torch.randn(*lead, n, r, dtype=dtype, requires_grad=True)  # [..., n, r]
    cores = torch.rand(c, r, r, dtype=dtype, requires_grad=True)  # [c, r, r]
    return s_row, s_col, cores


def assert_matches(args, m, **kw):
    scores, idx = kernels.tucker_topk(*args, m, **kw)
    ref_scores, ref_idx = retrieval.tucker_topk(*args, m, **kw)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(scores, ref_scores, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(scores)
    got = torch.autograd.grad(scores, args, g)
    want = torch.autograd.grad(ref_scores, args, g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("r,c", [(2, 2), (3, 1)])
def test_matches_reference(r, c):
    assert_matches(make_inputs(r=r, c=c), 11, k=6)


def test_default_k_and_given_rank1():
    args = make_inputs(lead=(3,), n=9)
    assert_matches(args, 4)  # k = m = 4
    u, v = retrieval.rank1_factors(args[2])
    assert_matches(args, 5, k=3, rank1=(-u, -v))  # the opposite quadrant


def test_sorted_descending_and_valid():
    scores, idx = kernels.tucker_topk(*make_inputs(), 11, k=6)
    total = scores.sum(-1)  # [..., m]
    assert (total[..., :-1] >= total[..., 1:]).all()
    assert ((idx >= 0) & (idx < 23 * 23)).all() and torch.isfinite(scores).all()


def test_exact_delegates_to_reference():
    args = make_inputs(lead=(4,), n=7)
    got = kernels.tucker_topk(*args, 5, exact=True)
    want = retrieval.tucker_topk(*args, 5, exact=True)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])


def test_non_contiguous_and_empty():
    s_row, s_col, cores = make_inputs(lead=(5, 2))
    strided = [t.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_() for t in (s_row, s_col)]
    assert not strided[0].is_contiguous()
    assert_matches((*strided, cores), 7, k=4)
    scores, idx = kernels.tucker_topk(*make_inputs(lead=(0, 3)), 4)
    assert scores.shape == (0, 3, 4, 2) and idx.shape == (0, 3, 4)


def test_gradcheck_float64():
    args = make_inputs(lead=(3,), n=6, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda *a: kernels.tucker_topk(*a, 4, k=3)[0], args, fast_mode=True)


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
    ]


@pytest.mark.parametrize("label,args,kw", bad_inputs(), ids=[b[0] for b in bad_inputs()])
def test_bad_input_refused_like_reference(label, args, kw):
    with pytest.raises(Exception) as want:
        retrieval.tucker_topk(*args, **kw)
    with pytest.raises(type(want.value)) as got:
        kernels.tucker_topk(*args, **kw)
    assert str(got.value) == str(want.value)
