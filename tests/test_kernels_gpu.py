"""Compiled (non-interpreted) kernels on a CUDA GPU: fp32 and bf16 tolerance contract.

Skipped without a GPU (tests/conftest.py).  The reference runs in float64 on the same inputs, so
the check measures the kernel's own error; see kernels/README.md for the contract.
"""
import pytest
import torch

import kernels
from umv2_ref import retrieval, values

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def lookup_inputs(dtype, T=1000, m=32, N=5000, DP=192, DV=192, c=2, dup=False):
    dev = "cuda"
    x = torch.randn(T, DP, device=dev).to(dtype).requires_grad_()  # [T, D_p]
    pre = (torch.randn(N, DP, device=dev) * DP**-0.5).to(dtype).requires_grad_()  # [N, D_p]
    table = torch.randn(N, DV, device=dev).to(dtype).requires_grad_()  # [N, D_v]
    idx = torch.randint(0, 7 if dup else N, (T, m), device=dev)  # [T, m]
    s = (torch.randn(T, m, c, device=dev) / m).to(dtype).requires_grad_()  # [T, m, c]
    return x, pre, table, idx, s


def grads(fn, args, g):
    out = fn(*args)
    diff = [a for a in args if a.is_floating_point()]
    return [out, *torch.autograd.grad(out, diff, g.to(out.dtype))]


def assert_close_to_fp64(fn_kernel, fn_ref, args, dtype):
    wide = [a.detach().double().requires_grad_() if a.is_floating_point() else a for a in args]
    g = torch.randn(args[3].shape[0], args[2].shape[1], device="cuda", dtype=torch.float64)  # [T, D_v]
    want = grads(fn_ref, wide, g)
    got = grads(fn_kernel, args, g)
    for a, b in zip(got, want):
        scale = b.abs().max().clamp_min(1.0)
        torch.testing.assert_close(a.double() / scale, b / scale, **TOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("algo", ["atomic", "sorted"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dup", [False, True])
def test_peer_values_gpu(dtype, algo, dup):
    args = lookup_inputs(dtype, dup=dup)
    with kernels.table_grad(algo):
        assert_close_to_fp64(lambda *a: kernels.peer_values(*a, "gelu"), lambda *a: values.peer_values(*a, "gelu"),
                             args, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weighted_sum_gpu(dtype):
    x, pre, table, idx, s = lookup_inputs(dtype, DV=256, c=1)
    w = s[..., 0].detach().requires_grad_()
    out = kernels.weighted_sum(table, idx, w)
    ref = values.weighted_sum(table.double(), idx, w.double())
    torch.testing.assert_close(out.double(), ref, **TOL[dtype])


@pytest.mark.gpu
def test_sorted_backward_bitwise_gpu():
    args = lookup_inputs(torch.bfloat16, dup=True)
    g = torch.randn(args[3].shape[0], args[2].shape[1], device="cuda", dtype=torch.bfloat16)
    with kernels.table_grad("sorted"):
        first, second = (grads(kernels.peer_values, args, g) for _ in range(2))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("k,m", [(32, 32), (128, 128)])
def test_tucker_topk_gpu(k, m):
    s_row = torch.randn(256, 1024, 2, device="cuda")  # [T, n, r]
    s_col = torch.randn(256, 1024, 2, device="cuda")  # [T, n, r]
    cores = torch.rand(2, 2, 2, device="cuda")  # [c, r, r]
    got_s, got_i = kernels.tucker_topk(s_row, s_col, cores, m, k=k)
    want_s, want_i = retrieval.tucker_topk(s_row, s_col, cores, m, k=k)
    assert (got_i == want_i).float().mean() > 0.999  # fp32 near-ties may swap neighbours
    torch.testing.assert_close(got_s.sum(-1), want_s.sum(-1), **TOL[torch.float32])
