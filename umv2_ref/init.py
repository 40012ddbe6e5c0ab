"""Variance-matched initialisation of UltraMemV2 (arXiv 2508.18756, Appendix A; docs/references.md Sec. 6.5).

Public API (names are stable; notebook 05 imports them):

* :func:`small_init_std` -- ``sqrt(2 / (5h))``, the "small init" of every linear (Nguyen & Salazar 2019).
* :func:`ffn_output_variance` -- Eq. 25, the SwiGLU FFN branch under the paper's truncated-normal gate.
* :func:`silu_second_moment`, :func:`swiglu_output_variance_exact` -- the same branch with the true SiLU
  gate (docs/references.md Sec. 7.2: ``E[SiLU(z)^2] = 0.123`` for ``z ~ N(0, 0.4)``, not 0.4).
* :func:`memory_output_variance` -- Eq. 22, the memory branch under the paper's assumptions.
* :func:`predict_memory_variance` (from a config) and :func:`predict_memory_variance_from_dims` -- Eq. 22
  generalised to any projection stds and any score second moment (so it covers the official-code
  scheme and multi-core scoring).
* :func:`value_std` -- sigma_V of Eq. 26 (exponent 1/4); :func:`solve_value_std` -- sigma_V for any target.
* :func:`score_statistics`, :func:`calibrate_norm_gain` -- Monte-Carlo of the TDQKR top-m scores
  (App. A.2) and the norm-gain calibration that sets their mean to 1.
* :func:`init_ultramemv2_` -- initialise an :class:`~umv2_ref.layers.UltraMemV2` layer in place with the
  ``"paper"`` scheme (Appendix A) or the ``"official"`` released-code constants (``SCHEMES``); returns
  an :class:`InitReport` with everything it chose and the predicted output variance.

Finding worth knowing (tested in tests/test_ref_init.py): with multi-core scoring (c = 2, still on in
the official V2 code, docs/references.md Sec. 8 item 4) each core's score weights half of every value and
carries about half the summed score, so a layer initialised by Eq. 26 starts ~4x *below* the Eq. 22
prediction; ``corrected=True`` accounts for this and for the true SiLU FFN variance.

Notation (docs/references.md Sec. 6.5): ``h`` = d_model, ``L`` = layers, ``k`` = top-m, ``n_head`` = heads (1 in
UltraMemV2), ``d_prev`` = D_p, ``d_v`` = D_v, ``k_inner`` = FFN inner width / h, ``sigma_V`` = std of
values and pre-values, ``sigma_s^2`` = variance of the top-m scores after their mean is calibrated to 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .checks import require_positive_int
from .layers import TuckerConfig, UltraMemV2
from .retrieval import rank1_factors, tucker_topk

SCHEMES = ("paper", "official")

# ---------------------------------------------------------------------------------------------
# Closed-form variances (Appendix A)
# ---------------------------------------------------------------------------------------------


def small_init_std(h: int) -> float:
    """``sqrt(2 / (5h))``: a linear with fan-in h maps unit-variance inputs to variance ``h * 2/(5h) = 0.4``.

    0.0228218 for h = 768 (the official README ``init_std``), docs/references.md Sec. 7.1.
    """
    require_positive_int("h (d_model)", h)
    return math.sqrt(2.0 / (5.0 * h))


def ffn_output_variance(k_inner: float, n_layers: int) -> float:
    """Eq. 25: ``sigma_ffn^2 = 0.064 k_inner / (2L)`` -- the paper's SwiGLU FFN branch at init.

    Derivation (inputs are LayerNorm outputs, variance 1 per element):

    1. both inner linears have std ``sqrt(2/(5h))`` and fan-in h: pre-activations have variance 0.4;
    2. the activated gate is modelled as ``N(0, 0.4)`` truncated to ``[0, inf)`` (Eqs. 23-24: mean
       ``sqrt(0.4) sqrt(2/pi) = 0.505``, variance ``0.4 (1 - 2/pi) = 0.145``), so ``E[g^2] = 0.4``;
    3. gate times the independent linear branch: inner variance ``0.4 * 0.4 = 0.16``;
    4. the last linear has std ``sqrt(2/(5h)) / sqrt(2L)`` and fan-in ``k_inner h``:
       ``k_inner h * 0.4 / (h 2L) * 0.16 = 0.064 k_inner / (2L)``.

    Step 2 overstates the true SiLU gate by 3.25x; see :func:`swiglu_output_variance_exact`.
    """
    return _swiglu_variance(k_inner, n_layers, gate_second_moment=0.4)


def silu_second_moment(var: float, nodes: int = 64) -> float:
    """``E[SiLU(z)^2]`` for ``z ~ N(0, var)`` by Gauss-Hermite quadrature (exact to ~1e-12 here).

    ``E[f(z)] = sum_i w_i f(sqrt(var) x_i) / sqrt(2 pi)`` with the probabilists' Hermite nodes x_i.
    For var = 0.4 this is 0.1229 -- the paper's truncated normal assumes 0.4 (docs/references.md Sec. 7.2).
    """
    if var <= 0:
        raise ValueError(f"var must be positive, got {var}")
    x, w = np.polynomial.hermite_e.hermegauss(nodes)
    z = math.sqrt(var) * x
    silu = z / (1.0 + np.exp(-z))
    return float((w * silu**2).sum() / math.sqrt(2.0 * math.pi))


def swiglu_output_variance_exact(k_inner: float, n_layers: int) -> float:
    """Eq. 25 with the true SiLU gate: ``0.4 * E[SiLU(z)^2] * 0.4 k_inner / (2L)``, ``z ~ N(0, 0.4)``.

    Same steps as :func:`ffn_output_variance` except step 2: ``E[g^2] = 0.1229`` (not 0.4), so the
    inner variance is 0.049 and the output variance is 0.307x Eq. 25 (docs/references.md Sec. 7.2).
    """
    return _swiglu_variance(k_inner, n_layers, gate_second_moment=silu_second_moment(0.4))


def _swiglu_variance(k_inner: float, n_layers: int, gate_second_moment: float) -> float:
    if k_inner <= 0:
        raise ValueError(f"k_inner (FFN inner width / d_model) must be positive, got {k_inner}")
    require_positive_int("n_layers", n_layers)
    inner = 0.4 * gate_second_moment  # linear branch (var 0.4) times gate (second moment)
    return k_inner * 0.4 / (2 * n_layers) * inner  # fan-in k_inner*h, weight var 0.4/(h*2L)


def memory_output_variance(
    sigma_v: float, sigma_s2: float, d_model: int, topm: int, d_pre: int, d_value: int, heads: int = 1
) -> float:
    """Eq. 22: ``sigma_mem^2 = (0.16 + 0.16 sigma_s^2) sigma_V^4 d_prev k n_head d_v / h``.

    Derivation (memory input = norm output, variance 1; all linears small-init, W_v *not* depth-scaled):

    1. ``x~ = W_pre x``: variance ``h * 2/(5h) = 0.4``;
    2. pre-score ``a = <P_i, x~>`` over D_p coordinates: ``0.4 sigma_V^2 d_prev``;
    3. weight ``w = a s`` with an independent score of mean 1, variance sigma_s^2:
       ``E[w^2] = 0.4 (1 + sigma_s^2) sigma_V^2 d_prev``;
    4. pooled ``z = sum_{i <= k n_head} w_i V_i`` (independent zero-mean rows):
       ``0.4 (1 + sigma_s^2) sigma_V^4 d_prev k n_head`` per coordinate;
    5. ``o = W_v z`` with weight variance 0.4/h over d_v inputs: multiply by ``0.4 d_v / h``.
    """
    return predict_memory_variance_from_dims(
        d_model, topm, d_pre, d_value, sigma_v=sigma_v, score_second_moment=1.0 + sigma_s2, heads=heads
    )


def predict_memory_variance_from_dims(
    d_model: int,
    topm: int,
    d_pre: int,
    d_value: int,
    *,
    sigma_v: float,
    score_second_moment: float,
    pre_proj_std: float | None = None,
    out_proj_std: float | None = None,
    pre_value_std: float | None = None,
    heads: int = 1,
) -> float:
    """Eq. 22 with every factor explicit (the steps of :func:`memory_output_variance`).

    ``Var(o) = [h s_pre^2] [d_prev sigma_P^2] E[s^2] [k n_head sigma_V^2] [d_v s_out^2]``, where
    ``s_pre``, ``s_out`` are the W_pre / W_v stds (default: small init), ``sigma_P`` the pre-value std
    (default sigma_V) and ``E[s^2]`` the second moment of the score that weights each value coordinate
    (``1 + sigma_s^2`` when the scores have mean 1).
    """
    s_pre = small_init_std(d_model) if pre_proj_std is None else pre_proj_std
    s_out = small_init_std(d_model) if out_proj_std is None else out_proj_std
    sigma_p = sigma_v if pre_value_std is None else pre_value_std
    x_pre = d_model * s_pre**2  # step 1
    pre_score = x_pre * d_pre * sigma_p**2  # step 2
    weight = pre_score * score_second_moment  # step 3
    pooled = weight * topm * heads * sigma_v**2  # step 4
    return pooled * d_value * s_out**2  # step 5


def predict_memory_variance(cfg: TuckerConfig, *, sigma_v: float, score_second_moment: float,
                            pre_proj_std: float | None = None, out_proj_std: float | None = None,
                            pre_value_std: float | None = None) -> float:
    """Predicted output variance of an UltraMemV2 layer built from ``cfg`` (one head).

    With multi-core scoring (``cfg.cores = c > 1``) core c's score weights channel slice c of every
    value, so ``score_second_moment`` must be the mean over cores of ``E[s_c^2]`` (the
    ``core_second_moment`` of :func:`score_statistics`), not ``1 + sigma_s^2`` of the summed score:
    with c = 2 similar cores each carries about half the summed score, so the branch is ~4x smaller
    than Eq. 22 read with the summed score.  Valid at init for Eq. 15 (no activation) and
    ``key_expand = 1`` (no two selected slots share a physical row).
    """
    if getattr(cfg, "activation", None) is not None:
        raise ValueError(f"predict_memory_variance is derived for activation=None (Eq. 15), got {cfg.activation!r}")
    return predict_memory_variance_from_dims(
        cfg.d_model, cfg.topm, cfg.d_pre, cfg.d_value, sigma_v=sigma_v, score_second_moment=score_second_moment,
        pre_proj_std=pre_proj_std, out_proj_std=out_proj_std, pre_value_std=pre_value_std,
    )


def value_std(
    d_model: int, n_layers: int, k_inner: float, topm: int, d_pre: int, d_value: int, sigma_s2: float, heads: int = 1
) -> float:
    """Eq. 26: ``sigma_V = (0.2 k_inner h / (k n_head (1 + sigma_s^2) d_prev d_v L))^(1/4)``.

    Setting Eq. 22 equal to Eq. 25,
    ``0.16 (1 + sigma_s^2) sigma_V^4 d_prev k n_head d_v / h = 0.064 k_inner / (2L)``, gives
    ``sigma_V^4 = 0.2 k_inner h / (k n_head (1 + sigma_s^2) d_prev d_v L)``.  The PDF extraction
    prints ``sigma_V^2`` on the left; the algebra needs the fourth power (docs/references.md Sec. 8 item 7).
    README 227M config (h=768, L=20, k=32, D_p=D_v=192, sigma_s^2=0.01, k_inner=3.25): 0.0677.
    """
    ratio = 0.2 * k_inner * d_model / (topm * heads * (1.0 + sigma_s2) * d_pre * d_value * n_layers)
    return ratio**0.25


def solve_value_std(target_variance: float, cfg: TuckerConfig, *, score_second_moment: float,
                    pre_proj_std: float | None = None, out_proj_std: float | None = None) -> float:
    """sigma_V (values and pre-values alike) that makes :func:`predict_memory_variance` equal ``target_variance``.

    The prediction is proportional to sigma_V^4, so ``sigma_V = (target / prediction at sigma_V=1)^(1/4)``.
    With the paper's target (Eq. 25), small-init projections and ``1 + sigma_s^2`` this is Eq. 26.
    """
    unit = predict_memory_variance(cfg, sigma_v=1.0, score_second_moment=score_second_moment,
                                   pre_proj_std=pre_proj_std, out_proj_std=out_proj_std)
    return (target_variance / unit) ** 0.25


# ---------------------------------------------------------------------------------------------
# Score calibration by Monte-Carlo (Appendix A.2)
# ---------------------------------------------------------------------------------------------


def _normed(x: torch.Tensor, kind: str, gain: float) -> torch.Tensor:
    """The layers' query/key normalisation over the last dim, gain included."""
    x = F.layer_norm(x, x.shape[-1:]) if kind == "layer" else F.rms_norm(x, x.shape[-1:])
    return gain * x


