"""Solution of nb08_mqar_layout: zoology's MQAR placement with the one-token label shift."""
import torch


def solution(keys, values, gaps, seq_len):
    B, P = keys.shape
    inputs = torch.zeros(B, seq_len, dtype=torch.long)
    targets = torch.full((B, seq_len), -100, dtype=torch.long)
    inputs[:, 0:2 * P:2] = keys
    inputs[:, 1:2 * P:2] = values
    query = 2 * P + 2 * gaps  # [B, P] where each key is asked again
    inputs.scatter_(1, query, keys)
    targets.scatter_(1, query, values)  # predict the value *at* the query key
    return inputs, targets
