"""umv2_ref.viz: every plot returns a Figure with the expected axes and marks what it is told to."""
import math

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from umv2_ref import viz
from umv2_ref.retrieval import product_key_topk

matplotlib.use("Agg")


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def images(fig: Figure) -> int:
    return sum(len(ax.images) for ax in fig.axes)


def test_key_score_grid_outlines_the_topk_cells():
    n, k = 8, 5
    s_row, s_col = torch.randn(n), torch.randn(n)
    _, idx = product_key_topk(s_row, s_col, k)
    grid = s_row[:, None] + s_col[None, :]
    fig = viz.key_score_grid(grid, selected=idx, row_candidates=s_row.topk(k).indices,
                             col_candidates=s_col.topk(k).indices)
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 2 and images(fig) == 1  # heatmap + colorbar
    want = {divmod(int(s), n) for s in idx}
    assert set(viz.highlighted_cells(fig)) == want
    # the outlined cells are the k largest entries of the grid
    top = grid.flatten().topk(k).indices
    assert want == {divmod(int(s), n) for s in top}
    rows = viz.highlighted_cells(fig, "row_candidate")
    cols = viz.highlighted_cells(fig, "col_candidate")
    assert sorted(rows) == sorted((int(p), -1) for p in s_row.topk(k).indices)
    assert sorted(cols) == sorted((-1, int(p)) for p in s_col.topk(k).indices)
    assert len(viz.highlighted_cells(fig, "dimmed")) == 2 * (n - k)


def test_key_score_grid_without_highlights_and_bad_shape():
    fig = viz.key_score_grid(np.zeros((4, 4)))
    assert viz.highlighted_cells(fig) == []
    with pytest.raises(ValueError, match=r"\[n, n\]"):
        viz.key_score_grid(np.zeros((3, 4)))


def test_factor_quadrants_splits_found_and_missed():
    a, b = torch.randn(10), torch.randn(10)
    found = torch.tensor([True, False, True, True])
    fig = viz.factor_quadrants(a, b, torch.tensor([0, 1, 2, 3]), torch.tensor([4, 5, 6, 7]), found)
    ax = fig.axes[0]
    sizes = [len(c.get_offsets()) for c in ax.collections]
    assert sizes == [3, 1]
    np.testing.assert_allclose(ax.collections[1].get_offsets()[0], [a[1].item(), b[5].item()], rtol=1e-6)


def test_usage_metrics_known_values():
    m = viz.usage_metrics([1, 1, 1, 1])
    assert m == {"fraction_used": 1.0, "kl_uniform": pytest.approx(0.0, abs=1e-12), "dead": 0}
    m = viz.usage_metrics([3, 3, 0, 0, 0, 0, 0, 0])  # a quarter of the slots, used uniformly
    assert m["fraction_used"] == 0.25 and m["dead"] == 6
    assert m["kl_uniform"] == pytest.approx(math.log(4))
    with pytest.raises(ValueError):
        viz.usage_metrics([0, 0])


def test_slot_usage_heatmap_matches_counts():
    counts = torch.arange(16.0)
    fig = viz.slot_usage(counts)
    assert len(fig.axes) == 3  # heatmap, histogram, the heatmap's colorbar
    np.testing.assert_array_equal(fig.axes[0].images[0].get_array(), counts.reshape(4, 4).numpy())
    assert "dead 1/16" in fig._suptitle.get_text()
    assert sum(p.get_height() for p in fig.axes[1].patches) == 16
    with pytest.raises(ValueError, match="n x n"):
        viz.slot_usage(torch.ones(15))


def test_sorted_usage_one_line_per_curve():
    fig = viz.sorted_usage({"a": np.ones(9), "b": np.arange(9.0)})
    ax = fig.axes[0]
    assert len(ax.lines) == 3  # two curves + the uniform reference
    np.testing.assert_allclose(ax.lines[1].get_ydata(), np.sort(np.arange(9.0) / 36)[::-1])


def test_slot_activations_places_weights():
    idx = torch.tensor([[3, 7], [7, 1]])
    w = torch.tensor([[0.5, -1.0], [2.0, 0.25]])
    fig = viz.slot_activations(idx, w, n_slots=10)
    data = fig.axes[0].images[0].get_array()
    # columns are slots 1, 3, 7
    np.testing.assert_allclose(data, [[0.0, 0.5, -1.0], [0.25, 0.0, 2.0]])
    per_core = torch.stack([w, w], -1) / 2
    np.testing.assert_allclose(viz.slot_activations(idx, per_core, 10).axes[0].images[0].get_array(), data)


def test_value_distributions_and_contribution_norms():
    fig = viz.value_distributions({"x": torch.randn(100), "y": torch.randn(100) * 2}, bins=10)
    assert len(fig.axes) == 1 and len(fig.axes[0].patches) == 20
    fig = viz.contribution_norms(torch.tensor([3.0, 1.0, 2.0]), labels=["a", "b", "c"])
    assert [p.get_height() for p in fig.axes[0].patches] == [3.0, 1.0, 2.0]


def test_core_heatmaps_one_panel_per_core_plus_sum():
    cores = torch.rand(3, 2, 2)
    fig = viz.core_heatmaps(cores)
    assert len(fig.axes) == 4
    np.testing.assert_allclose(fig.axes[-1].images[0].get_array(), cores.sum(0).numpy(), rtol=1e-6)
    assert len(fig.axes[0].texts) == 4  # annotated entries
    with pytest.raises(ValueError):
        viz.core_heatmaps(torch.rand(2, 3))


def test_singular_values_bars_and_margin():
    fig = viz.singular_values(torch.tensor([2.0, 0.5]), tau=0.15)
    ax = fig.axes[0]
    assert [p.get_height() for p in ax.patches] == [2.0, 0.5]
    assert len(ax.lines) == 1 and "0.250" in ax.get_title()


def test_recall_plot_curves_and_checks():
    x = np.array([1, 2, 4])
    fig = viz.recall_plot(x, {"a": [0.2, 0.5, 0.9], "b": np.ones(3)}, xlabel="k", logx=True)
    ax = fig.axes[0]
    assert len(ax.lines) == 3 and ax.get_xscale() == "log" and ax.get_ylim() == (0, 1.05)
    with pytest.raises(ValueError, match="shape"):
        viz.line_plot(x, {"bad": [1, 2]}, "x", "y")


def test_figures_are_pyplot_managed_so_notebooks_can_close_them():
    fig = viz.key_score_grid(np.zeros((3, 3)))
    assert fig.number in plt.get_fignums()
    plt.close(fig)
    assert fig.number not in plt.get_fignums()
