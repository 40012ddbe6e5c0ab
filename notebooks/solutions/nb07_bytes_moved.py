"""Solution of nb07_bytes_moved: bytes the fused peer_values forward must move."""


def solution(T, m, d_pre, d_value, cores, elt):
    reads = T * d_pre * elt  # x_pre
    reads += T * m * 8 + T * m * cores * elt  # int64 indices and the scores
    reads += T * m * (d_pre + d_value) * elt  # one pre-value row and one value row per slot
    writes = T * d_value * elt  # z, once
    return reads + writes
