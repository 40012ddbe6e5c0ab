"""Solution of nb04_peer_expert: PEER's f(x) = sum_i g_i * gelu(u_i . x) * v_i."""
import torch
import torch.nn.functional as F


def solution(x, u, v, idx, g):
    # x [T, d]; u, v [N, d]; idx, g [T, k]
    a = torch.einsum("tkd,td->tk", u[idx], x)  # [T, k] one neuron per expert
    return torch.einsum("tk,tkd->td", g * F.gelu(a), v[idx])  # [T, d]
