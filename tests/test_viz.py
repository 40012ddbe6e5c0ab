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


# --- figure fixes of issue 10 ----------------------------------------------------------------------


def test_prefilter_grid_marks_found_missed_and_extra_slots():
    grid = torch.arange(16.0).reshape(4, 4)
    fig = viz.key_score_grid(grid, selected=[15, 14, 11], returned=[15, 11, 3])
    assert sorted(viz.highlighted_cells(fig, "found")) == [(2, 3), (3, 3)]
    assert viz.highlighted_cells(fig, "missed") == [(3, 2)]
    assert viz.highlighted_cells(fig, "extra") == [(0, 3)]
    assert len(fig.axes[0].get_legend().get_texts()) == 4


def test_categorical_grid_has_one_colour_per_category_and_no_colourbar():
    blocks = np.array([[0, 1], [2, 3]])
    fig = viz.key_score_grid(blocks, categories=4, category_label="block")
    assert len(fig.axes) == 1  # no continuous colour bar
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["block 0", "block 1", "block 2", "block 3"]
    im = fig.axes[0].images[0]
    colours = {tuple(im.to_rgba(np.array([[v]]))[0, 0]) for v in range(4)}
    assert len(colours) == 4


def test_key_axes_have_integer_ticks():
    fig = viz.key_score_grid(np.random.rand(10, 10))
    ax = fig.axes[0]
    for ticks in (ax.get_xticks(), ax.get_yticks()):
        assert np.allclose(ticks, np.round(ticks))


def test_dead_slots_have_a_colour_no_live_count_takes():
    counts = np.array([0, 1, 2, 25] + [30] * 12, dtype=float)
    fig = viz.slot_usage(counts)
    im = fig.axes[0].images[0]
    dead = np.array(im.to_rgba(np.array([[0.0]]))[0, 0][:3])
    np.testing.assert_allclose(dead, matplotlib.colors.to_rgb(viz.DEAD_COLOR))
    live = im.to_rgba(np.linspace(1, 30, 300)[None])[0, :, :3]
    assert np.linalg.norm(live - dead, axis=1).min() > 0.5  # every live count is far from the dead colour
    # integer counts: one histogram bar per integer value
    assert len(fig.axes[1].patches) == 31


def test_long_curves_have_no_markers():
    steps = np.arange(600)
    fig = viz.loss_curves({"lr": (steps, np.ones(600))})
    assert fig.axes[0].lines[0].get_marker() in (None, "None", "")
    fig = viz.loss_curves({"loss": (steps[:10], np.ones(10))})
    assert fig.axes[0].lines[0].get_marker() == "o"


def test_contribution_norms_names_its_bars_and_activations_separate_groups():
    fig = viz.contribution_norms([1.0, 2.0], labels=["block 0", "block 1"], xlabel="virtual block p")
    assert fig.axes[0].get_xlabel() == "virtual block p"
    idx = torch.arange(80).reshape(8, 10) % 60
    fig = viz.slot_activations(idx, torch.ones(8, 10), 60, groups=[0, 0, 1, 1, 1, 2, 2, 2])
    ax = fig.axes[0]
    assert [line.get_ydata()[0] for line in ax.lines] == [1.5, 4.5]
    assert len(ax.get_xticklabels()) <= 40
    with pytest.raises(ValueError, match="groups"):
        viz.slot_activations(idx, torch.ones(8, 10), 60, groups=[1, 0, 0, 0, 0, 0, 0, 0])
    fig = viz.slot_activations(torch.tensor([[5, 2], [2, 9]]), torch.tensor([[1.0, 2.0], [3.0, 4.0]]), 10,
                               order="first_use")
    np.testing.assert_allclose(fig.axes[0].images[0].get_array(), [[1.0, 2.0, 0.0], [0.0, 3.0, 4.0]])


# --- schematic diagrams ---------------------------------------------------------------------------

SCHEMATICS = {
    "product_key_diagram": ["[d_q/2]", "I_row: [k]", "I_col: [k]", "[k, k]", "slot ids i·n+j: [k]", "[D_v]"],
    "tdqkr_diagram": ["[r, D_k]", "[n, r]", "I: [k]", "J: [k]", "[c, r, r]", "[c, k, k]", "[m], [m, c]"],
    "value_expansion_diagram": ["scores s: [m]", "physical table V: [N, D_v]", "pooled per block: [E, D_v]", "[d]"],
    "ultramemv2_block_diagram": ["h_l: [T, d]", "x̄: [T, d]", "ids [T, m]; s [T, m, c]", "[T, D_p]", "w: [T, m, c]"],
    "fused_kernel_diagram": ["[T, m, D_p] (HBM)", "[T, m, D_v] (HBM)", "z: [T, D_v], written once"],
}


@pytest.mark.parametrize("name", sorted(SCHEMATICS))
def test_schematic_renders_with_shapes_on_its_arrows(name):
    fig = getattr(viz, name)()
    fig.canvas.draw()  # lays out every text (mathtext included) without error
    labels = viz.schematic_labels(fig)
    for shape in SCHEMATICS[name]:
        assert shape in labels, f"{name}: no arrow labelled {shape!r}; got {labels}"
    edges = [t for t in fig.axes[0].texts if t.get_gid() == "edge"]
    assert len(edges) >= 5, f"{name}: expected a pipeline of arrows"
    assert fig.axes[0].get_title()


def test_product_key_inset_puts_the_topk_inside_the_candidate_block():
    n, k = 8, 3
    fig = viz.product_key_diagram(n=n, k=k)
    ax = fig.axes[0]
    cells = [p for p in ax.patches if p.get_gid() == "grid_cell"]
    chosen = [p for p in ax.patches if p.get_gid() == "grid_selected"]
    assert len(cells) == n * n and len(chosen) == k
    block = {p.get_xy() for p in cells if p.get_facecolor()[:3] != matplotlib.colors.to_rgb("#f4f4f4")}
    assert len(block) == k * k and {p.get_xy() for p in chosen} <= block
    with pytest.raises(ValueError, match="k"):
        viz.product_key_diagram(n=4, k=5)


def test_value_expansion_diagram_follows_the_shuffle():
    n, expand, picks = 4, 4, (1, 6, 11)
    fig = viz.value_expansion_diagram(n=n, expand=expand, picks=picks)
    ax = fig.axes[0]
    assert len([p for p in ax.patches if p.get_gid() == "virtual_slot"]) == n * n
    assert len([p for p in ax.patches if p.get_gid() == "physical_row"]) == n * n // expand
    assert len([p for p in ax.patches if p.get_gid() == "virtual_selected"]) == len(picks)
    with pytest.raises(ValueError, match="multiple"):
        viz.value_expansion_diagram(n=3, expand=4)


def test_each_schematic_is_drawn_in_its_notebooks():
    from pathlib import Path

    src = Path(__file__).resolve().parents[1] / "notebooks" / "src"
    where = {"01": "product_key_diagram", "02": "tdqkr_diagram", "03": "value_expansion_diagram",
             "04": "ultramemv2_block_diagram", "06": "ultramemv2_block_diagram", "07": "fused_kernel_diagram"}
    for number, name in where.items():
        (path,) = src.glob(f"{number}_*.py")
        assert f"viz.{name}(" in path.read_text(), f"{path.name} should draw viz.{name}()"
