"""Solution of nb02_tucker_grid: G = sum_c S_row C_c S_col^T for a batch of queries."""


def solution(s_row, s_col, cores):
    # s_row, s_col [B, n, r]; cores [c, r, r]
    # the grid is linear in the core, so sum the cores first: [B, n, r] @ [r, r] @ [B, r, n] -> [B, n, n]
    return s_row @ cores.sum(0) @ s_col.transpose(-1, -2)
