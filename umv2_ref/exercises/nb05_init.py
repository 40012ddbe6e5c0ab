"""Exercises of notebook 05 (UltraMemV2 initialisation, Appendix A).

Arguments are float64 tensors of equal shape ``[B]`` (one configuration per entry), so a solution
is written once with tensor arithmetic and checked on many configurations at a time.  The
references call :mod:`umv2_ref.init` entry by entry, so the checkers follow the package.

* ``nb05_memory_variance``: Eq. 22, the memory branch's output variance.
* ``nb05_value_std``: Eq. 26, the value std that matches the memory branch to the FFN (exponent 1/4).
* ``nb05_gain_rescale``: one step of the norm-gain calibration (grid scores scale as g^4).
"""
from __future__ import annotations

import torch

from .. import init
from .harness import register


def _ints(gen: torch.Generator, low: int, high: int, size: int) -> torch.Tensor:
    return torch.randint(low, high, (size,), generator=gen).to(torch.float64)


def _entrywise(fn, *columns: torch.Tensor, ints: tuple[int, ...] = ()) -> torch.Tensor:
    """Apply a float-valued ``fn`` to each row of the columns (positions in ``ints`` passed as int)."""
    rows = zip(*(c.tolist() for c in columns))
    return torch.tensor([fn(*(int(v) if i in ints else v for i, v in enumerate(row))) for row in rows],
                        dtype=torch.float64)


# ----------------------------------------------------------------------------------------------
# nb05_memory_variance (Eq. 22)
# ----------------------------------------------------------------------------------------------


def _memory_inputs(gen: torch.Generator):
    b = 6
    sigma_v = 0.01 + 0.2 * torch.rand(b, generator=gen, dtype=torch.float64)
    sigma_s2 = 0.3 * torch.rand(b, generator=gen, dtype=torch.float64)
    d_model = 64 * _ints(gen, 1, 33, b)
    topm = _ints(gen, 4, 129, b)
    d_pre = 16 * _ints(gen, 1, 17, b)
    d_value = 16 * _ints(gen, 1, 17, b)
    return sigma_v, sigma_s2, d_model, topm, d_pre, d_value


def _memory_reference(sigma_v, sigma_s2, d_model, topm, d_pre, d_value):
    return _entrywise(init.memory_output_variance, sigma_v, sigma_s2, d_model, topm, d_pre, d_value, ints=(2, 3, 4, 5))


def _memory_sigma_v_squared(sigma_v, sigma_s2, d_model, topm, d_pre, d_value):
    """Counts the value std once: sigma_V^2 instead of sigma_V^4 (pre-values *and* values have it)."""
    return 0.16 * (1 + sigma_s2) * sigma_v**2 * d_pre * topm * d_value / d_model


def _memory_no_score_variance(sigma_v, sigma_s2, d_model, topm, d_pre, d_value):
    """Treats the score as the constant 1 (drops the 1 + sigma_s^2 factor)."""
    return 0.16 * sigma_v**4 * d_pre * topm * d_value / d_model


def _memory_one_projection(sigma_v, sigma_s2, d_model, topm, d_pre, d_value):
    """Forgets one of the two small-init projections (0.4 instead of 0.16 = 0.4 * 0.4)."""
    return 0.4 * (1 + sigma_s2) * sigma_v**4 * d_pre * topm * d_value / d_model


register(
    "nb05_memory_variance",
    _memory_reference,
    _memory_inputs,
    wrong=[_memory_sigma_v_squared, _memory_no_score_variance, _memory_one_projection],
    rtol=1e-9,
    atol=0.0,
    description="Eq. 22: sigma_mem^2 = (0.16 + 0.16 sigma_s^2) sigma_V^4 d_prev k d_v / h (one head). "
    "Args sigma_v, sigma_s2, d_model (h), topm (k), d_pre, d_value, all [B] float64; returns [B].",
)


# ----------------------------------------------------------------------------------------------
# nb05_value_std (Eq. 26)
# ----------------------------------------------------------------------------------------------


