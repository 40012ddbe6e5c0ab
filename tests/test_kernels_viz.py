"""viz.bytes_breakdown, the bytes plot of notebook 07."""
import matplotlib.pyplot as plt
import pytest

from umv2_ref import viz


def test_bytes_breakdown_stacks_components():
    fig = viz.bytes_breakdown({"naive": {"rows": 3e9, "gathers": 6e9}, "fused": {"rows": 3e9}})
    ax = fig.axes[0]
    widths = sorted(round(p.get_width(), 6) for p in ax.patches)
    assert widths == [0.0, 3.0, 3.0, 6.0]  # the fused bar has no "gathers" part
    assert [t.get_text() for t in ax.get_yticklabels()] == ["naive", "fused"]
    plt.close(fig)


def test_bytes_breakdown_rejects_bad_input():
    with pytest.raises(ValueError, match="at least one"):
        viz.bytes_breakdown({})
    with pytest.raises(ValueError, match="negative"):
        viz.bytes_breakdown({"x": {"rows": -1.0}})
