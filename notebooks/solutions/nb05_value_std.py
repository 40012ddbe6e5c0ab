"""Solution of nb05_value_std: solve 0.16 E[s^2] sigma_V^4 d_pre k d_v / h = ffn_var for sigma_V."""


def solution(ffn_var, d_model, topm, d_pre, d_value, score_m2):
    fourth_power = ffn_var * d_model / (0.16 * score_m2 * d_pre * topm * d_value)  # sigma_V^4
    return fourth_power**0.25
