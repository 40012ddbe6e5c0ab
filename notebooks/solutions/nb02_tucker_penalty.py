"""Solution of nb02_tucker_penalty: 1/(r-1) * sum_{i>=2} relu(lambda_i - tau)^2 of sum_c C_c."""
import torch


def solution(cores, tau):
    sv = torch.linalg.svdvals(cores.sum(0))  # [r] singular values, descending
    return torch.relu(sv[1:] - tau).pow(2).sum() / (sv.shape[0] - 1)
