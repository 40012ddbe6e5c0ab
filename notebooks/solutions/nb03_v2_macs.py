"""Solution of nb03_v2_macs: UltraMemV2 multiply-accumulates per token with k candidates per axis (docs/references.md Sec. 7.9)."""


def solution(d, n_keys, d_key, rank, cores, topm, d_pre, d_value, k):
    queries = 2 * rank * d * d_key  # one row and one column query per Tucker rank
    key_scores = 2 * n_keys * d_key * rank  # S_row and S_col
    rank1 = 2 * n_keys * rank  # a = S_row u, b = S_col v
    rescoring = cores * (k * rank**2 + k**2 * rank)  # full cores on the k x k candidates
    values = d * d_pre + topm * (d_pre + d_value) + d_value * d  # W_pre x, pre-scores + pooling, W_v z
    return queries + key_scores + rank1 + rescoring + values
