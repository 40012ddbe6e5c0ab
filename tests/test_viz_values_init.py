"""The plot functions of notebooks 04-05 (umv2_ref/viz.py, "values and init" section)."""
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.ticker import NullFormatter

from umv2_ref import viz


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def test_log_curves_draws_each_curve_and_reference_line_on_a_log_axis():
    x = np.arange(1, 5)
    fig = viz.log_curves(x, {"a": [1e-3, 1e-2, 1e-1, 1.0], "b": torch.tensor([2.0, 2.0, 2.0, 2.0])}, "layer", "var",
                         hlines={"target": 0.5})
    ax = fig.axes[0]
    assert ax.get_yscale() == "log" and ax.get_xscale() == "linear"
    lines = ax.get_lines()
    assert len(lines) == 3
    np.testing.assert_allclose(lines[0].get_ydata(), [1e-3, 1e-2, 1e-1, 1.0])
    np.testing.assert_allclose(lines[2].get_ydata(), [0.5, 0.5])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a", "b", "target"]
    np.testing.assert_allclose(ax.get_xticks(), x)  # integer x (layers) gets integer ticks only


def test_log_curves_refuses_non_positive_values_and_mismatched_shapes():
    with pytest.raises(ValueError, match="> 0"):
        viz.log_curves([1, 2], {"a": [1.0, 0.0]}, "x", "y")
    with pytest.raises(ValueError, match="shape"):
        viz.log_curves([1, 2, 3], {"a": [1.0, 2.0]}, "x", "y")


def test_variance_steps_bars_match_inputs_and_ratios_are_annotated():
    pred, meas = [0.4, 0.1, 0.01], [0.42, 0.09, 0.01]
    fig = viz.variance_steps(["x~", "a", "o"], pred, meas)
    ax = fig.axes[0]
    heights = [p.get_height() for p in ax.patches]
    np.testing.assert_allclose(heights, pred + meas)
    ratios = [t.get_text() for t in ax.texts if t.get_gid() == "ratio"]
    assert ratios == ["x1.05", "x0.90", "x1.00"]
    assert ax.get_yscale() == "log"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["x~", "a", "o"]


def test_variance_steps_needs_one_value_per_step():
    with pytest.raises(ValueError, match="per step"):
        viz.variance_steps(["a", "b"], [1.0, 2.0], [1.0])


def test_prediction_vs_measurement_line_dots_references_and_marker():
    x = np.array([0.01, 0.1, 1.0])
    fig = viz.prediction_vs_measurement(x, x**4, 1.1 * x**4, "sigma_V", "variance",
                                        hlines={"FFN": 1e-4}, marker=0.1, marker_label="Eq. 26")
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    np.testing.assert_allclose(ax.get_lines()[0].get_ydata(), x**4)
    np.testing.assert_allclose(ax.collections[0].get_offsets()[:, 1], 1.1 * x**4)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "FFN" in labels and "Eq. 26 = 0.1" in labels
    assert isinstance(ax.xaxis.get_minor_formatter(), NullFormatter)  # no overlapping minor labels
    fig.canvas.draw()
    shown = {t.get_text() for t in ax.get_xticklabels() if t.get_visible()}
    assert {"0.02", "0.05", "0.1", "0.2", "0.5"} <= shown  # plain 1-2-5 labels on the log axis


def test_prediction_vs_measurement_refuses_bad_input():
    with pytest.raises(ValueError, match="share one shape"):
        viz.prediction_vs_measurement([1.0, 2.0], [1.0, 2.0], [1.0], "x", "y")
    with pytest.raises(ValueError, match="> 0"):
        viz.prediction_vs_measurement([1.0, 2.0], [1.0, -2.0], [1.0, 2.0], "x", "y")
