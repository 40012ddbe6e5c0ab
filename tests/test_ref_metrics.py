"""Slot-usage statistics (docs/references.md Secs. 2.3, 7.7) and the usage tracker."""
import math

import pytest
import torch

from umv2_ref.layers import UltraMemV2, UltraMemV2Config
from umv2_ref.metrics import (
    UsageTracker,
    dead_slots,
    kl_to_uniform,
    score_means,
    slot_counts,
    tucker_singular_values,
    uniform_usage_baseline,
    usage_fraction,
)


def test_counts_unweighted_and_weighted():
    idx = torch.tensor([[0, 2], [2, 3]])
    torch.testing.assert_close(slot_counts(idx, 5), torch.tensor([1.0, 0, 2, 1, 0], dtype=torch.float64))
    w = torch.tensor([[0.5, -1.0], [2.0, 0.25]])
    torch.testing.assert_close(slot_counts(idx, 5, w), torch.tensor([0.5, 0, 3.0, 0.25, 0], dtype=torch.float64))
    per_core = torch.stack([w, w], -1) / 2  # [T, S, c=2], summed over cores first
    torch.testing.assert_close(slot_counts(idx, 5, per_core), slot_counts(idx, 5, w))


def test_kl_usage_and_dead_slots_on_known_distributions():
    quarter = torch.tensor([3.0, 3.0, 3.0, 3.0] + [0.0] * 12)  # a quarter of the slots, used uniformly
    assert kl_to_uniform(quarter) == pytest.approx(math.log(4))  # 1.386, docs/references.md Sec. 7.7
    assert usage_fraction(quarter) == 0.25 and dead_slots(quarter) == 12
    assert kl_to_uniform(torch.ones(10)) == pytest.approx(0.0, abs=1e-12)
    one_hot = torch.zeros(8)
    one_hot[3] = 5.0
    assert kl_to_uniform(one_hot) == pytest.approx(math.log(8))


def test_uniform_baseline_matches_random_access():
    n_slots, lookups = 1000, 2000
    counts = slot_counts(torch.randint(0, n_slots, (lookups,)), n_slots)
    expected = uniform_usage_baseline(lookups, n_slots)
    assert expected == pytest.approx(1 - math.exp(-2), abs=1e-3)
    assert usage_fraction(counts) == pytest.approx(expected, abs=0.03)  # binomial std ~0.01


def test_score_means_for_plain_and_per_core_scores():
    idx = torch.zeros(2, 3, dtype=torch.long)
    scores = torch.tensor([[3.0, 2.0, 1.0], [5.0, 0.0, 1.0]])
    assert score_means(scores, idx) == {"top1": 4.0, "topm": 2.0}
    assert score_means(torch.stack([scores, scores], -1) / 2, idx) == {"top1": 4.0, "topm": 2.0}


def test_tucker_singular_values_of_the_summed_core():
    cores = torch.stack([torch.diag(torch.tensor([2.0, 0.1])), torch.diag(torch.tensor([1.0, 0.2]))])
    torch.testing.assert_close(tucker_singular_values(cores), torch.tensor([3.0, 0.3], dtype=torch.float64))


def test_tracker_accumulates_a_layers_outputs():
    layer = UltraMemV2(UltraMemV2Config(d_model=16, n_keys=8, d_key=8, topm=4, d_pre=8, d_value=8))
    tracker = UsageTracker(layer.cfg.window)
    outs = [layer(torch.randn(10, 16)) for _ in range(3)]
    for out in outs:
        tracker.update(out.indices, out.scores)
    all_idx = torch.cat([o.indices for o in outs])
    torch.testing.assert_close(tracker.counts, slot_counts(all_idx, 64))
    summary = tracker.summary()
    assert summary["lookups"] == 120 and summary["usage"] == usage_fraction(tracker.counts)
    assert summary["kl"] == pytest.approx(kl_to_uniform(tracker.counts))
    weighted = slot_counts(all_idx, 64, torch.cat([o.scores for o in outs]))
    assert summary["kl_weighted"] == pytest.approx(kl_to_uniform(weighted))
    assert summary["uniform_usage"] == pytest.approx(uniform_usage_baseline(120, 64))
    tracker.reset()
    assert tracker.lookups == 0 and tracker.counts.sum() == 0
