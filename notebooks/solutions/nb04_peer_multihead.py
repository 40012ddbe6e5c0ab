"""Solution of nb04_peer_multihead: PEER with H heads, a softmax per head, all heads summed."""
import torch
import torch.nn.functional as F


def solution(x, u, v, idx, scores):
    # x [T, d]; u, v [N, d]; idx, scores [T, H, k]
    g = scores.softmax(-1)  # [T, H, k] each head's k weights sum to 1
    a = torch.einsum("thkd,td->thk", u[idx], x)  # [T, H, k] one neuron per selected expert
    return torch.einsum("thk,thkd->td", g * F.gelu(a), v[idx])  # [T, d] summed over heads and slots
