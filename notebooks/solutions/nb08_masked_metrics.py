"""Solution of nb08_masked_metrics: loss and accuracy pooled over the scored positions."""
import torch.nn.functional as F


def solution(logits, targets):
    mask = targets != -100  # [B, T]
    scored_logits, scored_targets = logits[mask], targets[mask]  # [n, V], [n]
    ce = F.cross_entropy(scored_logits, scored_targets)
    acc = (scored_logits.argmax(-1) == scored_targets).double().mean()
    return ce, acc
