"""Solution of nb06_lr_schedule: warmup + cosine (floor 0.1x) and UltraMem's value-lr multiplier."""
import math

import torch


def solution(steps, total, warmup, base_lr, start):
    s = steps.double()
    progress = ((s - warmup) / max(1, total - warmup)).clamp(0, 1)
    cosine = base_lr * (0.1 + 0.9 * 0.5 * (1 + torch.cos(math.pi * progress)))
    lr = torch.where(s < warmup, base_lr * (s + 1) / warmup, cosine)
    mult = 1 + (start - 1) * (1 - s / total).clamp(min=0)
    return lr, lr * mult
