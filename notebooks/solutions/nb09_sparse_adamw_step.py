"""Solution of nb09_sparse_adamw_step: AdamW on the kept rows; frozen rows keep parameters and moments."""
import torch


def solution(p, grad, exp_avg, exp_avg_sq, keep, step, lr, weight_decay):
    b1, b2, eps = 0.9, 0.95, 1e-8
    k = keep[:, None]  # [N, 1] broadcast over the row's channels
    m = torch.where(k, b1 * exp_avg + (1 - b1) * grad, exp_avg)  # first moment, kept rows only
    v = torch.where(k, b2 * exp_avg_sq + (1 - b2) * grad**2, exp_avg_sq)  # second moment
    m_hat, v_hat = m / (1 - b1**step), v / (1 - b2**step)  # bias correction
    new_p = p * (1 - lr * weight_decay) - lr * m_hat / (v_hat.sqrt() + eps)  # decoupled decay + Adam step
    return torch.where(k, new_p, p), m, v