def score_statistics(cfg: TuckerConfig, gain: float, n_tokens: int = 4096, seed: int = 0,
                     cores: torch.Tensor | None = None) -> dict[str, float]:
    """Monte-Carlo statistics of the top-m TDQKR scores at norm gain ``gain`` (App. A.2).

    Queries and keys are random Gaussians passed through the layer's norm (``cfg.norm``) with gain
    ``gain`` -- after the norm only their directions are random, so this matches any query
    projection.  ``cores``: the Tucker cores ``[c, r, r]`` to score with (default: a fresh
    ``U[0, 1]`` draw, as the layers initialise them).  Retrieval is the layer's own: rank-1 prefilter
    with ``cfg.prefilter_k`` candidates, or the full grid when ``cfg.exact_topk``.

    Returns a dict of floats: ``mean`` / ``var`` (= sigma_s^2 when mean = 1) of the summed top-m
    score over tokens and slots, ``top1`` (mean best score), ``core_second_moment`` (mean over cores
    of ``E[s_c^2]``, the factor the value path sees under multi-core scoring).
    """
    g = torch.Generator().manual_seed(seed)
    n, r, dk, c = cfg.n_keys, cfg.rank, cfg.d_key, cfg.cores
    nq = r if cfg.per_rank_queries else 1
    dtype = torch.get_default_dtype() if cores is None else cores.dtype  # the layer's own precision
    q = _normed(torch.randn(n_tokens, 2, nq, dk, generator=g, dtype=dtype), cfg.norm, gain)  # [T, 2, nq, D_k]
    q = q.expand(n_tokens, 2, r, dk)  # [T, 2, r, D_k]
    keys = _normed(torch.randn(2, n, r, dk, generator=g, dtype=dtype), cfg.norm, gain)  # [2, n, r, D_k]
    if cores is None:
        cores = torch.rand(c, r, r, generator=g, dtype=dtype)  # [c, r, r]
    cores = cores.detach().cpu()
    s_row = torch.einsum("trd,nrd->tnr", q[:, 0], keys[0])  # [T, n, r]
    s_col = torch.einsum("trd,nrd->tnr", q[:, 1], keys[1])  # [T, n, r]
    scores, _ = tucker_topk(s_row, s_col, cores, cfg.topm, exact=cfg.exact_topk, k=cfg.prefilter_k)  # [T, m, c]
    total = scores.sum(-1)  # [T, m]
    return {
        "mean": total.mean().item(),
        "var": total.var(unbiased=False).item(),
        "top1": total[:, 0].mean().item(),
        "core_second_moment": scores.pow(2).mean().item(),
    }


