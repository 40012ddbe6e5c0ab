"""Solution of nb09_kl_scores: each read row's term of KL(batch reads || smoothed background reads)."""
import torch


def solution(batch, background, smoothing):
    p = batch / batch.sum()  # [N] the batch's read distribution
    q = (background + smoothing) / (background + smoothing).sum()  # [N] smoothed background distribution
    return torch.where(p > 0, p * torch.log(p / q), torch.zeros_like(p))  # unread rows contribute 0
