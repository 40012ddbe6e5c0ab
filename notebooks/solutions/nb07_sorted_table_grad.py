"""Solution of nb07_sorted_table_grad: deterministic table gradient by stable sort + segment sums."""
import torch


def solution(n_rows, idx, w, g):
    # idx, w [T, k]; g [T, D] -> dV [N, D]
    k = idx.shape[1]
    rows, order = idx.flatten().sort(stable=True)  # [T*k] pairs grouped by row, token order kept
    contrib = w.flatten()[order, None] * g[order // k]  # [T*k, D] sorted contributions
    probe = torch.arange(n_rows)  # [N]
    starts = torch.searchsorted(rows, probe)  # [N] first pair of each row
    ends = torch.searchsorted(rows, probe, right=True)  # [N] one past its last pair
    return torch.stack([contrib[s:e].sum(0) for s, e in zip(starts.tolist(), ends.tolist())])  # [N, D]
