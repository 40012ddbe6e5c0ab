"""Solution of nb01_cube_topk: exact top-k over three sub-key sets from a k x k x k candidate block.

The grid s1[i] + s2[j] + s3[l] is additive, so the argument of notebook 01 holds axis by axis: a slot
with i outside the top-k of s1 is beaten by k candidates (i', j*, l*) with i' in the top-k.
"""


def solution(s1, s2, s3, k):
    # s1, s2, s3 [B, n]
    n = s1.shape[-1]
    (a, i1), (b, i2), (c, i3) = s1.topk(k, -1), s2.topk(k, -1), s3.topk(k, -1)  # [B, k] each
    cand = a[:, :, None, None] + b[:, None, :, None] + c[:, None, None, :]  # [B, k, k, k]
    scores, flat = cand.flatten(1).topk(k, dim=-1)  # [B, k] position in the candidate block
    j1, j2, j3 = i1.gather(1, flat // (k * k)), i2.gather(1, flat // k % k), i3.gather(1, flat % k)
    return scores, (j1 * n + j2) * n + j3
