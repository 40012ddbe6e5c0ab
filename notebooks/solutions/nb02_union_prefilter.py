"""Solution of nb02_union_prefilter: top-m over the candidates of (u, v) and (-u, -v), each slot once."""
import torch

from umv2_ref.retrieval import tucker_topk


def solution(s_row, s_col, cores, u, v, m, k):
    # s_row, s_col [B, n, r]; cores [c, r, r]; u, v [r]
    pos_scores, pos_idx = tucker_topk(s_row, s_col, cores, m, k=k, rank1=(u, v))  # [B, m, c], [B, m]
    neg_scores, neg_idx = tucker_topk(s_row, s_col, cores, m, k=k, rank1=(-u, -v))
    both_scores = torch.cat([pos_scores.sum(-1), neg_scores.sum(-1)], -1)  # [B, 2m]
    both_idx = torch.cat([pos_idx, neg_idx], -1)  # [B, 2m]
    # a slot proposed by both quadrants (k > n/2) appears twice: keep its first copy only
    same = both_idx[:, :, None] == both_idx[:, None, :]  # [B, 2m, 2m]
    repeat = (same & torch.ones_like(same[0]).triu(1)).any(1)  # [B, 2m] equals an earlier entry
    best = both_scores.masked_fill(repeat, float("-inf")).topk(m, dim=-1)  # [B, m]
    return best.values, both_idx.gather(1, best.indices)
