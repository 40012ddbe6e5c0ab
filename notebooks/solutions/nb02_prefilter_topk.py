"""Solution of nb02_prefilter_topk: rank-1 candidates, full-core rescoring, top-m."""


def solution(s_row, s_col, cores, u, v, m, k):
    # s_row, s_col [B, n, r]; cores [c, r, r]; u, v [r]
    n = s_row.shape[1]
    a, b = s_row @ u, s_col @ v  # [B, n] one rank-1 score per key
    idx_r = a.topk(k, dim=-1).indices  # [B, k] candidate rows
    idx_c = b.topk(k, dim=-1).indices  # [B, k] candidate columns
    sr = s_row.gather(1, idx_r[..., None].expand(-1, -1, s_row.shape[-1]))  # [B, k, r]
    sc = s_col.gather(1, idx_c[..., None].expand(-1, -1, s_col.shape[-1]))  # [B, k, r]
    cand = sr @ cores.sum(0) @ sc.transpose(1, 2)  # [B, k, k] full-core scores of the candidates
    scores, flat = cand.flatten(1).topk(m, dim=-1)  # [B, m], sorted descending
    rows, cols = idx_r.gather(1, flat // k), idx_c.gather(1, flat % k)
    return scores, rows * n + cols
