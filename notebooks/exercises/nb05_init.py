"""Exercises of notebook 05 (UltraMemV2 initialisation, Appendix A).

Arguments are float64 tensors of equal shape ``[B]`` (one configuration per entry), so a solution
is written once with tensor arithmetic and checked on many configurations at a time.  Each
exercise is a *generalisation* of a formula the notebook derives, so that it cannot be copied:

* ``nb05_memory_variance``: Eq. 22 with separate pre-value and value stds and any score second moment.
* ``nb05_gain_rescale``: calibrating the *query* norm gain alone to any target mean score.
* ``nb05_value_std``: Eq. 26 solved for any FFN variance target and score second moment.
"""
from __future__ import annotations

import torch

from umv2_ref import init
from umv2_ref.exercises.harness import Mistake, register

from . import module_functions, uses_package


def _ints(gen: torch.Generator, low: int, high: int, size: int) -> torch.Tensor:
    return torch.randint(low, high, (size,), generator=gen).to(torch.float64)


def _uniform(gen: torch.Generator, low: float, high: float, size: int) -> torch.Tensor:
    return low + (high - low) * torch.rand(size, generator=gen, dtype=torch.float64)


# ----------------------------------------------------------------------------------------------
# nb05_memory_variance (Eq. 22, generalised)
# ----------------------------------------------------------------------------------------------


def _memory_inputs(gen: torch.Generator):
    b = 6
    sigma_p, sigma_v = _uniform(gen, 0.01, 0.3, b), _uniform(gen, 0.01, 0.3, b)
    score_m2 = _uniform(gen, 0.05, 2.0, b)  # E[s^2]: 1 + sigma_s^2 for one calibrated core, ~1/4 for two
    d_model, topm = 64 * _ints(gen, 1, 33, b), _ints(gen, 4, 129, b)
    d_pre, d_value = 16 * _ints(gen, 1, 17, b), 16 * _ints(gen, 1, 17, b)
    return sigma_p, sigma_v, score_m2, d_model, topm, d_pre, d_value


def _memory_reference(sigma_p, sigma_v, score_m2, d_model, topm, d_pre, d_value):
    pre_score = 0.4 * d_pre * sigma_p**2  # Var <P_i, W_pre x>
    pooled = pre_score * score_m2 * topm * sigma_v**2  # Var z = sum over k slots of E[(a s)^2] Var V
    return pooled * d_value * 0.4 / d_model  # W_v: d_v inputs, weight variance 2 / (5h)


def _memory_sigma_v_fourth(sigma_p, sigma_v, score_m2, d_model, topm, d_pre, d_value):
    return _memory_reference(sigma_v, sigma_v, score_m2, d_model, topm, d_pre, d_value)


def _memory_one_plus_m2(sigma_p, sigma_v, score_m2, d_model, topm, d_pre, d_value):
    return _memory_reference(sigma_p, sigma_v, 1 + score_m2, d_model, topm, d_pre, d_value)


def _memory_one_projection(sigma_p, sigma_v, score_m2, d_model, topm, d_pre, d_value):
    return _memory_reference(sigma_p, sigma_v, score_m2, d_model, topm, d_pre, d_value) / 0.4


def _memory_no_value_width(sigma_p, sigma_v, score_m2, d_model, topm, d_pre, d_value):
    return _memory_reference(sigma_p, sigma_v, score_m2, d_model, topm, d_pre, d_value) / d_value


def _memory_package(sigma_p, sigma_v, score_m2, d_model, topm, d_pre, d_value):
    unit = torch.tensor([init.memory_output_variance(1.0, 0.0, int(h), int(k), int(p), int(v))
                         for h, k, p, v in zip(d_model, topm, d_pre, d_value)], dtype=torch.float64)
    return unit * sigma_p**2 * sigma_v**2 * score_m2


register(
    "nb05_memory_variance", _memory_reference, _memory_inputs,
    notebook="05", fn_name="memory_variance",
    goal="Rebuild Eq. 22 factor by factor: which std enters where, and what the score contributes.",
    mistakes=[
        Mistake("sigma_v_to_the_fourth", _memory_sigma_v_fourth,
                "you used sigma_V^4: that is Eq. 22's special case where pre-values and values share one std. "
                "The pre-score brings sigma_P^2 (step 2), the pooled values sigma_V^2 (step 4)."),
        Mistake("one_plus_second_moment", _memory_one_plus_m2,
                "you used 1 + E[s^2]; Eq. 22's (1 + sigma_s^2) *is* E[s^2] for a score of mean 1. Here the "
                "second moment is given directly: E[a^2 s^2] = E[a^2] E[s^2]."),
        Mistake("one_projection", _memory_one_projection,
                "you counted one small-init projection (0.4); two are in the path, W_pre and W_v: 0.16 = 0.4^2."),
        Mistake("no_value_width", _memory_no_value_width,
                "you forgot that W_v sums d_v pooled coordinates: the output variance has a factor d_v * 0.4 / h."),
        uses_package(_memory_package, *module_functions(init), instead="multiply the five steps' factors yourself."),
    ],
    spec="sigma_p, sigma_v, score_m2 = E[s^2], d_model (h), topm (k), d_pre, d_value: float64 tensors [B] -> "
         "[B] float64 output variance of one memory head at init (small-init W_pre and W_v).",
    outputs=("sigma_mem^2",),
    rtol=1e-9, atol=0.0,
    fingerprints=(r"sigma_p\s*\*\*\s*2",),
)


