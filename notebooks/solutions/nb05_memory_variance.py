"""Solution of nb05_memory_variance: Eq. 22 of UltraMemV2 (Appendix A), one memory head."""


def solution(sigma_v, sigma_s2, d_model, topm, d_pre, d_value):
    x_pre = 0.4  # W_pre x: h inputs of variance 1 times weight variance 2/(5h)
    pre_score = x_pre * d_pre * sigma_v**2  # <P_i, x~> over D_p coordinates
    weight = pre_score * (1 + sigma_s2)  # times a score with mean 1 and variance sigma_s^2
    pooled = weight * topm * sigma_v**2  # sum of k independent value rows
    return pooled * d_value * 0.4 / d_model  # W_v: d_v inputs, weight variance 2/(5h)
