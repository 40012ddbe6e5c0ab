"""Solution of nb05_memory_variance: Eq. 22 step by step, with sigma_P, sigma_V and E[s^2] separate."""


def solution(sigma_p, sigma_v, score_m2, d_model, topm, d_pre, d_value):
    x_pre = 0.4  # W_pre x: h inputs of variance 1 times weight variance 2/(5h)
    pre_score = x_pre * d_pre * sigma_p**2  # <P_i, x~> over D_p coordinates
    weight = pre_score * score_m2  # E[(a s)^2] = E[a^2] E[s^2]: the score is independent of a
    pooled = weight * topm * sigma_v**2  # sum of k independent value rows
    return pooled * d_value * 0.4 / d_model  # W_v: d_v inputs, weight variance 2/(5h)