def _value_std_inputs(gen: torch.Generator):
    b = 6
    d_model = 64 * _ints(gen, 1, 33, b)
    n_layers = _ints(gen, 2, 41, b)
    k_inner = 1.0 + 4.0 * torch.rand(b, generator=gen, dtype=torch.float64)
    topm = _ints(gen, 4, 129, b)
    d_pre = 16 * _ints(gen, 1, 17, b)
    d_value = 16 * _ints(gen, 1, 17, b)
    sigma_s2 = 0.3 * torch.rand(b, generator=gen, dtype=torch.float64)
    return d_model, n_layers, k_inner, topm, d_pre, d_value, sigma_s2


def _value_std_reference(d_model, n_layers, k_inner, topm, d_pre, d_value, sigma_s2):
    return _entrywise(init.value_std, d_model, n_layers, k_inner, topm, d_pre, d_value, sigma_s2, ints=(0, 1, 3, 4, 5))


def _value_std_square_root(d_model, n_layers, k_inner, topm, d_pre, d_value, sigma_s2):
    """Reads the PDF extraction literally: sigma_V^2 = (...), i.e. exponent 1/2 instead of 1/4."""
    return (0.2 * k_inner * d_model / (topm * (1 + sigma_s2) * d_pre * d_value * n_layers)) ** 0.5


def _value_std_no_depth(d_model, n_layers, k_inner, topm, d_pre, d_value, sigma_s2):
    """Forgets the FFN's 1/sqrt(2L) output scaling, so the memory ignores depth."""
    return (0.2 * k_inner * d_model / (topm * (1 + sigma_s2) * d_pre * d_value)) ** 0.25


def _value_std_unsolved(d_model, n_layers, k_inner, topm, d_pre, d_value, sigma_s2):
    """Plugs Eq. 25's 0.064 / 2 in directly instead of dividing it by Eq. 22's 0.16."""
    return (0.032 * k_inner * d_model / (topm * (1 + sigma_s2) * d_pre * d_value * n_layers)) ** 0.25


register(
    "nb05_value_std",
    _value_std_reference,
    _value_std_inputs,
    wrong=[_value_std_square_root, _value_std_no_depth, _value_std_unsolved],
    rtol=1e-9,
    atol=0.0,
    description="Eq. 26: sigma_V = (0.2 k_inner h / (k (1 + sigma_s^2) d_prev d_v L))^(1/4) (one head). "
    "Args d_model, n_layers, k_inner, topm, d_pre, d_value, sigma_s2, all [B] float64; returns [B].",
)


# ----------------------------------------------------------------------------------------------
# nb05_gain_rescale
# ----------------------------------------------------------------------------------------------


def _gain_inputs(gen: torch.Generator):
    b = 8
    gain = 0.05 + torch.rand(b, generator=gen, dtype=torch.float64)
    mean_score = 0.1 + 3.0 * torch.rand(b, generator=gen, dtype=torch.float64)
    return gain, mean_score


def _gain_reference(gain, mean_score):
    return gain * mean_score ** -0.25


def _gain_square_root(gain, mean_score):
    """Assumes the scores scale as g^2 (true for one row or column score, not for the grid)."""
    return gain * mean_score ** -0.5


def _gain_linear(gain, mean_score):
    """Divides the gain by the mean score, as if the scores were linear in g."""
    return gain / mean_score


def _gain_wrong_direction(gain, mean_score):
    """Moves the gain the wrong way: multiplies by mean^(+1/4)."""
    return gain * mean_score**0.25


register(
    "nb05_gain_rescale",
    _gain_reference,
    _gain_inputs,
    wrong=[_gain_square_root, _gain_linear, _gain_wrong_direction],
    rtol=1e-9,
    atol=0.0,
    description="One calibration step: the query/key norm gain g that turns a mean top-m score `mean_score` "
    "into 1, given that grid scores scale as g^4. Args gain, mean_score [B]; returns [B].",
)
