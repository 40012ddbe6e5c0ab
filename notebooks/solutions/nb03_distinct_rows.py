"""Solution of nb03_distinct_rows: physical rows behind a token's grid slots, counted once each."""
import torch


def solution(virtual, shuffle, n_rows):
    # virtual [T, m]; shuffle [E*N]
    rows = (shuffle[virtual] % n_rows).sort(dim=-1).values  # [T, m] physical rows, sorted per token
    new = torch.ones_like(rows, dtype=torch.bool)
    new[:, 1:] = rows[:, 1:] != rows[:, :-1]  # a row differs from its sorted predecessor
    return new.sum(-1)  # [T] int64