def calibrate_norm_gain(cfg: TuckerConfig, n_tokens: int = 4096, seed: int = 0, cores: torch.Tensor | None = None,
                        tol: float = 1e-4, max_iter: int = 10) -> tuple[float, float]:
    """Shared query/key norm gain g with mean top-m score 1, and the resulting sigma_s^2 (App. A.2).

    Row and column scores are dot products of two normalised vectors each scaled by g, so they scale
    as g^2 and the bilinear grid score as g^4 (docs/references.md Sec. 7.4); the selection does not change
    under a positive rescale.  Starting from ``cfg.norm_gain``, multiply g by ``mean^(-1/4)`` and
    re-measure on the same draws until ``|mean - 1| < tol``.  The gain multiplies the normalised
    vectors, so the homogeneity is exact and the second measurement normally just confirms the first
    rescale (up to float rounding).  sigma_s^2 is the variance of the summed top-m scores at the
    calibrated gain.  See :func:`score_statistics` for the Monte-Carlo and ``cores``.
    """
    gain, stats = _calibrate(cfg, n_tokens, seed, cores, tol, max_iter)
    return gain, stats["var"]


def _calibrate(cfg: TuckerConfig, n_tokens: int, seed: int, cores: torch.Tensor | None, tol: float = 1e-4,
               max_iter: int = 10) -> tuple[float, dict[str, float]]:
    """:func:`calibrate_norm_gain`, also returning the :func:`score_statistics` at the final gain."""
    gain = float(cfg.norm_gain)
    for _ in range(max_iter):
        stats = score_statistics(cfg, gain, n_tokens, seed, cores)
        if stats["mean"] <= 0:
            raise ValueError(f"mean top-m score is {stats['mean']:.3g} <= 0 (n_keys={cfg.n_keys}, topm={cfg.topm}); "
                             "no positive norm gain makes it 1: use more keys or slots")
        if abs(stats["mean"] - 1.0) < tol:
            return gain, stats
        gain *= stats["mean"] ** -0.25
    raise RuntimeError(f"norm gain did not converge in {max_iter} steps (last mean {stats['mean']:.6f})")


