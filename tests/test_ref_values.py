"""The fast value paths (embedding_bag, index_select + dot) against their one-line einsum definitions.

``weighted_sum`` and ``peer_values`` are computed with PyTorch's fused gathers; what they compute
is written as einsums over materialised rows (``values.pool`` and the pre-value einsum).  Outputs
and every gradient must agree to float32 round-off, and float64 gradcheck must pass (also in
tests/test_ref_gradcheck.py).
"""
import pytest
import torch
from torch.autograd import gradcheck

from umv2_ref.values import bag_sum, peer_values, pool, weighted_sum

SHAPES = [  # (lead, N, m, D, c): c = 0 means one weight per slot
    ((7,), 10, 4, 8, 0), ((2, 3), 12, 5, 6, 2), ((4,), 9, 3, 6, 3), ((), 5, 4, 4, 0), ((), 5, 4, 4, 2),
    ((3,), 6, 0, 4, 0), ((3,), 6, 0, 4, 2), ((0,), 6, 3, 4, 0), ((0, 2), 6, 3, 4, 2), ((5,), 1, 6, 4, 2),
]


def einsum_peer(x_pre, pre_table, table, indices, scores, act=None):
    """The definition: ``a = act(<P[i], x>)``, ``z = pool(V[indices], a * s)``."""
    a = torch.einsum("...md,...d->...m", pre_table[indices], x_pre)
    if act is not None:
        a = act(a)
    w = a[..., None] * scores if scores.dim() > a.dim() else a * scores
    return pool(table[indices], w)


def leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def grads_of(fn, inputs, g):
    out = fn(*inputs)
    return out, torch.autograd.grad(out, inputs, g, allow_unused=True)


@pytest.mark.parametrize("lead,N,m,D,c", SHAPES)
def test_weighted_sum_equals_the_einsum_definition(lead, N, m, D, c):
    torch.manual_seed(0)
    table = torch.randn(N, D)
    indices = torch.randint(0, N, (*lead, m))
    weights = torch.randn(*lead, m, *((c,) if c else ()))
    g = torch.randn(*lead, D)
    fast, fast_g = grads_of(lambda t, w: weighted_sum(t, indices, w), leaves(table, weights), g)
    ref, ref_g = grads_of(lambda t, w: pool(t[indices], w), leaves(table, weights), g)
    torch.testing.assert_close(fast, ref)
    for a, b in zip(fast_g, ref_g):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("lead,N,m,D,c", SHAPES)
@pytest.mark.parametrize("activation", [None, "gelu"])
def test_peer_values_equal_the_einsum_definition(lead, N, m, D, c, activation):
    torch.manual_seed(1)
    d_pre = 5
    inputs = leaves(torch.randn(*lead, d_pre), torch.randn(N, d_pre), torch.randn(N, D),
                    torch.randn(*lead, m, *((c,) if c else ())))
    indices = torch.randint(0, N, (*lead, m))
    g = torch.randn(*lead, D)
    act = torch.nn.functional.gelu if activation else None
    fast, fast_g = grads_of(lambda x, p, t, s: peer_values(x, p, t, indices, s, activation), inputs, g)
    ref, ref_g = grads_of(lambda x, p, t, s: einsum_peer(x, p, t, indices, s, act), inputs, g)
    torch.testing.assert_close(fast, ref)
    for a, b in zip(fast_g, ref_g):
        torch.testing.assert_close(a, b)


def test_duplicates_non_contiguous_and_int32_inputs():
    """Every occurrence of a row adds; strided tables and int32 indices take the same path."""
    torch.manual_seed(2)
    big = torch.randn(8, 12)
    table = big[:, ::2]  # [8, 6], non-contiguous
    indices = torch.tensor([[3, 3, 3, 0], [7, 1, 7, 1]], dtype=torch.int32)
    for weights in (torch.randn(2, 4), torch.randn(2, 4, 2)):
        torch.testing.assert_close(bag_sum(table, indices, weights), pool(table[indices.long()], weights))


def test_float64_gradcheck_of_the_fast_paths():
    torch.manual_seed(3)
    f64 = dict(dtype=torch.float64, requires_grad=True)
    table, pre = torch.randn(6, 4, **f64), torch.randn(6, 3, **f64)
    indices = torch.tensor([[0, 5, 5], [2, 2, 1]])
    for scores in (torch.randn(2, 3, **f64), torch.randn(2, 3, 2, **f64)):
        assert gradcheck(lambda t, s: weighted_sum(t, indices, s), (table, scores))
        x = torch.randn(2, 3, **f64)
        assert gradcheck(lambda x_, p, t, s: peer_values(x_, p, t, indices, s, "silu"), (x, pre, table, scores))
