"""Solution of nb05_value_std: Eq. 26 (sigma_mem^2 of Eq. 22 = sigma_ffn^2 of Eq. 25), one head."""


def solution(d_model, n_layers, k_inner, topm, d_pre, d_value, sigma_s2):
    # 0.16 (1 + s2) sigma_V^4 d_pre k d_v / h = 0.064 k_inner / (2L)  =>  sigma_V^4 = 0.2 k_inner h / (...)
    fourth_power = 0.2 * k_inner * d_model / (topm * (1 + sigma_s2) * d_pre * d_value * n_layers)
    return fourth_power**0.25
