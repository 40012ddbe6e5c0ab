"""Solution of nb07_masked_lanes: cdiv programs, and the lanes of their tiles outside the [T, D] data."""


def solution(T, D, block_t, block_d):
    programs = (T + block_t - 1) // block_t  # triton.cdiv: the last block is partial
    return programs, programs * block_t * block_d - T * D  # each program owns a BLOCK_T x BLOCK_D tile
