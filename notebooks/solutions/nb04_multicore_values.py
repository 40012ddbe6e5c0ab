"""Solution of nb04_multicore_values: UltraMemV2 Eq. 15 with per-core channel slices."""
import torch


def solution(x_pre, pre_table, table, indices, scores):
    # x_pre [T, D_p]; pre_table [N, D_p]; table [N, D_v]; indices [T, m]; scores [T, m, c]
    c = scores.shape[-1]
    a = torch.einsum("tmd,td->tm", pre_table[indices], x_pre)  # [T, m] pre-scores, no activation
    w = a[..., None] * scores  # [T, m, c]
    rows = table[indices].unflatten(-1, (c, -1))  # [T, m, c, D_v/c] contiguous slices
    return torch.einsum("tmc,tmcj->tcj", w, rows).flatten(-2)  # [T, D_v]
