"""Solution of nb03_implicit_expansion: pool the physical rows per virtual block, then project each block."""
import torch


def solution(table, virtual, scores, shuffle, proj):
    # table [N, D]; virtual, scores [T, m]; shuffle [E*N]; proj [E, D, d_out]
    n_rows, blocks = table.shape[0], proj.shape[0]
    phys = shuffle[virtual]  # [T, m] shuffled virtual position
    block, rows = phys // n_rows, phys % n_rows  # [T, m] which virtual table, which physical row
    onehot = torch.nn.functional.one_hot(block, blocks).to(scores.dtype)  # [T, m, E]
    z = torch.einsum("tme,tm,tmd->ted", onehot, scores, table[rows])  # [T, E, D] retrieve first ...
    return torch.einsum("ted,edo->to", z, proj)  # [T, d_out] ... expand after
