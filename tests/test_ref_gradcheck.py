"""Every differentiable reference function and layer passes torch.autograd.gradcheck in float64.

Top-k selection is piecewise constant; the checks use inputs whose sorted scores are at least
1e-4 apart (asserted), 100x gradcheck's perturbation eps = 1e-6, so the selection is fixed around
the point.
"""
import pytest
import torch
from torch.autograd import gradcheck

from umv2_ref.layers import (
    PEER,
    PKM,
    MemoryPlus,
    PKMConfig,
    UltraMem,
    UltraMemConfig,
    UltraMemV2,
    UltraMemV2Config,
)
from umv2_ref.retrieval import key_balance_loss, rank1_factors, tucker_grid, tucker_rank_penalty, tucker_topk
from umv2_ref.values import expanded_lookup, peer_values, weighted_sum

F64 = torch.float64


def rand(*shape):
    return torch.randn(*shape, dtype=F64, requires_grad=True)


def min_gap(values: torch.Tensor) -> float:
    """Smallest difference between neighbouring sorted values along the last dim."""
    v = values.detach().sort(-1).values
    return (v[..., 1:] - v[..., :-1]).min().item()


@pytest.mark.parametrize("cores", [None, 2])
def test_weighted_sum(cores):
    table = rand(10, 8)
    indices = torch.tensor([[0, 3, 3, 9], [1, 2, 5, 0], [7, 7, 7, 4]])  # duplicates included
    weights = rand(3, 4) if cores is None else rand(3, 4, cores)
    assert gradcheck(lambda t, w: weighted_sum(t, indices, w), (table, weights))


@pytest.mark.parametrize("cores", [None, 2])
@pytest.mark.parametrize("activation", [None, "gelu", "silu"])
def test_peer_values(cores, activation):
    n, d_p, d_v = 12, 6, 4
    x_pre, pre_table, table = rand(2, 3, d_p), rand(n, d_p), rand(n, d_v)
    indices = torch.randint(0, n, (2, 3, 5))
    scores = rand(2, 3, 5) if cores is None else rand(2, 3, 5, cores)
    fn = lambda x, p, t, s: peer_values(x, p, t, indices, s, activation)  # noqa: E731
    assert gradcheck(fn, (x_pre, pre_table, table, scores))


@pytest.mark.parametrize("cores", [None, 2])
def test_expanded_lookup(cores):
    blocks, n_rows = 3, 5
    table = rand(n_rows, 4)
    shuffle = torch.randperm(blocks * n_rows)
    virtual = torch.randint(0, blocks * n_rows, (2, 6))
    scores = rand(2, 6) if cores is None else rand(2, 6, cores)
    assert gradcheck(lambda t, s: expanded_lookup(t, virtual, s, shuffle, blocks), (table, scores))


@pytest.mark.parametrize("exact,quadrants", [(True, 1), (False, 1), (False, 2)])
def test_tucker_topk_scores(exact, quadrants):
    torch.manual_seed(3)
    n, r, c, m = 6, 2, 2, 4
    s_row, s_col, cores = rand(2, n, r), rand(2, n, r), torch.rand(c, r, r, dtype=F64).requires_grad_()
    u, v = rank1_factors(cores)
    assert min_gap(tucker_grid(s_row, s_col, cores).sum(-3).flatten(-2)) > 1e-4  # selection and order fixed
    assert min(min_gap(s_row @ u), min_gap(s_col @ v)) > 1e-4  # prefilter candidates fixed

    def fn(sr, sc, cs):
        return tucker_topk(sr, sc, cs, m, exact=exact, rank1=(u, v), quadrants=quadrants)[0]

    assert gradcheck(fn, (s_row, s_col, cores))


@pytest.mark.parametrize("singular", [(2.0, 0.5), (2.5, 0.6, 0.05)])
def test_tucker_rank_penalty(singular):
    """Singular values distinct and away from the margin tau = 0.15 (relu kink, SVD degeneracy)."""
    r = len(singular)
    q1, _ = torch.linalg.qr(torch.randn(r, r, dtype=F64))
    q2, _ = torch.linalg.qr(torch.randn(r, r, dtype=F64))
    total = q1 @ torch.diag(torch.tensor(singular, dtype=F64)) @ q2.T
    split = torch.rand(r, r, dtype=F64)
    cores = torch.stack([total * split, total * (1 - split)]).requires_grad_()  # sums to `total`
    assert tucker_rank_penalty(cores).item() > 0
    assert gradcheck(tucker_rank_penalty, (cores,))


def test_key_balance_loss():
    a, b = rand(7, 5), rand(7, 5)
    rows, cols = torch.randint(0, 5, (7, 3)), torch.randint(0, 5, (7, 3))
    assert gradcheck(lambda x, y: key_balance_loss(x, y, rows, cols), (a, b))


LAYERS = {
    "pkm": lambda: PKM(PKMConfig(d_model=8, n_keys=5, d_key=4, heads=2, topk=3)),
    "peer": lambda: PEER(PKMConfig(d_model=8, n_keys=5, d_key=4, heads=2, topk=3, query_norm="layer")),
    "memory_plus": lambda: MemoryPlus(PKMConfig(d_model=8, n_keys=5, d_key=4, heads=2, topk=3, d_value=6)),
    "ultramem": lambda: UltraMem(UltraMemConfig(d_model=8, n_keys=6, d_key=4, topm=4, d_value=4, expand=4,
                                                tucker_penalty=1e-3, balance_loss=1e-3)),
    "ultramem_3heads": lambda: UltraMem(UltraMemConfig(d_model=8, n_keys=6, d_key=4, topm=4, d_value=4, expand=4,
                                                       heads=3, tucker_penalty=1e-3, balance_loss=1e-3)),
    "ultramemv2": lambda: UltraMemV2(UltraMemV2Config(d_model=8, n_keys=6, d_key=4, topm=4, d_pre=4, d_value=4,
                                                      tucker_penalty=1e-3, balance_loss=1e-3)),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_output_wrt_input(name):
    torch.manual_seed(1)
    layer = LAYERS[name]().double()
    x = rand(5, 8)
    assert gradcheck(lambda inp: layer(inp).output, (x,))
