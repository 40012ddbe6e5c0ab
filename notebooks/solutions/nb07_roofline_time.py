"""Solution of nb07_roofline_time: the roofline lower bound of the fused peer_values forward."""


def solution(T, m, d_pre, d_value, cores, elt, bandwidth, flops_per_s):
    reads = T * d_pre * elt + T * m * 8 + T * m * cores * elt + T * m * (d_pre + d_value) * elt
    writes = T * d_value * elt  # z, once
    flops = 2 * T * m * d_pre  # pre-score dot products: one multiply-add per channel
    flops += T * m * cores  # a_i * s_i^(c): one multiply per core
    flops += 2 * T * m * d_value  # pooling: one multiply-add per value channel
    return max((reads + writes) / bandwidth, flops / flops_per_s)
