"""kernels.peer_values / kernels.weighted_sum against umv2_ref.values (Triton interpreter on CPU).

Sizes are deliberately awkward: T = 38 tokens (two full blocks of 16 and a tail of 6), m = 5,
N = 97 rows, D_p = 12 and D_v = 18 (not powers of two; 18 = 3 cores x 6 or 2 x 9).  Every buffer
a kernel writes is pre-filled with NaN by the ``poisoned`` fixture.
"""
import pytest
import torch

import triton

import kernels
from kernels import config, lookup
from umv2_ref import values

T_SHAPE, M, N, DP, DV = (2, 19), 5, 97, 12, 18


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    """Kernel outputs start as NaN: a kernel that skips a store leaves NaN and fails the test."""
    calls = []

    def nan_empty(shape, dtype, device):
        calls.append(shape)
        t = torch.empty(shape, dtype=dtype, device=device)
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-(2**31))

    monkeypatch.setattr(config, "empty", nan_empty)
    return calls


def make_inputs(c: int | None, dup: bool = False, lead=T_SHAPE, m=M, dtype=torch.float32):
    """Random x_pre, P, V, indices, scores; ``dup`` draws indices from 3 rows (repeats everywhere)."""
    x = torch.randn(*lead, DP, dtype=dtype, requires_grad=True)  # [..., D_p]
    pre = torch.randn(N, DP, dtype=dtype, requires_grad=True)  # [N, D_p]
    table = torch.randn(N, DV, dtype=dtype, requires_grad=True)  # [N, D_v]
    idx = torch.randint(0, 3 if dup else N, (*lead, m))  # [..., m]
    s_shape = (*lead, m) if c is None else (*lead, m, c)
    scores = torch.randn(s_shape, dtype=dtype, requires_grad=True)  # [..., m(, c)]
    return x, pre, table, idx, scores


def run(fn, args, grad_out=None):
    """Output and gradients w.r.t. every floating input that requires grad."""
    out = fn(*args)
    diff = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    g = torch.randn_like(out) if grad_out is None else grad_out
    return out, torch.autograd.grad(out, diff, g), g


def assert_matches(kernel_fn, ref_fn, args, atol=2e-5, rtol=1e-5):
    out, grads, g = run(kernel_fn, args)
    ref, ref_grads, _ = run(ref_fn, args, g)
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol)


def peer(act):
    return lambda x, p, v, i, s: kernels.peer_values(x, p, v, i, s, act)


def peer_ref(act):
    return lambda x, p, v, i, s: values.peer_values(x, p, v, i, s, act)


# Every activation x core layout with the default (sorted) table gradients; the activation only
# changes the token kernels, so the atomic table gradients get two of the combinations.
PEER_CASES = [(act, c, "sorted") for act in (None, "relu", "gelu", "silu") for c in (None, 3)]
PEER_CASES += [(None, None, "atomic"), ("gelu", 3, "atomic")]


@pytest.mark.parametrize("act,c,algo", PEER_CASES)
def test_peer_values_matches_reference(act, c, algo, poisoned):
    with kernels.table_grad(algo):
        assert_matches(peer(act), peer_ref(act), make_inputs(c))
    assert poisoned, "the kernels must allocate through kernels.config.empty"


@pytest.mark.parametrize("algo", ["atomic", "sorted"])
@pytest.mark.parametrize("c", [None, 2])
def test_weighted_sum_matches_reference(c, algo):
    _, _, table, idx, w = make_inputs(c)
    with kernels.table_grad(algo):
        assert_matches(kernels.weighted_sum, values.weighted_sum, (table, idx, w))


@pytest.mark.parametrize("algo", ["atomic", "sorted"])
def test_duplicate_indices_within_and_across_tokens(algo):
    x, pre, table, idx, s = make_inputs(2, dup=True)
    idx[0, 0] = torch.tensor([1, 1, 1, 2, 1])  # one token reads row 1 four times
    assert (idx == 1).sum() > 10
    with kernels.table_grad(algo):
        assert_matches(peer("gelu"), peer_ref("gelu"), (x, pre, table, idx, s))
        assert_matches(kernels.weighted_sum, values.weighted_sum, (table, idx, s))


def test_non_contiguous_inputs():
    x, pre, table, idx, s = make_inputs(3)
    x_t = x.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()  # [..., D_p] strided
    table_s = torch.randn(N, 2 * DV)[:, 1 : DV + 1].requires_grad_()  # [N, D_v] with row stride 2*D_v
    pre_t = pre.detach().t().contiguous().t().requires_grad_()  # column-major [N, D_p]
    idx_t = idx.transpose(0, 1).contiguous().transpose(0, 1)  # [..., m] strided
    s_t = s.detach().permute(3, 0, 1, 2).contiguous().permute(1, 2, 3, 0).requires_grad_()  # [..., m, c] strided
    assert not any(t.is_contiguous() for t in (x_t, table_s, pre_t, idx_t, s_t))
    for algo in ("atomic", "sorted"):
        with kernels.table_grad(algo):
            assert_matches(peer("silu"), peer_ref("silu"), (x_t, pre_t, table_s, idx_t, s_t))


