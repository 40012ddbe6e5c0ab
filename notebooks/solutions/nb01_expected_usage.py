"""Solution of nb01_expected_usage: usage reached by uniformly random reads of k distinct slots per head."""


def solution(n_slots, tokens, heads, k):
    # all [B] float64
    miss_one = 1 - k / n_slots  # one head's k distinct picks miss a given slot
    dead = miss_one ** (tokens * heads)  # every one of the T * H selections misses it
    return 1 - dead
