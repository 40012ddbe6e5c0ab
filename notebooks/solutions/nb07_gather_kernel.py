"""Solution of nb07_gather_kernel: a Triton kernel for the bag's weight gradient dw[t, k] = <g[t], V[idx[t, k]]>."""
import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before importing triton

import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def weight_grad_kernel(table_ptr, idx_ptr, g_ptr, dw_ptr, T, K, D, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT] this program's tokens
    d = tl.arange(0, BLOCK_D)  # [BD] channels, padded to a power of two
    tok = t < T  # [BT] the last block is partial
    ok = tok[:, None] & (d < D)[None, :]  # [BT, BD]
    g = tl.load(g_ptr + t[:, None] * D + d[None, :], mask=ok, other=0.0)  # [BT, BD] loaded once
    for k in range(K):
        row = tl.load(idx_ptr + t * K + k, mask=tok, other=0)  # [BT] k-th slot of each token
        v = tl.load(table_ptr + row[:, None] * D + d[None, :], mask=ok, other=0.0)  # [BT, BD] gather
        tl.store(dw_ptr + t * K + k, tl.sum(v * g, axis=1), mask=tok)  # [BT] one dot product per token


def solution(table, idx, g):
    # table [N, D]; idx [T, k]; g [T, D] -> dw [T, k]
    device = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
    table, idx, g = (a.to(device).contiguous() for a in (table, idx, g))
    T, K = idx.shape
    dw = torch.empty(T, K, device=device)  # [T, k] every entry written by the kernel
    block_t = 4
    weight_grad_kernel[(triton.cdiv(T, block_t),)](table, idx, g, dw, T, K, table.shape[1],
                                                   BLOCK_T=block_t, BLOCK_D=triton.next_power_of_2(table.shape[1]))
    return dw.cpu()