def test_empty_batch():
    x, pre, table, idx, s = make_inputs(3, lead=(0, 4))
    out = kernels.peer_values(x, pre, table, idx, s)
    assert out.shape == (0, 4, DV)
    d_pre, d_table = torch.autograd.grad(out.sum(), (pre, table))
    assert torch.equal(d_pre, torch.zeros_like(pre)) and torch.equal(d_table, torch.zeros_like(table))
    _, _, table, idx, w = make_inputs(None, lead=(0,))
    assert kernels.weighted_sum(table, idx, w).shape == (0, DV)


def test_no_slots():
    x, pre, table, idx, s = make_inputs(None, m=0)
    assert_matches(peer(None), peer_ref(None), (x, pre, table, idx, s))


def test_sorted_backward_is_bitwise_reproducible():
    x, pre, table, idx, s = make_inputs(2, dup=True)
    g = torch.randn(*T_SHAPE, DV)
    with kernels.table_grad("sorted"):
        first = run(peer("gelu"), (x, pre, table, idx, s), g)[1]
        second = run(peer("gelu"), (x, pre, table, idx, s), g)[1]
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_auto_table_grad_is_sorted():
    with kernels.table_grad("auto"):
        assert config.resolve_table_grad() == "sorted"
    with kernels.table_grad("atomic"):
        assert config.resolve_table_grad() == "atomic"
    with pytest.raises(ValueError, match="table_grad"):
        with kernels.table_grad("fast"):
            pass


@pytest.mark.parametrize("hot", [0, 4, 1000])
def test_sorted_hot_and_cold_rows_mixed(hot, monkeypatch):
    """Skewed reads: a few rows read ~60 times (hot-row kernel), the rest a few times (row blocks).

    ``hot=0`` sends every read row to the hot-row kernel, ``1000`` none; both kernels write into
    NaN-poisoned outputs, so a row written by neither (or a hot row also zeroed) fails.
    """
    monkeypatch.setattr(config.CONFIG, "hot_rows", hot)
    x, pre, table, idx, s = make_inputs(2)
    idx[..., :3] = torch.randint(0, 3, (*T_SHAPE, 3))  # rows 0..2: ~38 reads each
    with kernels.table_grad("sorted"):
        assert_matches(peer("relu"), peer_ref("relu"), (x, pre, table, idx, s))
        assert_matches(kernels.weighted_sum, values.weighted_sum, (table, idx, s))


@pytest.mark.parametrize("algo", ["atomic", "sorted"])
@pytest.mark.parametrize("which", ["table", "pre_table", "scores"])
def test_partial_gradients(which, algo):
    """Only one input needs a gradient: the dV-only / dP-only specialisations of the table kernels."""
    x, pre, table, idx, s = (t.detach() for t in make_inputs(2))
    args = dict(x=x, pre_table=pre, table=table, scores=s)
    args[which] = args[which].clone().requires_grad_()
    ordered = (args["x"], args["pre_table"], args["table"], idx, args["scores"])
    with kernels.table_grad(algo):
        assert_matches(peer("gelu"), peer_ref("gelu"), ordered)


def test_sorted_path_allocates_no_zero_filled_buffer(monkeypatch, poisoned):
    """The sorted table gradient writes each row once: no torch.zeros, outputs from config.empty."""
    x, pre, table, idx, s = make_inputs(2)
    out = kernels.peer_values(x, pre, table, idx, s)
    g = torch.randn_like(out)

    def no_zeros(*args, **kwargs):
        raise AssertionError(f"torch.zeros{args} called on the sorted path")

    monkeypatch.setattr(torch, "zeros", no_zeros)
    with kernels.table_grad("sorted"):
        d_pre, d_table = torch.autograd.grad(out, (pre, table), g)
    assert (N, DP) in poisoned and (N, DV) in poisoned  # both [N, D] gradients came from config.empty
    assert d_pre.dtype == pre.dtype and d_table.dtype == table.dtype


def _single_config(monkeypatch, name, choice):
    """Replace an autotuned launcher by one fixed config (every GPU autotune candidate is checked here)."""
    kernel = getattr(lookup, name).fn
    cfg = triton.Config(dict(choice), num_warps=4, num_stages=choice.get("NUM_STAGES", 1))
    monkeypatch.setattr(lookup, name, triton.autotune([cfg], key=["DV"])(kernel))


