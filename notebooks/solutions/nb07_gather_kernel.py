"""Solution of nb07_gather_kernel: a Triton kernel for z[t] = sum_k w[t, k] * table[idx[t, k]]."""
import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before importing triton

import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def bag_kernel(table_ptr, idx_ptr, w_ptr, out_ptr, T, K, D, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT] this program's tokens
    d = tl.arange(0, BLOCK_D)  # [BD]
    ok = (t < T)[:, None] & (d < D)[None, :]  # [BT, BD] mask the tail block and the padded width
    acc = tl.full((BLOCK_T, BLOCK_D), 0.0, tl.float32)  # [BT, BD]
    for k in range(K):
        row = tl.load(idx_ptr + t * K + k, mask=t < T, other=0)  # [BT]
        w = tl.load(w_ptr + t * K + k, mask=t < T, other=0.0)  # [BT]
        acc += w[:, None] * tl.load(table_ptr + row[:, None] * D + d[None, :], mask=ok, other=0.0)
    tl.store(out_ptr + t[:, None] * D + d[None, :], acc, mask=ok)


def solution(table, idx, w):
    # table [N, D]; idx, w [T, k] -> [T, D]
    device = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else table.device
    table, idx, w = (a.to(device).contiguous() for a in (table, idx, w))
    T, K = idx.shape
    out = torch.empty(T, table.shape[1], device=device)  # [T, D] every entry written by the kernel
    block_t = 4
    bag_kernel[(triton.cdiv(T, block_t),)](table, idx, w, out, T, K, table.shape[1],
                                           BLOCK_T=block_t, BLOCK_D=triton.next_power_of_2(table.shape[1]))
    return out.cpu()
