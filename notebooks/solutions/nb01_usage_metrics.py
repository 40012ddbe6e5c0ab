"""Solution of nb01_usage_metrics: fraction of slots used and KL(usage || uniform)."""
import math

import torch


def solution(indices, n_slots):
    counts = torch.bincount(indices.reshape(-1), minlength=n_slots).double()  # [N] accesses per slot
    z = counts / counts.sum()  # [N] access distribution
    used = (counts > 0).double().mean()
    nz = z[z > 0]  # 0 log 0 = 0
    kl = math.log(n_slots) + (nz * nz.log()).sum()
    return torch.stack([used, kl])