@pytest.mark.parametrize("kind,name,choices", [
    ("fwd", "_lookup_fwd", lookup.FWD_CHOICES),
    ("bwd", "_lookup_bwd_token", lookup.BWD_CHOICES),
    ("rows", "_scatter_sorted", lookup.ROWS_CHOICES),
])
def test_every_autotune_candidate_matches_reference(kind, name, choices, monkeypatch):
    x, pre, table, idx, s = make_inputs(2, dup=True)
    for choice in choices[1:]:  # choices[0] is the default every other test runs
        with monkeypatch.context() as m:
            _single_config(m, name, choice)
            with kernels.table_grad("sorted"):
                assert_matches(peer("silu"), peer_ref("silu"), (x, pre, table, idx, s))
                assert_matches(kernels.weighted_sum, values.weighted_sum, (table, idx, s))


def test_kernels_never_read_outside_the_table():
    """Validation bypassed (the custom op is called directly): out-of-range rows contribute nothing."""
    x, pre, table, idx, s = (t.detach() for t in make_inputs(2))
    flat_idx, flat_s = idx.reshape(-1, M), s.reshape(-1, M, 2)
    bad = flat_idx.clone()
    bad[0, 1], bad[5, 0] = N + 10**6, -(10**6)
    got = lookup.lookup_op(x.reshape(-1, DP), pre, table, bad, flat_s, 0)  # [T, D_v]
    keep = (bad >= 0) & (bad < N)
    want = values.peer_values(x.reshape(-1, DP), pre, table, bad.clamp(0, N - 1), flat_s * keep[..., None])
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("algo", ["atomic", "sorted"])
def test_gradcheck_float64(algo):
    torch.manual_seed(1)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)  # [T, D_p]
    pre = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)  # [N, D_p]
    table = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)  # [N, D_v]
    idx = torch.tensor([[0, 2], [2, 2], [4, 1]])  # [T, m] with repeats
    s = torch.randn(3, 2, 2, dtype=torch.float64, requires_grad=True)  # [T, m, c]
    with kernels.table_grad(algo):
        assert torch.autograd.gradcheck(lambda *a: kernels.peer_values(*a, idx, s, "gelu"), (x, pre, table), fast_mode=True)
        assert torch.autograd.gradcheck(lambda sc: kernels.peer_values(x, pre, table, idx, sc, "silu"), (s,), fast_mode=True)
        assert torch.autograd.gradcheck(lambda t, w: kernels.weighted_sum(t, idx, w), (table, s), fast_mode=True)


def bad_inputs():
    """(label, args) pairs the reference refuses; the kernel must refuse them the same way."""
    x, pre, table, idx, s = (t.detach() for t in make_inputs(3))
    out_of_range = idx.clone()
    out_of_range[1, 3, 2] = N
    negative = idx.clone()
    negative[0, 0, 0] = -1
    return [
        ("index >= N", (x, pre, table, out_of_range, s)),
        ("negative index", (x, pre, table, negative, s)),
        ("float indices", (x, pre, table, idx.float(), s)),
        ("int table", (x, pre, table.long(), idx, s)),
        ("dtype mismatch", (x, pre, table, idx, s.double())),
        ("x_pre dtype", (x.double(), pre, table, idx, s)),
        ("device mismatch", (x, pre, table, idx, s.to("meta"))),
        ("scores shape", (x, pre, table, idx, s[..., :2, :])),
        ("cores do not divide D_v", (x, pre, table, idx, torch.randn(*T_SHAPE, M, 4))),
        ("x_pre shape", (x[..., :5], pre, table, idx, s)),
        ("pre_table rows", (x, pre[:-1], table, idx, s)),
        ("table 3-d", (x, pre, table[None], idx, s)),
        ("not a tensor", (x, pre, table.tolist(), idx, s)),
    ]


BAD = bad_inputs()
LOOKUP_ONLY = ("x_pre shape", "pre_table rows", "x_pre dtype")  # no x_pre / pre_table in weighted_sum


def assert_refused_alike(kernel_fn, ref_fn, args):
    with pytest.raises(Exception) as want:
        ref_fn(*args)
    with pytest.raises(type(want.value)) as got:
        kernel_fn(*args)
    assert str(got.value) == str(want.value)


@pytest.mark.parametrize("label,args", BAD, ids=[b[0] for b in BAD])
def test_bad_input_refused_like_reference(label, args):
    assert_refused_alike(kernels.peer_values, values.peer_values, args)
    if label not in LOOKUP_ONLY:
        assert_refused_alike(kernels.weighted_sum, values.weighted_sum, args[2:])


def test_bad_activation_refused():
    args = make_inputs(None)
    with pytest.raises(ValueError, match="activation"):
        kernels.peer_values(*args, "tanh")
