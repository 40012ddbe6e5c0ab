"""Solution of nb01_product_key_topk: exact top-k of s_row[i] + s_col[j] from a k x k candidate block."""


def solution(s_row, s_col, k):
    # s_row, s_col [B, n]
    n = s_row.shape[-1]
    top_r, idx_r = s_row.topk(k, dim=-1)  # [B, k] best rows
    top_c, idx_c = s_col.topk(k, dim=-1)  # [B, k] best columns
    cand = top_r[:, :, None] + top_c[:, None, :]  # [B, k, k] every candidate pair
    scores, flat = cand.flatten(1).topk(k, dim=-1)  # [B, k] position in the k x k block
    rows = idx_r.gather(1, flat // k)  # [B, k] back to key ids
    cols = idx_c.gather(1, flat % k)
    return scores, rows * n + cols
