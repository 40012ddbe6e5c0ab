"""Optimiser parameter groups and learning-rate schedules for memory models.

Memory values are read sparsely (m rows per token), so their effective update rate differs from
the dense weights; the papers give them their own learning rate.  Under Adam, scaling a gradient
does not change the step (the update is normalised by the gradient's own scale), so the
multiplier must live in an optimiser *parameter group* -- never in a gradient hook
(docs/references.md §8 item 19).
"""
from __future__ import annotations

import math

import torch.nn as nn

VALUE_PARAM_NAMES = ("values", "pre_values")


def is_memory_value(name: str) -> bool:
    """True for memory value / pre-value tables (the last name component)."""
    return name.rsplit(".", 1)[-1] in VALUE_PARAM_NAMES


def param_groups(model: nn.Module, lr: float, weight_decay: float = 0.1, value_lr_mult: float = 1.0) -> list[dict]:
    """AdamW groups: decayed matrices, non-decayed vectors (norms, biases, cores), memory values.

    Values and pre-values get ``lr * value_lr_mult`` (UltraMemV2 recommends 1x, Sec. 4.2.9) and
    keep weight decay, as the official code does.  Each group records ``lr_mult`` so a scheduler
    can rescale it every step (:func:`value_lr_multiplier`).
    """
    decay, no_decay, values = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if is_memory_value(name):
            values.append(p)
        elif p.dim() >= 2 and not name.endswith("cores"):
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "lr": lr, "lr_mult": 1.0, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "lr": lr, "lr_mult": 1.0, "name": "no_decay"},
        {"params": values, "weight_decay": weight_decay, "lr": lr * value_lr_mult, "lr_mult": value_lr_mult,
         "name": "memory_values"},
    ]
    return [g for g in groups if g["params"]]


def cosine_lr(step: int, total: int, warmup: int, base_lr: float, floor: float = 0.1) -> float:
    """Linear warmup then cosine decay to ``floor * base_lr`` (UltraMem Table 4: cosine to 0.1x)."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base_lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def value_lr_multiplier(step: int, total: int, start: float = 4.0, rate: float = 1.0) -> float:
    """UltraMem's decaying value-lr multiplier ``1 + (start - 1) * max(0, 1 - step / (rate * total))``
    (docs/references.md Sec. 7.10); UltraMemV2's recommended constant 1x is ``start = 1``."""
    return 1.0 + (start - 1.0) * max(0.0, 1.0 - step / (rate * total))
