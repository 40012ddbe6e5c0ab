"""torch.compile: the layers and the value kernels trace into one graph (0 graph breaks).

Validation used to read ``int(indices.min())`` on the host, which breaks the graph (and syncs a
GPU); ``umv2_ref.checks`` now defers value checks to ``torch._assert_async`` while compiling.  The
Triton value kernels are ``torch.library`` custom ops with fake implementations, so the compiler
treats each as one node.  Backend ``aot_eager`` (traces forward and backward, runs them eagerly):
it needs no C++ compiler and runs on CPU; breaks are counted with ``torch._dynamo.explain``.
"""
import pytest
import torch

import kernels
from kernels import lookup
from umv2_ref import UltraMemV2, UltraMemV2Config, checks, values
from umv2_ref.model import ModelConfig, TinyLM


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def assert_no_graph_breaks(fn, *args):
    explained = torch._dynamo.explain(fn)(*args)
    reasons = [b.reason.splitlines()[0] for b in explained.break_reasons]
    assert explained.graph_break_count == 0, reasons
    assert explained.graph_count == 1


def compiled_matches_eager(fn, params, *args):
    """fullgraph compile (raises on any break) gives the eager loss and gradients."""
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    want = fn(*args)
    want_grads = torch.autograd.grad(want, params)
    got = compiled(*args)
    got_grads = torch.autograd.grad(got, params)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_ultramemv2_layer_traces_whole():
    cfg = UltraMemV2Config(d_model=16, n_keys=8, d_key=8, rank=2, cores=2, topm=6, prefilter_k=4,
                           d_pre=10, d_value=12, backend="torch")
    layer = UltraMemV2(cfg)
    x = torch.randn(2, 5, 16)

    def loss(x):
        return layer(x).output.square().mean()

    assert_no_graph_breaks(loss, x)
    compiled_matches_eager(loss, list(layer.parameters()), x)


def test_two_layer_tinylm_traces_whole():
    cfg = ModelConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, max_seq_len=16, ffn="ultramemv2",
                      mem_knum=4, mem_topk=4, mem_d_key=8, backend="torch")
    model = TinyLM(cfg)
    tokens = torch.randint(0, 32, (2, 8))

    def loss(tokens):
        out = model(tokens)
        return out.logits.logsumexp(-1).mean() + sum(out.aux_losses.values(), torch.zeros(()))

    assert_no_graph_breaks(loss, tokens)
    compiled_matches_eager(loss, list(model.parameters()), tokens)


@pytest.mark.parametrize("algo", ["sorted", "atomic"])
def test_value_kernels_trace_whole(algo):
    x, pre, table = (torch.randn(7, 12), torch.randn(20, 12), torch.randn(20, 18))
    s = torch.randn(7, 3, 2)
    params = [t.requires_grad_() for t in (x, pre, table, s)]
    idx = torch.randint(0, 20, (7, 3))

    def loss(x, pre, table, idx, s):
        z = kernels.peer_values(x, pre, table, idx, s, "gelu") + kernels.weighted_sum(table, idx, s[..., 0])
        return z.square().sum()

    def reference(x, pre, table, idx, s):
        z = values.peer_values(x, pre, table, idx, s, "gelu") + values.weighted_sum(table, idx, s[..., 0])
        return z.square().sum()

    assert_no_graph_breaks(loss, x, pre, table, idx, s)
    with kernels.table_grad(algo):
        compiled_matches_eager(loss, params, x, pre, table, idx, s)
        got = torch.autograd.grad(torch.compile(loss, fullgraph=True, backend="aot_eager")(x, pre, table, idx, s), params)
    want = torch.autograd.grad(reference(x, pre, table, idx, s), params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)


def test_custom_ops_pass_opcheck():
    """Schema, fake (meta) implementations and autograd registration of the custom ops."""
    x, pre, table = torch.randn(5, 4), torch.randn(9, 4), torch.randn(9, 6)
    idx, s = torch.randint(0, 9, (5, 3)), torch.randn(5, 3, 2)
    for args in ((x, pre, table, idx, s, 2), (None, None, table, idx, s, 0)):
        grads = [a.clone().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                 for a in args]
        torch.library.opcheck(lookup.lookup_op, grads)


def test_index_check_is_device_side_under_compile():
    """While compiling, an out-of-range index raises at run time through torch._assert_async."""
    def read(idx):
        checks.require_indices_in_range("indices", idx, 5, "table")
        return idx * 2

    compiled = torch.compile(read, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(torch.tensor([0, 4])), torch.tensor([0, 8]))
    with pytest.raises(RuntimeError, match=r"indices must lie in \[0, 5\) \(the rows of table\)"):
        compiled(torch.tensor([1, 5]))
    with pytest.raises(ValueError, match=r"got values in \[1, 5\]"):  # eager CPU keeps the exact message
        read(torch.tensor([1, 5]))


def test_finite_check_is_device_side_under_compile():
    def scale(x):
        checks.require_finite("x", x)
        return x * 2

    compiled = torch.compile(scale, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(torch.ones(3)), torch.full((3,), 2.0))
    with pytest.raises(RuntimeError, match="x must be finite"):
        compiled(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="got 1 NaN or infinite entries of 2"):
        scale(torch.tensor([1.0, float("inf")]))
