"""Solution of nb05_gain_rescale: with the key gain fixed, each axis score is linear in the query gain and
the grid score quadratic, so scale the query gain by (target / mean)^(1/2)."""


def solution(query_gain, mean_score, target):
    return query_gain * (target / mean_score) ** 0.5
