"""Solution of nb04_contribution_norms: || concat_c a_i s_i^(c) V[i, slice c] || per selected slot."""
import torch


def solution(x_pre, pre_table, table, indices, scores):
    c = scores.shape[-1]
    a = torch.einsum("tmd,td->tm", pre_table[indices], x_pre)  # [T, m]
    rows = table[indices].unflatten(-1, (c, -1))  # [T, m, c, D_v/c]
    slice_norms = rows.norm(dim=-1)  # [T, m, c]
    return (a[..., None] * scores * slice_norms).pow(2).sum(-1).sqrt()  # [T, m]