# ----------------------------------------------------------------------------------------------
# nb05_gain_rescale (query gain alone, any target)
# ----------------------------------------------------------------------------------------------


def _gain_inputs(gen: torch.Generator):
    b = 8
    return _uniform(gen, 0.05, 1.05, b), _uniform(gen, 0.1, 3.1, b), _uniform(gen, 0.5, 2.0, b)


def _gain_reference(query_gain, mean_score, target):
    return query_gain * (target / mean_score) ** 0.5


def _gain_both_sides(query_gain, mean_score, target):
    return query_gain * (target / mean_score) ** 0.25


def _gain_ignores_target(query_gain, mean_score, target):
    return query_gain * mean_score**-0.5


def _gain_linear(query_gain, mean_score, target):
    return query_gain * target / mean_score


def _gain_wrong_direction(query_gain, mean_score, target):
    return query_gain * (mean_score / target) ** 0.5


register(
    "nb05_gain_rescale", _gain_reference, _gain_inputs,
    notebook="05", fn_name="gain_rescale",
    goal="Use how grid scores scale with the norm gains to calibrate when only the query side can move.",
    mistakes=[
        Mistake("both_gains_exponent", _gain_both_sides,
                "exponent 1/4 is the rule when queries *and* keys are rescaled (grid ~ g^4). With the keys "
                "fixed, each axis score scales as g_q and the grid score as g_q^2: exponent 1/2."),
        Mistake("ignores_target", _gain_ignores_target,
                "you calibrated to mean 1; the target mean is an argument: scale by (target / mean)^(1/2)."),
        Mistake("linear_in_gain", _gain_linear,
                "you divided by the mean as if the scores were linear in the gain; the grid score multiplies "
                "a row and a column score, each linear in g_q."),
        Mistake("wrong_direction", _gain_wrong_direction,
                "you moved the gain the wrong way: a mean above the target needs a *smaller* gain."),
    ],
    spec="query_gain, mean_score, target: float64 tensors [B] -> [B] float64, the query norm gain that makes "
         "the mean top-m grid score equal target (key gain unchanged).",
    outputs=("query gain",),
    rtol=1e-9, atol=0.0,
    fingerprints=(r"\(\s*target\s*/\s*mean_score\s*\)\s*\*\*",),
)


# ----------------------------------------------------------------------------------------------
# nb05_value_std (Eq. 26 for any FFN target)
# ----------------------------------------------------------------------------------------------


def _value_std_inputs(gen: torch.Generator):
    b = 6
    ffn_var = _uniform(gen, 0.001, 0.05, b)
    d_model, topm = 64 * _ints(gen, 1, 33, b), _ints(gen, 4, 129, b)
    d_pre, d_value = 16 * _ints(gen, 1, 17, b), 16 * _ints(gen, 1, 17, b)
    return ffn_var, d_model, topm, d_pre, d_value, _uniform(gen, 0.05, 2.0, b)


def _value_std_reference(ffn_var, d_model, topm, d_pre, d_value, score_m2):
    return (ffn_var * d_model / (0.16 * score_m2 * d_pre * topm * d_value)) ** 0.25


def _value_std_square_root(ffn_var, d_model, topm, d_pre, d_value, score_m2):
    return (ffn_var * d_model / (0.16 * score_m2 * d_pre * topm * d_value)) ** 0.5


def _value_std_one_plus_m2(ffn_var, d_model, topm, d_pre, d_value, score_m2):
    return _value_std_reference(ffn_var, d_model, topm, d_pre, d_value, 1 + score_m2)


def _value_std_no_projections(ffn_var, d_model, topm, d_pre, d_value, score_m2):
    return (ffn_var * d_model / (score_m2 * d_pre * topm * d_value)) ** 0.25


def _value_std_package(ffn_var, d_model, topm, d_pre, d_value, score_m2):
    unit = torch.tensor([init.memory_output_variance(1.0, 0.0, int(h), int(k), int(p), int(v))
                         for h, k, p, v in zip(d_model, topm, d_pre, d_value)], dtype=torch.float64)
    return (ffn_var / (unit * score_m2)) ** 0.25


register(
    "nb05_value_std", _value_std_reference, _value_std_inputs,
    notebook="05", fn_name="value_std",
    goal="Solve the variance balance for sigma_V yourself: why the exponent is 1/4, for any FFN target.",
    mistakes=[
        Mistake("exponent_one_half", _value_std_square_root,
                "this is Eq. 26 with exponent 1/2 (the PDF-extraction misreading). The memory variance grows "
                "as sigma_V^4 -- sigma_V enters once through the pre-values and once through the values, "
                "and each is squared in a variance -- so solve sigma_V^4 = ... and take the 4th root."),
        Mistake("one_plus_second_moment", _value_std_one_plus_m2,
                "you used 1 + E[s^2]; the score's second moment is given, E[s^2] itself multiplies the variance."),
        Mistake("no_projection_factor", _value_std_no_projections,
                "you dropped the 0.16 = 0.4 * 0.4 of the two small-init projections W_pre and W_v."),
        uses_package(_value_std_package, *module_functions(init), instead="invert your Eq. 22 by hand."),
    ],
    spec="ffn_var (the variance to match), d_model (h), topm (k), d_pre, d_value, score_m2 = E[s^2]: float64 "
         "tensors [B] -> [B] float64 sigma_V (pre-values and values share it) such that the memory branch's "
         "output variance equals ffn_var.",
    outputs=("sigma_V",),
    rtol=1e-9, atol=0.0,
    fingerprints=(r"ffn_var\s*\*",),
)
