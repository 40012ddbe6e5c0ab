"""Exercises of notebook 04 (PEER and UltraMemV2 "FFN values").

* ``nb04_peer_expert``: PEER's layer output ``sum_i g_i gelu(u_i . x) v_i`` over selected experts.
* ``nb04_peer_multihead``: PEER with H heads, each with its own softmax over its k raw scores.
* ``nb04_multicore_values``: UltraMemV2 pooled values with per-core channel slices (Eq. 15 + MCS), vectorised.
* ``nb04_contribution_norms``: the norm of each selected slot's contribution to the pooled vector.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from umv2_ref.exercises.harness import Alternative, Mistake, Rule, register
from umv2_ref.values import peer_values

from . import draw, uses_package


def _lookup_inputs(gen: torch.Generator, d_pre: int, d_value: int, cores: int | None):
    """(x_pre [T, D_p], pre_table [N, D_p], table [N, D_v], indices [T, m], scores [T, m(, c)])."""
    t, n_rows, m = draw(gen, 2, 5), draw(gen, 12, 39), draw(gen, 2, 6)
    x_pre = torch.randn(t, d_pre, generator=gen)
    pre_table = torch.randn(n_rows, d_pre, generator=gen) / d_pre**0.5
    table = torch.randn(n_rows, d_value, generator=gen)
    indices = torch.randint(0, n_rows, (t, m), generator=gen)
    shape = (t, m) if cores is None else (t, m, cores)
    scores = torch.rand(*shape, generator=gen) + 0.1
    return x_pre, pre_table, table, indices, scores


# ----------------------------------------------------------------------------------------------
# nb04_peer_expert
# ----------------------------------------------------------------------------------------------


def _peer_inputs(gen: torch.Generator):
    d = draw(gen, 3, 8)
    x, u, v, idx, g = _lookup_inputs(gen, d, d, None)
    return 2 * x, u, v, idx, g.softmax(-1)  # pre-activations of order 1: GELU is far from linear


def _peer_reference(x, u, v, idx, g):
    return peer_values(x, u, v, idx, g, activation="gelu")


def _peer_tanh_gelu(x, u, v, idx, g):
    a = torch.einsum("tkd,td->tk", u[idx], x)
    return torch.einsum("tk,tkd->td", g * F.gelu(a, approximate="tanh"), v[idx])


def _peer_no_activation(x, u, v, idx, g):
    return peer_values(x, u, v, idx, g, activation=None)


def _peer_activation_after_gate(x, u, v, idx, g):
    a = torch.einsum("tkd,td->tk", u[idx], x)
    return torch.einsum("tk,tkd->td", F.gelu(g * a), v[idx])


def _peer_ignores_router(x, u, v, idx, g):
    return peer_values(x, u, v, idx, torch.ones_like(g), activation="gelu")


def _peer_relu(x, u, v, idx, g):
    a = torch.einsum("tkd,td->tk", u[idx], x)
    return torch.einsum("tk,tkd->td", g * F.relu(a), v[idx])


register(
    "nb04_peer_expert", _peer_reference, _peer_inputs,
    notebook="04", fn_name="peer_expert",
    goal="Write PEER's value path: each selected slot is a one-neuron MLP gelu(u_i . x) v_i, weighted by the router.",
    mistakes=[
        Mistake("no_activation", _peer_no_activation,
                "you left out the expert's GELU; without it PEER is linear in x per slot (that is "
                "UltraMemV2's choice, not PEER's)."),
        Mistake("activation_after_gate", _peer_activation_after_gate,
                "you applied GELU to g_i * (u_i . x); the router weight multiplies the expert's *output*: "
                "g_i * gelu(u_i . x) * v_i."),
        Mistake("ignores_router", _peer_ignores_router,
                "you summed the experts without the router weights g_i."),
        Mistake("relu_not_gelu", _peer_relu,
                "you used ReLU; PEER's experts use GELU, which passes small negative pre-activations."),
        uses_package(_peer_reference, peer_values, instead="index u and v with idx and use einsum."),
    ],
    alternatives=[Alternative("tanh_gelu", _peer_tanh_gelu,
                              "the tanh approximation of GELU (the GPT-2 habit) is accepted; the reference "
                              "uses the exact erf GELU, F.gelu's default, which differs by up to ~1e-3")],
    spec="x [T, d], u [N, d], v [N, d] float32, idx [T, k] int64, g [T, k] float32 -> [T, d] float32, "
         "sum_i g_i * gelu(u_i . x) * v_i over the selected experts.",
    outputs=("f(x)",),
    fingerprints=(r"g\s*\*\s*hidden", r"\*\s*F\.gelu\(\s*\w+\)\s*,\s*\w+\[\w+\]\)"),
)


# ----------------------------------------------------------------------------------------------
# nb04_peer_multihead
# ----------------------------------------------------------------------------------------------


def _multihead_inputs(gen: torch.Generator):
    d, heads, k = draw(gen, 3, 8), draw(gen, 2, 4), draw(gen, 2, 5)
    t, n_rows = draw(gen, 2, 5), draw(gen, 12, 39)
    x = 2 * torch.randn(t, d, generator=gen)
    u = torch.randn(n_rows, d, generator=gen) / d**0.5
    v = torch.randn(n_rows, d, generator=gen)
    idx = torch.randint(0, n_rows, (t, heads, k), generator=gen)
    scores = 2 * torch.randn(t, heads, k, generator=gen)  # raw retrieval scores of each head's k slots
    return x, u, v, idx, scores


def _multihead_read(x, u, v, idx, w, activation=F.gelu):
    a = torch.einsum("thkd,td->thk", u[idx], x)  # [T, H, k]
    return torch.einsum("thk,thkd->td", w * activation(a), v[idx])  # [T, d] summed over heads and slots


def _multihead_reference(x, u, v, idx, scores):
    return _multihead_read(x, u, v, idx, scores.softmax(-1))


def _multihead_joint_softmax(x, u, v, idx, scores):
    return _multihead_read(x, u, v, idx, scores.flatten(1).softmax(-1).view_as(scores))


def _multihead_softmax_over_heads(x, u, v, idx, scores):
    return _multihead_read(x, u, v, idx, scores.softmax(1))


def _multihead_no_softmax(x, u, v, idx, scores):
    return _multihead_read(x, u, v, idx, scores)


def _multihead_mean_of_heads(x, u, v, idx, scores):
    return _multihead_reference(x, u, v, idx, scores) / scores.shape[1]


register(
    "nb04_peer_multihead", _multihead_reference, _multihead_inputs,
    notebook="04", fn_name="peer_multihead",
    goal="Route PEER with H heads: a softmax per head over its own k scores, all heads' experts summed.",
    mistakes=[
        Mistake("joint_softmax", _multihead_joint_softmax,
                "you took one softmax over all H * k scores; every head normalises its own k scores, so "
                "each head's weights sum to 1 and a head with low scores still contributes fully."),
        Mistake("softmax_over_heads", _multihead_softmax_over_heads,
                "your softmax runs over the heads axis; it must run over each head's k slots (the last axis)."),
        Mistake("raw_scores", _multihead_no_softmax,
                "you weighted the experts by the raw retrieval scores; PEER's router weights are their "
                "softmax, per head."),
        Mistake("mean_of_heads", _multihead_mean_of_heads,
                "you averaged the heads; PEER adds their outputs (the layer is an MLP of H * k neurons)."),
    ],
    alternatives=[Alternative("tanh_gelu",
                              lambda x, u, v, idx, s: _multihead_read(x, u, v, idx, s.softmax(-1),
                                                                      lambda a: F.gelu(a, approximate="tanh")),
                              "the tanh approximation of GELU is accepted; the reference uses the exact erf GELU")],
    spec="x [T, d], u [N, d], v [N, d] float32, idx [T, H, k] int64, scores [T, H, k] float32 (raw) -> [T, d] "
         "float32 = sum_h sum_i softmax_h(scores)_i * gelu(u_i . x) * v_i.",
    outputs=("f(x)",),
    fingerprints=(r"thk,thkd->td",),
)


# ----------------------------------------------------------------------------------------------
# nb04_multicore_values
# ----------------------------------------------------------------------------------------------


def _multicore_inputs(gen: torch.Generator, trial: int = 0):
    cores = (2, 8, 4, 3)[trial % 4]  # several core counts: a loop over cores shows in the op count
    d_pre = draw(gen, 2, 6)
    d_value = cores * draw(gen, 2, 4)  # >= 2 channels per slice
    return _lookup_inputs(gen, d_pre, d_value, cores)


def _multicore_reference(x_pre, pre_table, table, indices, scores):
    return peer_values(x_pre, pre_table, table, indices, scores)


def _multicore_summed_cores(x_pre, pre_table, table, indices, scores):
    return peer_values(x_pre, pre_table, table, indices, scores.sum(-1))


def _multicore_interleaved(x_pre, pre_table, table, indices, scores):
    c = scores.shape[-1]
    a = torch.einsum("tmd,td->tm", pre_table[indices], x_pre)  # [T, m]
    rows = table[indices].unflatten(-1, (-1, c))  # [T, m, D_v/c, c]
    return torch.einsum("tmjc,tmc->tjc", rows, a[..., None] * scores).flatten(-2)


def _multicore_with_gelu(x_pre, pre_table, table, indices, scores):
    return peer_values(x_pre, pre_table, table, indices, scores, activation="gelu")


def _multicore_loop(x_pre, pre_table, table, indices, scores):
    c = scores.shape[-1]
    width = table.shape[1] // c
    a = torch.einsum("tmd,td->tm", pre_table[indices], x_pre)
    rows = table[indices]
    return torch.cat([torch.einsum("tm,tmv->tv", a * scores[..., j], rows[..., j * width:(j + 1) * width])
                      for j in range(c)], -1)


def _cores(args: tuple) -> int:
    return args[4].shape[-1]


register(
    "nb04_multicore_values", _multicore_reference, _multicore_inputs,
    notebook="04", fn_name="multicore_values",
    goal="Pool UltraMemV2's values with per-core channel slices for any number of cores, in vectorised tensor code.",
    mistakes=[
        Mistake("summed_cores", _multicore_summed_cores,
                "you added the core scores and weighted the whole row: that is the *ranking* score. In the "
                "pooling core c's score weights only channel slice c."),
        Mistake("interleaved_slices", _multicore_interleaved,
                "you gave channel j to core j % c (interleaved); the slices are contiguous: channels "
                "[c * D_v/c, (c+1) * D_v/c) belong to core c -- unflatten(-1, (c, -1)), not (-1, c)."),
        Mistake("gelu_on_pre_scores", _multicore_with_gelu,
                "you kept PEER's GELU on the pre-scores; UltraMemV2's Eq. 15 removes it."),
        Mistake("loop_over_cores", _multicore_loop,
                "right values, but with a Python loop over the cores (the number of tensor operations grows "
                "with c); reshape the value rows to [T, m, c, D_v/c] and use one einsum or broadcast.",
                Rule("op_count_fixed", "vectorised: the number of tensor operations must not grow with the "
                     "number of cores c", size=_cores)),
        uses_package(_multicore_reference, peer_values, instead="write the pooling with unflatten and einsum."),
    ],
    spec="x_pre [T, D_p], pre_table [N, D_p], table [N, D_v] float32, indices [T, m] int64, scores [T, m, c] "
         "float32 -> z [T, D_v] float32, z[slice c] = sum_i <P[i], x_pre> s_i^(c) V[i, slice c]; no loop "
         "over c.",
    outputs=("z",),
    fingerprints=(r"unflatten\(\s*-1\s*,\s*\(\s*c\s*,\s*-1\s*\)\s*\)",),
)


# ----------------------------------------------------------------------------------------------
# nb04_contribution_norms
# ----------------------------------------------------------------------------------------------


def _contribution_inputs(gen: torch.Generator):
    cores = (2, 4)[draw(gen, 0, 1)]
    return _lookup_inputs(gen, draw(gen, 2, 6), cores * draw(gen, 2, 4), cores)


def _contribution_reference(x_pre, pre_table, table, indices, scores):
    c = scores.shape[-1]
    a = torch.einsum("tmd,td->tm", pre_table[indices], x_pre)  # [T, m]
    rows = table[indices].unflatten(-1, (c, -1))  # [T, m, c, D_v/c]
    return ((a[..., None] * scores)[..., None] * rows).flatten(-2).norm(dim=-1)  # [T, m]


def _contribution_without_prescore(x_pre, pre_table, table, indices, scores):
    c = scores.shape[-1]
    rows = table[indices].unflatten(-1, (c, -1))
    return (scores[..., None] * rows).flatten(-2).norm(dim=-1)


def _contribution_mean_score(x_pre, pre_table, table, indices, scores):
    a = torch.einsum("tmd,td->tm", pre_table[indices], x_pre)
    return (a * scores.mean(-1)).abs() * table[indices].norm(dim=-1)


def _contribution_summed_score(x_pre, pre_table, table, indices, scores):
    a = torch.einsum("tmd,td->tm", pre_table[indices], x_pre)
    return (a * scores.sum(-1)).abs() * table[indices].norm(dim=-1)


register(
    "nb04_contribution_norms", _contribution_reference, _contribution_inputs,
    notebook="04", fn_name="contribution_norms",
    goal="Measure how much each selected slot adds to the pooled vector: score, pre-score and value together.",
    mistakes=[
        Mistake("without_prescore", _contribution_without_prescore,
                "you forgot the pre-score a_i = <P[i], x_pre>: that measures what the slot could add, not "
                "what it adds."),
        Mistake("mean_core_score", _contribution_mean_score,
                "you weighted the whole row by the mean core score; each slice c is weighted by its own "
                "score s_i^(c)."),
        Mistake("summed_core_score", _contribution_summed_score,
                "you weighted the whole row by the summed core score; each slice c is weighted by its own "
                "score s_i^(c)."),
    ],
    spec="same arguments as nb04_multicore_values -> [T, m] float32, the norm || concat_c a_i s_i^(c) "
         "V[i, slice c] ||.",
    outputs=("norms",),
    fingerprints=(r"def slot_contributions", r"\.pow\(2\)\.sum\(-1\)\.sqrt\(\)"),
)