# ---------------------------------------------------------------------------------------------
# Initialising a layer
# ---------------------------------------------------------------------------------------------


@dataclass
class InitReport:
    """What :func:`init_ultramemv2_` set, and the variances it predicts for the two branches."""

    scheme: str
    norm_gain: float
    sigma_s2: float  # variance / mean^2 of the summed top-m score (= Eq. 22's sigma_s^2 once the mean is 1)
    score_mean: float  # mean summed top-m score at norm_gain
    core_second_moment: float  # mean_c E[s_c^2], what the value path sees
    value_std: float  # values and pre-values
    query_std: float
    key_std: float
    pre_proj_std: float
    out_proj_std: float
    predicted_variance: float  # predict_memory_variance with core_second_moment (the layer as built)
    ffn_variance: float  # the FFN branch to match: Eq. 25, or the exact SiLU value when corrected


def init_ultramemv2_(
    layer: UltraMemV2,
    scheme: str = "paper",
    *,
    n_layers: int,
    k_inner: float,
    corrected: bool = False,
    n_tokens: int = 4096,
    seed: int = 0,
) -> InitReport:
    """Initialise ``layer`` in place (parameter draws use torch's global RNG) and report the choices.

    ``scheme="paper"`` (Appendix A, docs/references.md Sec. 6.5): query projection, W_pre and W_v all
    ``N(0, 2/(5h))`` (W_v *not* depth-scaled -- depth enters through L in Eq. 26); keys
    ``N(0, 1/D_k)`` (irrelevant after the norm); cores ``U[0, 1]``; query/key norm gains calibrated on
    these cores so the mean top-m score is 1 (:func:`calibrate_norm_gain`); values and pre-values
    ``N(0, sigma_V^2)`` with sigma_V from Eq. 26.  ``corrected=True`` instead solves sigma_V so that
    the layer *as built* matches the *true* SiLU FFN: target :func:`swiglu_output_variance_exact` and
    the per-core score moment (multi-core scoring) in place of ``1 + sigma_s^2``.

    ``scheme="official"`` (released code, docs/references.md §6.5 table): query projection and keys std
    ``1/sqrt(D_k)``, gains ``D_k^-0.4``, cores ``U[0, 1]``, W_pre std ``1/sqrt(h)``, W_v std
    ``1/sqrt(D_v)``, values and pre-values ``N(0, 0.02^2)``; ``n_layers``/``k_inner`` then only give the
    reported Eq. 25 FFN variance, for comparison with the predicted memory variance.

    ``k_inner`` is the FFN inner width over d_model (3.25 for the README 227M SwiGLU: 2496/768).
    A shared :class:`~umv2_ref.layers.ValuePool` is re-drawn whole (harmless for equal configs).
    ``layer.cfg`` is left untouched; the chosen gain lives in the norm weights and the report.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    if not isinstance(layer, UltraMemV2):
        raise TypeError(f"layer must be an UltraMemV2, got {type(layer).__name__}")
    if corrected and scheme != "paper":
        raise ValueError("corrected=True only applies to scheme='paper'")
    if layer.cfg.activation is not None:
        raise ValueError(f"Appendix A is derived for activation=None (Eq. 15); layer has {layer.cfg.activation!r}")
    ffn_var = (swiglu_output_variance_exact if corrected else ffn_output_variance)(k_inner, n_layers)  # validates
    cfg, ret = layer.cfg, layer.retrieval
    h, dk = cfg.d_model, cfg.d_key
    paper = scheme == "paper"
    query_std = small_init_std(h) if paper else dk**-0.5
    key_std = dk**-0.5
    pre_std = small_init_std(h) if paper else h**-0.5
    out_std = small_init_std(h) if paper else cfg.d_value**-0.5
    with torch.no_grad():
        nn.init.normal_(ret.query.weight, std=query_std)
        nn.init.normal_(ret.keys, std=key_std)
        nn.init.uniform_(ret.cores, 0.0, 1.0)
        u, v = rank1_factors(ret.cores)
        ret.rank1_u.copy_(u)
        ret.rank1_v.copy_(v)
        nn.init.normal_(layer.pre_proj.weight, std=pre_std)
        nn.init.normal_(layer.out_proj.weight, std=out_std)
    if paper:
        gain, stats = _calibrate(cfg, n_tokens, seed, ret.cores)
    else:
        gain = dk**-0.4
        stats = score_statistics(cfg, gain, n_tokens, seed, ret.cores)
    sigma_s2 = stats["var"] / stats["mean"] ** 2  # variance relative to a unit mean
    if corrected:
        sigma_v = solve_value_std(ffn_var, cfg, score_second_moment=stats["core_second_moment"])
    else:
        sigma_v = value_std(h, n_layers, k_inner, cfg.topm, cfg.d_pre, cfg.d_value, sigma_s2) if paper else 0.02
    pre_values, values = layer.tables()
    with torch.no_grad():
        for norm in (ret.query_norm, ret.key_norm):
            norm.weight.fill_(gain)
        nn.init.normal_(pre_values, std=sigma_v)
        nn.init.normal_(values, std=sigma_v)
    predicted = predict_memory_variance(cfg, sigma_v=sigma_v, score_second_moment=stats["core_second_moment"],
                                        pre_proj_std=pre_std, out_proj_std=out_std)
    return InitReport(scheme, gain, sigma_s2, stats["mean"], stats["core_second_moment"], sigma_v, query_std,
                      key_std, pre_std, out_std, predicted, ffn_var)
