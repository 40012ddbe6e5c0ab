"""Solution of nb05_gain_rescale: grid scores scale as g^4, so multiply g by mean^(-1/4)."""


def solution(gain, mean_score):
    return gain * mean_score ** (-1 / 4)
