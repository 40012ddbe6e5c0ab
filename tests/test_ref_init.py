"""UltraMemV2 Appendix A initialisation: closed forms, the paper's numbers, and Monte-Carlo checks.

Monte-Carlo tolerances.  A layer's measured output variance fluctuates around the prediction
because one draw of W_pre (D_p rows), the tables, W_v and the keys is fixed: for the config below
the ratio measured / predicted was 0.947-1.012 over torch seeds 0-4 (8192 tokens), hence a 10%
band.  The FFN branch (d=256, inner 768, 8192 tokens) stayed within 2% of the exact-SiLU
prediction over seeds 0-4, hence 5%.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from umv2_ref.init import (
    calibrate_norm_gain,
    ffn_output_variance,
    init_ultramemv2_,
    memory_output_variance,
    predict_memory_variance,
    score_statistics,
    silu_second_moment,
    small_init_std,
    solve_value_std,
    swiglu_output_variance_exact,
    value_std,
)
from umv2_ref.layers import PKM, PKMConfig, UltraMemV2, UltraMemV2Config, ValuePool
from umv2_ref.retrieval import rank1_factors

TOKENS = 8192
CFG = dict(d_model=256, n_keys=64, d_key=64, topm=16, d_pre=64, d_value=64)


def measured_variance(layer: UltraMemV2) -> float:
    with torch.no_grad():
        return layer(torch.randn(TOKENS, layer.cfg.d_model)).output.var().item()


# ---------------------------------------------------------------------------------------------
# Closed forms against docs/references.md Sec. 7
# ---------------------------------------------------------------------------------------------


def test_small_init_constants():
    assert small_init_std(768) == pytest.approx(0.0228218, abs=1e-7)  # the README init_std
    assert small_init_std(1152) == pytest.approx(0.0186339, abs=1e-7)
    assert small_init_std(2048) == pytest.approx(0.0139754, abs=1e-7)


def test_silu_second_moment_is_0123_not_04():
    exact = silu_second_moment(0.4)
    assert exact == pytest.approx(0.123, abs=5e-4)  # docs/references.md Sec. 7.2
    z = torch.randn(2_000_000, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * math.sqrt(0.4)
    assert F.silu(z).pow(2).mean().item() == pytest.approx(exact, rel=5e-3)  # std error ~0.3%


def test_ffn_variance_paper_and_exact():
    assert ffn_output_variance(3.25, 20) == pytest.approx(0.0052, rel=1e-9)  # Eq. 25, docs/references.md Sec. 7.2
    ratio = swiglu_output_variance_exact(3.25, 20) / ffn_output_variance(3.25, 20)
    assert ratio == pytest.approx(0.307, abs=1e-3)  # E[SiLU^2] / 0.4
    assert swiglu_output_variance_exact(3.25, 20) == pytest.approx(0.00159, abs=1e-5)


def test_eq26_value_std_numbers_and_consistency_with_eqs_22_25():
    args = dict(d_model=768, n_layers=20, topm=32, d_pre=192, d_value=192, sigma_s2=0.01)
    assert value_std(k_inner=3.25, **args) == pytest.approx(0.0677, abs=1e-4)  # docs/references.md Sec. 7.3
    assert value_std(k_inner=6.5, **args) == pytest.approx(0.0805, abs=1e-4)
    sigma_v = value_std(k_inner=3.25, **args)
    mem = memory_output_variance(sigma_v, 0.01, 768, 32, 192, 192)
    assert mem == pytest.approx(ffn_output_variance(3.25, 20), rel=1e-12)  # Eq. 26 solves Eq. 22 = Eq. 25
    cfg = UltraMemV2Config(d_model=768, n_keys=8, d_key=8, topm=8, d_pre=192, d_value=192)
    eq22 = memory_output_variance(0.05, 0.02, 768, 8, 192, 192)
    assert predict_memory_variance(cfg, sigma_v=0.05, score_second_moment=1.02) == pytest.approx(eq22, rel=1e-12)
    solved = solve_value_std(ffn_output_variance(3.25, 20), cfg, score_second_moment=1.01)
    assert solved == pytest.approx(value_std(768, 20, 3.25, 8, 192, 192, 0.01), rel=1e-12)


def test_ffn_branch_monte_carlo_matches_exact_silu_not_eq25():
    h, k_inner, n_layers = 256, 3, 8
    std = small_init_std(h)
    w1, w2 = torch.randn(h, k_inner * h) * std, torch.randn(h, k_inner * h) * std
    w3 = torch.randn(k_inner * h, h) * std / math.sqrt(2 * n_layers)  # last linear depth-scaled
    x = torch.randn(TOKENS, h)
    measured = ((F.silu(x @ w1) * (x @ w2)) @ w3).var().item()
    exact, paper = swiglu_output_variance_exact(k_inner, n_layers), ffn_output_variance(k_inner, n_layers)
    print(f"\nFFN branch: measured {measured:.3e}, exact-SiLU {exact:.3e}, Eq. 25 {paper:.3e}")
    assert measured == pytest.approx(exact, rel=0.05)
    assert 0.25 < measured / paper < 0.37  # Eq. 25 overstates the real FFN ~3.3x


# ---------------------------------------------------------------------------------------------
# Score calibration (App. A.2)
# ---------------------------------------------------------------------------------------------


def test_scores_scale_as_gain_to_the_fourth():
    cfg = UltraMemV2Config(**CFG)
    base, doubled = score_statistics(cfg, 0.2, 1024), score_statistics(cfg, 0.4, 1024)
    assert doubled["mean"] == pytest.approx(16 * base["mean"], rel=1e-4)
    assert doubled["var"] == pytest.approx(256 * base["var"], rel=1e-3)


def test_calibrated_gain_gives_unit_mean_score():
    cfg = UltraMemV2Config(**CFG)
    gain, sigma_s2 = calibrate_norm_gain(cfg, n_tokens=1024)
    stats = score_statistics(cfg, gain, 1024)
    assert stats["mean"] == pytest.approx(1.0, abs=1e-4)
    assert stats["var"] == pytest.approx(sigma_s2, rel=1e-3)
    assert 0 < sigma_s2 < 0.2 and stats["top1"] > 1.0
    print(f"\ncalibrated gain {gain:.4f} (code default D_k^-0.4 = {64 ** -0.4:.4f}), sigma_s^2 {sigma_s2:.4f}")


# ---------------------------------------------------------------------------------------------
# Initialising a layer: predictions vs Monte-Carlo
# ---------------------------------------------------------------------------------------------


def test_paper_scheme_sets_appendix_a_values():
    layer = UltraMemV2(UltraMemV2Config(**CFG))
    report = init_ultramemv2_(layer, "paper", n_layers=8, k_inner=3.0)
    small = small_init_std(256)
    for weight in (layer.retrieval.query.weight, layer.pre_proj.weight, layer.out_proj.weight):
        assert weight.std().item() == pytest.approx(small, rel=0.05)  # W_v not depth-scaled
    assert report.out_proj_std == small
    sigma_s2 = report.sigma_s2
    assert report.value_std == pytest.approx(value_std(256, 8, 3.0, 16, 64, 64, sigma_s2), rel=1e-12)
    for table in layer.tables():
        assert table.std().item() == pytest.approx(report.value_std, rel=0.05)
    for norm in (layer.retrieval.query_norm, layer.retrieval.key_norm):
        assert torch.all(norm.weight == report.norm_gain)
    u, v = rank1_factors(layer.retrieval.cores)
    assert torch.equal(layer.retrieval.rank1_u, u) and torch.equal(layer.retrieval.rank1_v, v)
    assert 0 <= layer.retrieval.cores.min() and layer.retrieval.cores.max() <= 1


def test_paper_scheme_single_core_matches_eq22_literally():
    """With one core the score that weights the values is the calibrated score: Eq. 22 = Eq. 25 holds."""
    layer = UltraMemV2(UltraMemV2Config(**CFG, cores=1))
    report = init_ultramemv2_(layer, "paper", n_layers=8, k_inner=3.0)
    assert report.predicted_variance == pytest.approx(report.ffn_variance, rel=1e-3)
    measured = measured_variance(layer)
    print(f"\npaper scheme, c=1: measured {measured:.3e}, Eq. 22/25 {report.ffn_variance:.3e}")
    assert measured == pytest.approx(report.predicted_variance, rel=0.10)


def test_paper_scheme_multicore_is_four_times_below_eq22():
    """c=2 cores each weight half of every value with about half the summed score: ~1/4 of Eq. 22."""
    layer = UltraMemV2(UltraMemV2Config(**CFG))
    report = init_ultramemv2_(layer, "paper", n_layers=8, k_inner=3.0)
    with torch.no_grad():
        out = layer(torch.randn(TOKENS, 256))
    measured = out.output.var().item()
    print(f"\npaper scheme, c=2: measured {measured:.3e}, predicted {report.predicted_variance:.3e}, "
          f"Eq. 22 with summed scores {report.ffn_variance:.3e}")
    assert out.scores.sum(-1).mean().item() == pytest.approx(1.0, abs=0.03)  # calibration holds on the layer
    assert measured == pytest.approx(report.predicted_variance, rel=0.10)
    assert measured < 0.5 * report.ffn_variance


def test_corrected_paper_scheme_matches_the_true_silu_ffn():
    layer = UltraMemV2(UltraMemV2Config(**CFG))
    report = init_ultramemv2_(layer, "paper", n_layers=8, k_inner=3.0, corrected=True)
    assert report.ffn_variance == swiglu_output_variance_exact(3.0, 8)
    assert report.predicted_variance == pytest.approx(report.ffn_variance, rel=1e-9)
    measured = measured_variance(layer)
    print(f"\ncorrected scheme: measured {measured:.3e}, exact-SiLU FFN {report.ffn_variance:.3e}")
    assert measured == pytest.approx(report.ffn_variance, rel=0.10)


def test_official_scheme_constants_and_prediction():
    layer = UltraMemV2(UltraMemV2Config(**CFG))
    report = init_ultramemv2_(layer, "official", n_layers=8, k_inner=3.0)
    ret = layer.retrieval
    assert ret.query.weight.std().item() == pytest.approx(64**-0.5, rel=0.05)
    assert ret.keys.std().item() == pytest.approx(64**-0.5, rel=0.05)
    assert layer.pre_proj.weight.std().item() == pytest.approx(256**-0.5, rel=0.05)
    assert layer.out_proj.weight.std().item() == pytest.approx(64**-0.5, rel=0.05)
    assert report.value_std == 0.02 and layer.values.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.all(ret.query_norm.weight == 64**-0.4)
    measured = measured_variance(layer)
    print(f"\nofficial scheme: measured {measured:.3e}, predicted {report.predicted_variance:.3e}, "
          f"mean top-m score {report.score_mean:.3f}")
    assert measured == pytest.approx(report.predicted_variance, rel=0.10)


def test_init_reaches_a_shared_value_pool():
    cfg = UltraMemV2Config(**CFG)
    pool = ValuePool(2 * cfg.window, cfg.d_pre, cfg.d_value)
    layer = UltraMemV2(cfg, pool=pool, offset=cfg.window)
    report = init_ultramemv2_(layer, "paper", n_layers=8, k_inner=3.0)
    assert pool.values.std().item() == pytest.approx(report.value_std, rel=0.05)


def test_init_rejects_bad_arguments():
    layer = UltraMemV2(UltraMemV2Config(**CFG))
    with pytest.raises(ValueError, match="scheme"):
        init_ultramemv2_(layer, "xavier", n_layers=8, k_inner=3.0)
    with pytest.raises(ValueError, match="corrected"):
        init_ultramemv2_(layer, "official", n_layers=8, k_inner=3.0, corrected=True)
    with pytest.raises(TypeError, match="UltraMemV2"):
        init_ultramemv2_(PKM(PKMConfig(d_model=8)), "paper", n_layers=8, k_inner=3.0)
    with pytest.raises(ValueError, match="n_layers"):
        init_ultramemv2_(layer, "paper", n_layers=0, k_inner=3.0)
    with pytest.raises(ValueError, match="activation"):
        init_ultramemv2_(UltraMemV2(UltraMemV2Config(**CFG, activation="gelu")), "paper", n_layers=8, k_inner=3.0)
    with pytest.raises(ValueError, match="activation"):
        predict_memory_variance(UltraMemV2Config(**CFG, activation="gelu"), sigma_v=0.1, score_second_moment=1.0)
    with pytest.raises(ValueError, match="h"):
        small_init_std(0)
