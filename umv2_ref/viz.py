"""Plots for the notebooks: pure functions of arrays that return a matplotlib ``Figure``.

Every function takes tensors or NumPy arrays (tensors are detached and moved to the CPU), draws
a new figure and returns it without showing it; notebooks display the returned figure, tests
inspect its axes and artists and close it.  Highlight patches carry a ``gid`` (``"selected"``,
``"row_candidate"``, ``"col_candidate"``) so a test can find exactly the cells a plot marks.

Grid convention (as :mod:`umv2_ref.retrieval`): slot ``i * n + j`` is row i, column j, drawn at
image coordinates ``(x=j, y=i)``.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Circle, FancyBboxPatch, Patch, Rectangle
from matplotlib.ticker import MaxNLocator

from . import metrics


def _np(x) -> np.ndarray:
    """Tensor or array-like -> NumPy array (detached, on the CPU)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _integer_ticks(ax) -> None:
    """Key and slot axes count things: ticks only at integers."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def _category_colors(n: int) -> ListedColormap:
    """n clearly distinct colours for categorical ids 0..n-1 (tab10, then tab20)."""
    base = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return ListedColormap([base(i % base.N) for i in range(n)])


def _square_side(size: int) -> int:
    n = int(round(size**0.5))
    if n * n != size:
        raise ValueError(f"expected n*n values to draw as an n x n grid, got {size}")
    return n


# ---------------------------------------------------------------------------------------------
# Key-score grids (PKM / TDQKR)
# ---------------------------------------------------------------------------------------------


def key_score_grid(
    grid,
    selected=None,
    row_candidates=None,
    col_candidates=None,
    title: str = "slot scores",
    cmap: str = "viridis",
    returned=None,
    categories: int | None = None,
    category_label: str = "category",
) -> Figure:
    """Heatmap of an ``[n, n]`` slot-score grid with the chosen slots outlined.

    Args:
        grid: ``[n, n]`` scores, ``grid[i, j]`` for slot ``i * n + j``.
        selected: flat slot ids to outline in red (black on a categorical grid), e.g. the top-k.
        row_candidates, col_candidates: per-axis candidate rows / columns (the k x k candidate set
            of the product-key search or the rank-1 prefilter): marked by orange bars in the margin,
            while the other rows and columns are dimmed.
        returned: flat slot ids an approximate search returned.  Each selected slot then gets a
            marker: a white dot if it was returned (``gid="found"``), a white cross if it was
            missed (``gid="missed"``); returned slots outside ``selected`` get a dashed white outline
            (``gid="extra"``).
        categories: draw ``grid`` as integer categories ``0..categories-1`` with one distinct colour
            each and a legend instead of a continuous colour bar (e.g. the block id of a slot).
    """
    grid = _np(grid).astype(float)
    if grid.ndim != 2 or grid.shape[0] != grid.shape[1]:
        raise ValueError(f"grid must be [n, n], got shape {grid.shape}")
    n = grid.shape[0]
    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    if categories is None:
        im = ax.imshow(grid, cmap=cmap, origin="upper", interpolation="nearest")
        fig.colorbar(im, ax=ax, shrink=0.85)
    else:
        colors = _category_colors(categories)
        ax.imshow(grid, cmap=colors, norm=BoundaryNorm(np.arange(-0.5, categories), categories),
                  origin="upper", interpolation="nearest")
        handles = [Patch(color=colors(c), label=f"{category_label} {c}") for c in range(categories)]
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)
    for gid, picks, horizontal in (("row_candidate", row_candidates, True), ("col_candidate", col_candidates, False)):
        if picks is None:
            continue
        picks = set(_np(picks).reshape(-1).tolist())
        for p in range(n):
            if p in picks:  # an orange bar in the margin marks each candidate row / column
                xy = (-1.7, p - 0.5) if horizontal else (p - 0.5, -1.7)
                ax.add_patch(Rectangle(xy, 1, 1, facecolor="tab:orange", edgecolor="none", clip_on=False, gid=gid))
            else:  # non-candidates are dimmed, so the k x k candidate block stays bright
                xy, w, h = ((-0.5, p - 0.5), n, 1) if horizontal else ((p - 0.5, -0.5), 1, n)
                ax.add_patch(Rectangle(xy, w, h, facecolor="black", alpha=0.35, edgecolor="none", gid="dimmed"))
        ax.set_xlim(-1.9, n - 0.5)
        ax.set_ylim(n - 0.5, -1.9)
    chosen = [] if selected is None else [int(s) for s in _np(selected).reshape(-1).tolist()]
    outline = "red" if categories is None else "black"  # categories use red as a colour
    for s in chosen:
        i, j = divmod(s, n)
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor=outline, linewidth=1.8, gid="selected"))
    if returned is not None:
        got = {int(s) for s in _np(returned).reshape(-1).tolist()}
        for s in chosen:
            i, j = divmod(s, n)
            if s in got:
                ax.add_patch(Circle((j, i), 0.22, facecolor="white", edgecolor="black", lw=0.6, gid="found"))
            else:
                ax.plot([j - 0.28, j + 0.28], [i - 0.28, i + 0.28], color="white", lw=2.2, gid="missed")
                ax.plot([j - 0.28, j + 0.28], [i + 0.28, i - 0.28], color="white", lw=2.2, gid="missed")
                ax.add_patch(Rectangle((j - 0.3, i - 0.3), 0.6, 0.6, fill=False, edgecolor="none", gid="missed"))
        for s in sorted(got - set(chosen)):
            i, j = divmod(s, n)
            ax.add_patch(Rectangle((j - 0.4, i - 0.4), 0.8, 0.8, fill=False, edgecolor="white", ls="--", lw=1.2,
                                   gid="extra"))
        legend = [Line2D([], [], marker="s", ls="", mfc="none", mec="red", ms=9, label="exact top-m"),
                  Line2D([], [], marker="o", ls="", mfc="white", mec="black", ms=7, label="found by the search"),
                  Line2D([], [], marker="x", ls="", color="dimgrey", mew=2, ms=7, label="missed"),
                  Line2D([], [], marker="s", ls="", mfc="none", mec="dimgrey", ms=8, label="returned instead")]
        ax.legend(handles=legend, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, fontsize=7, frameon=False)
    ax.set(title=title, xlabel="column key j", ylabel="row key i")
    _integer_ticks(ax)
    ax.grid(False)
    fig.tight_layout()
    return fig


def highlighted_cells(fig: Figure, gid: str = "selected") -> list[tuple[int, int]]:
    """``(row, col)`` of every patch with ``gid`` in a :func:`key_score_grid` figure; for tests.

    Candidate bars sit in the margin: a row candidate p is reported as ``(p, -1)``, a column
    candidate as ``(-1, p)``.  Markers (``"found"``, ``"missed"``, ``"extra"``) report their cell.
    """
    cells = []
    for patch in fig.axes[0].patches:
        if patch.get_gid() == gid:
            if isinstance(patch, Circle):
                x, y = patch.center
                cells.append((int(round(y)), int(round(x))))
            else:  # the cell under the patch's centre
                x, y = patch.get_xy()
                cells.append((int(round(y + patch.get_height() / 2)), int(round(x + patch.get_width() / 2))))
    return cells


def factor_quadrants(a, b, exact_rows, exact_cols, found, title: str = "rank-1 factors of the exact top-m") -> Figure:
    """Where the exact top-m pairs sit in the rank-1 factor plane, and which ones the prefilter found.

    Args:
        a, b: ``[n]`` rank-1 row / column factors ``S_row @ u`` and ``S_col @ v``.
        exact_rows, exact_cols: ``[m]`` rows / columns of the exact top-m slots.
        found: ``[m]`` booleans, True where the prefilter returned that slot.
    """
    a, b = _np(a).astype(float), _np(b).astype(float)
    pa, pb = a[_np(exact_rows).astype(int)], b[_np(exact_cols).astype(int)]
    found = _np(found).astype(bool)
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    ax.axhline(0, color="grey", lw=0.8)
    ax.axvline(0, color="grey", lw=0.8)
    ax.scatter(pa[found], pb[found], c="tab:green", label=f"found ({found.sum()})", s=22)
    ax.scatter(pa[~found], pb[~found], c="tab:red", marker="x", label=f"missed ({(~found).sum()})", s=26)
    ax.set(title=title, xlabel="row factor  $a_i = u^T S_{row}[i]$", ylabel="column factor  $b_j = v^T S_{col}[j]$")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# Slot usage ("dead keys"; docs/references.md Sec. 2.3, 7.7)
# ---------------------------------------------------------------------------------------------


def usage_metrics(counts) -> dict[str, float]:
    """Usage fraction, KL to uniform and dead-slot count of per-slot access counts (or weights).

    ``z = counts / sum(counts)``; fraction used ``= #{z_i > 0} / N``; ``KL = log N + sum z log z``
    (0 for perfectly uniform use, ``log(1/f)`` when a fraction f of slots is used uniformly).
    Computed by :mod:`umv2_ref.metrics`; collected here for plot titles and legends.
    """
    c = torch.as_tensor(_np(counts), dtype=torch.float64).reshape(-1)
    if c.numel() == 0 or (c < 0).any():
        raise ValueError("counts must be a non-empty vector of non-negative numbers")
    return {"fraction_used": metrics.usage_fraction(c), "kl_uniform": metrics.kl_to_uniform(c),
            "dead": metrics.dead_slots(c)}


DEAD_COLOR = "#e41a1c"  # red: the live-count colour map (viridis) never takes it


def slot_usage(counts, title: str = "slot usage", bins: int = 30) -> Figure:
    """Per-slot access counts as an n x n heatmap (left) and a histogram (right).

    counts: ``[n*n]`` or ``[n, n]``.  Dead slots (count 0) are drawn red, a colour the map of live
    counts (viridis, from one read up) never takes, so a rarely read slot never passes for a dead
    one.  Integer counts get one histogram bin per integer when they span at most ``4 * bins``
    values.  The title carries :func:`usage_metrics`.
    """
    c = _np(counts).astype(float).reshape(-1)
    n = _square_side(c.size)
    m = usage_metrics(c)
    fig, (ax_map, ax_hist) = plt.subplots(1, 2, figsize=(9, 3.8), gridspec_kw={"width_ratios": [1, 1.2]})
    cmap = plt.get_cmap("viridis").with_extremes(under=DEAD_COLOR)
    live = c[c > 0]
    vmin = min(1.0, live.min()) if live.size else 1.0
    im = ax_map.imshow(c.reshape(n, n), cmap=cmap, vmin=vmin, vmax=max(vmin * 1.0001, c.max()),
                       interpolation="nearest")
    fig.colorbar(im, ax=ax_map, shrink=0.85, label="accesses", extend="min")
    ax_map.set(title="reads per slot (red: dead, 0 reads)", xlabel="column key j", ylabel="row key i")
    _integer_ticks(ax_map)
    ax_map.grid(False)
    integer = np.allclose(c, np.round(c)) and c.max() - c.min() <= 4 * bins
    edges = np.arange(c.min() - 0.5, c.max() + 1.5) if integer else bins
    ax_hist.hist(c, bins=edges, color="tab:blue")
    ax_hist.axvline(c.mean(), color="tab:orange", ls="--", label=f"mean {c.mean():.1f}")
    ax_hist.set(title="accesses per slot", xlabel="accesses", ylabel="slots")
    if integer:
        ax_hist.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_hist.legend(fontsize=8)
    fig.suptitle(f"{title}: used {100 * m['fraction_used']:.1f}% | KL to uniform {m['kl_uniform']:.3f} | "
                 f"dead {m['dead']}/{c.size}", fontsize=10)
    fig.tight_layout()
    return fig


def sorted_usage(curves: Mapping[str, object], title: str = "slot usage, most used first") -> Figure:
    """Compare several usage distributions: each slot's share of accesses, sorted descending.

    curves: label -> per-slot counts.  A flat line at ``1/N`` is perfectly uniform use; a curve that
    drops to zero early has many dead slots.
    """
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for label, counts in curves.items():
        c = _np(counts).astype(float).reshape(-1)
        share = np.sort(c / c.sum())[::-1]
        m = usage_metrics(c)
        ax.plot(np.arange(1, c.size + 1), share,
                label=f"{label} (used {100 * m['fraction_used']:.0f}%, KL {m['kl_uniform']:.2f})")
    size = _np(next(iter(curves.values()))).size
    ax.axhline(1 / size, color="grey", ls=":", label="uniform 1/N")
    ax.set(title=title, xlabel="slot rank", ylabel="share of accesses", yscale="log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# Value activations (PEER / UltraMemV2 values)
# ---------------------------------------------------------------------------------------------


def slot_activations(indices, weights, n_slots: int, title: str = "which slots fire for which inputs",
                     groups=None, max_labels: int = 40, order: str = "id") -> Figure:
    """Inputs x slots heatmap of the weight each input puts on each slot (0 where not selected).

    indices: ``[B, m]`` slot ids; weights: ``[B, m]`` (or ``[B, m, c]``, summed over cores).
    Columns are only the slots some input selected (labels on the x axis, at most ``max_labels``
    of them so they stay readable), in ascending id order (``order="id"``) or in order of the first
    input that reads them (``order="first_use"``: inputs that share slots then form visible blocks).
    ``groups``: ``[B]`` group id of each input (e.g. its topic); inputs must be sorted by group, and
    a line separates the groups.
    """
    idx = _np(indices).astype(int)
    w = _np(weights).astype(float)
    if w.ndim == idx.ndim + 1:
        w = w.sum(-1)
    if idx.ndim != 2 or w.shape != idx.shape:
        raise ValueError(f"indices and weights must be [B, m] (weights may add a core dim); got {idx.shape}, {w.shape}")
    dense = np.zeros((idx.shape[0], n_slots))
    np.add.at(dense, (np.arange(idx.shape[0])[:, None], idx), w)
    used = np.unique(idx)
    if order == "first_use":
        used = np.array(list(dict.fromkeys(idx.reshape(-1).tolist())))  # row-major: first reader first
    elif order != "id":
        raise ValueError(f"order must be 'id' or 'first_use', got {order!r}")
    fig, ax = plt.subplots(figsize=(min(11, 2.5 + 0.12 * used.size), min(6.5, 1.6 + 0.16 * idx.shape[0])))
    lim = np.abs(dense[:, used]).max() or 1.0
    im = ax.imshow(dense[:, used], cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
    fig.colorbar(im, ax=ax, label="weight")
    step = max(1, int(np.ceil(used.size / max_labels)))
    ax.set_xticks(np.arange(0, used.size, step), [str(u) for u in used[::step]], rotation=90, fontsize=7)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    if groups is not None:
        g = _np(groups).reshape(-1)
        if g.shape[0] != idx.shape[0] or (np.diff(g) < 0).any():
            raise ValueError("groups must give one id per input, in ascending order")
        for b in np.flatnonzero(np.diff(g)) + 0.5:
            ax.axhline(b, color="black", lw=1.0)
    ax.set(title=title, xlabel=f"slot id ({used.size} slots selected by some input)", ylabel="input")
    ax.grid(False)
    fig.tight_layout()
    return fig


def value_distributions(samples: Mapping[str, object], title: str = "distribution", xlabel: str = "value",
                        bins: int = 40) -> Figure:
    """Overlaid histograms of several samples (e.g. pre-scores with and without an activation)."""
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    for label, x in samples.items():
        x = _np(x).astype(float).reshape(-1)
        ax.hist(x, bins=bins, alpha=0.55, density=True, label=f"{label} (mean {x.mean():.3g}, std {x.std():.3g})")
    ax.set(title=title, xlabel=xlabel, ylabel="density")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def contribution_norms(norms, labels: Sequence[str] | None = None, title: str = "per-slot contribution norm",
                       ylabel: str = r"$\|w_i V[i]\|$", xlabel: str = "selected slot") -> Figure:
    """Bar plot of each selected slot's contribution norm (one bar per slot, in the given order).

    ``xlabel`` names what a bar is (a selected slot by default; e.g. a virtual block in notebook 03).
    """
    h = _np(norms).astype(float).reshape(-1)
    fig, ax = plt.subplots(figsize=(min(12, 2.5 + 0.3 * h.size), 3.2))
    ax.bar(np.arange(h.size), h, color="tab:purple")
    if labels is not None:
        ax.set_xticks(np.arange(h.size), list(labels), rotation=90, fontsize=7)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# Tucker cores
# ---------------------------------------------------------------------------------------------


def core_heatmaps(cores, title: str = "Tucker cores") -> Figure:
    """One annotated heatmap per core ``C_c`` (``[c, r, r]``) plus their sum (the prefilter's core)."""
    cores = _np(cores).astype(float)
    if cores.ndim != 3 or cores.shape[1] != cores.shape[2]:
        raise ValueError(f"cores must be [c, r, r], got shape {cores.shape}")
    mats = [*cores, cores.sum(0)]
    names = [f"$C_{{{i + 1}}}$" for i in range(len(cores))] + [r"$\Sigma_c\, C_c$"]
    fig, axes = plt.subplots(1, len(mats), figsize=(2.6 * len(mats), 2.8))
    lim = max(np.abs(m).max() for m in mats) or 1.0
    for ax, mat, name in zip(axes, mats, names):
        ax.imshow(mat, cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
        if mat.shape[0] <= 6:
            for (i, j), val in np.ndenumerate(mat):
                color = "white" if abs(val) > 0.6 * lim else "black"  # readable on dark cells
                ax.text(j, i, f"{val:.2f}", ha="center", va="center", fontsize=8, color=color)
        ax.set(title=name, xticks=range(mat.shape[1]), yticks=range(mat.shape[0]))
        ax.grid(False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def singular_values(sv, tau: float | None = None, title: str = "singular values of the summed core") -> Figure:
    """Bar plot of singular values ``lambda_1 >= lambda_2 >= ...``; optional penalty margin ``tau``."""
    sv = _np(sv).astype(float).reshape(-1)
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.bar(np.arange(1, sv.size + 1), sv, color="tab:blue")
    if tau is not None:
        ax.axhline(tau, color="tab:red", ls="--", label=rf"$\tau$ = {tau}")
        ax.legend(fontsize=8)
    ratio = f" ($\\lambda_2/\\lambda_1$ = {sv[1] / sv[0]:.3f})" if sv.size > 1 and sv[0] > 0 else ""
    ax.set(title=title + ratio, xlabel="i", ylabel=r"$\lambda_i$", xticks=range(1, sv.size + 1))
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# Line plots (recall vs x, training curves)
# ---------------------------------------------------------------------------------------------


def line_plot(x, curves: Mapping[str, object], xlabel: str, ylabel: str, title: str = "",
              logx: bool = False, ylim: tuple[float, float] | None = None, hline: float | None = None) -> Figure:
    """Several curves over a shared x (e.g. recall vs candidate count, loss vs step)."""
    x = _np(x).astype(float)
    fig, ax = plt.subplots(figsize=(6.2, 3.5))
    for label, y in curves.items():
        y = _np(y).astype(float)
        if y.shape != x.shape:
            raise ValueError(f"curve {label!r} has shape {y.shape}, x has {x.shape}")
        ax.plot(x, y, marker="o" if x.size <= 40 else None, ms=3.5, label=label)  # no dots on long curves
    if hline is not None:
        ax.axhline(hline, color="grey", ls=":")
    if logx:
        ax.set_xscale("log")
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def recall_plot(x, recalls: Mapping[str, object], xlabel: str, title: str = "recall of the exact top-m",
                logx: bool = False) -> Figure:
    """Recall curves in [0, 1] with the perfect-recall line at 1."""
    return line_plot(x, recalls, xlabel, "recall", title=title, logx=logx, ylim=(0, 1.05), hline=1.0)


# ---------------------------------------------------------------------------------------------
# Schematic diagrams (notebooks 01-04, 06, 07): boxes for operations, tensors and parameters,
# arrows labelled with the shape of the tensor they carry.  Drawn with plain matplotlib patches;
# shape labels carry ``gid="shape"`` and can be listed with :func:`schematic_labels`.
# ---------------------------------------------------------------------------------------------

_KINDS = {  # face colour, edge colour
    "op": ("#e8f0fe", "#3366cc"),      # a computation
    "data": ("#fff4e0", "#d48a00"),    # an input or intermediate tensor
    "param": ("#eaf6ea", "#2e8b57"),   # learned parameters (tables, weights, cores)
    "out": ("#fdecec", "#c0392b"),     # the result
    "hbm": ("#f3e8fd", "#7d3cb5"),     # a tensor written to and read back from GPU memory
}


def _canvas(width: float, height: float, title: str):
    fig, ax = plt.subplots(figsize=(width, height))
    ax.set(xlim=(0, width), ylim=(0, height))
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(title, fontsize=11)
    return fig, ax


def _node(ax, x: float, y: float, text: str, kind: str = "op", w: float = 2.0, h: float = 0.85,
          fontsize: float = 8.5, ls: str = "-") -> tuple[float, float, float, float]:
    """A rounded box centred at (x, y); returns (x, y, w, h) for :func:`_edge`."""
    face, edge = _KINDS[kind]
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.02,rounding_size=0.12",
                                fc=face, ec=edge, lw=1.3, ls=ls, gid=f"node:{kind}"))
    ax.text(x, y, text, ha="center", va="center", fontsize=fontsize, gid="node_text")
    return (x, y, w, h)


def _anchor(node, toward) -> tuple[float, float]:
    """Where the straight line from a node's centre towards a point leaves its box."""
    if len(node) == 2:
        return node
    x, y, w, h = node
    dx, dy = toward[0] - x, toward[1] - y
    t = min(w / 2 / abs(dx) if dx else np.inf, h / 2 / abs(dy) if dy else np.inf)
    return (x + t * dx, y + t * dy)


def _edge(ax, a, b, shape: str = "", color: str = "#444444", label_at: float = 0.5, dy: float = 0.1,
          fontsize: float = 7.5) -> None:
    """An arrow from node (or point) a to node (or point) b, labelled with a tensor shape."""
    ca, cb = a[:2], b[:2]
    start, end = _anchor(a, cb), _anchor(b, ca)
    ax.annotate("", xy=end, xytext=start, gid="edge",
                arrowprops=dict(arrowstyle="-|>", color=color, lw=1.2, shrinkA=1, shrinkB=1, mutation_scale=11))
    if shape:
        mx, my = start[0] + label_at * (end[0] - start[0]), start[1] + label_at * (end[1] - start[1])
        ax.text(mx, my + dy, shape, ha="center", va="bottom", fontsize=fontsize, color="#222222", gid="shape",
                bbox=dict(fc="white", ec="none", pad=0.6, alpha=0.85))


def schematic_labels(fig: Figure) -> list[str]:
    """The shape labels on a schematic's arrows, in drawing order (for tests)."""
    return [t.get_text() for ax in fig.axes for t in ax.texts if t.get_gid() == "shape"]


def product_key_diagram(n: int = 8, k: int = 3) -> Figure:
    """PKM's product-key search: query halves -> two sub-key searches -> k x k candidates -> top-k.

    The inset is an ``n x n`` slot grid with the ``k`` best rows and columns (orange block) and the
    top-k slots (red) inside it.
    """
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
    fig, ax = _canvas(15.0, 5.4, "Product-key memory (PKM): two searches over n sub-keys replace one over n² keys")
    x = _node(ax, 0.6, 2.7, "token\n$x$", "data", w=0.9)
    q = _node(ax, 2.3, 2.7, "query\n$q = W_q x$", "op", w=1.6)
    q1 = _node(ax, 4.3, 4.0, "first half $q_1$", "data", w=1.7, h=0.6)
    q2 = _node(ax, 4.3, 1.4, "second half $q_2$", "data", w=1.7, h=0.6)
    s1 = _node(ax, 6.9, 4.0, "row search\n$s_{row} = C\\,q_1$, top-$k$", "op", w=2.3)
    s2 = _node(ax, 6.9, 1.4, "column search\n$s_{col} = C'q_2$, top-$k$", "op", w=2.3)
    c1 = _node(ax, 6.9, 5.05, "sub-keys $C$", "param", w=1.6, h=0.5)
    c2 = _node(ax, 6.9, 0.35, "sub-keys $C'$", "param", w=1.6, h=0.5)
    _edge(ax, x, q, "[d]")
    _edge(ax, q, q1, "[d_q/2]")
    _edge(ax, q, q2, "[d_q/2]", dy=-0.35)
    _edge(ax, q1, s1, "[d_q/2]")
    _edge(ax, q2, s2, "[d_q/2]")
    _edge(ax, c1, s1, "[n, d_q/2]", label_at=0.0, dy=-0.05, fontsize=7)
    _edge(ax, c2, s2, "[n, d_q/2]", label_at=1.0, dy=-0.05, fontsize=7)
    # inset: the n x n grid, candidate block and top-k
    x0, y0, side = 9.2, 1.2, 2.8
    cell = side / n
    rows, cols = list(range(1, 1 + k)), list(range(n - k - 1, n - 1))
    best = [(rows[i % k], cols[(i * 2) % k]) for i in range(k)]
    for i in range(n):
        for j in range(n):
            face = "#fbd9a5" if (i in rows and j in cols) else "#f4f4f4"
            ax.add_patch(Rectangle((x0 + j * cell, y0 + side - (i + 1) * cell), cell, cell, fc=face, ec="#bbbbbb",
                                   lw=0.5, gid="grid_cell"))
    for i, j in best:
        ax.add_patch(Rectangle((x0 + j * cell, y0 + side - (i + 1) * cell), cell, cell, fill=False, ec="red", lw=1.8,
                               gid="grid_selected"))
    ax.text(x0 + side / 2, y0 + side + 0.1, f"{k}×{k} candidates (orange) in the\n{n}×{n} slot grid; top-{k} in red",
            ha="center", va="bottom", fontsize=7.5)
    grid = (x0 + side / 2, y0 + side / 2, side, side)
    _edge(ax, s1, grid, "I_row: [k]", label_at=0.45)
    _edge(ax, s2, grid, "I_col: [k]", label_at=0.45, dy=-0.35)
    t = _node(ax, 13.35, 3.3, "top-$k$ of the $k^2$ sums\n$s_{row}[i] + s_{col}[j]$", "op", w=2.3)
    _edge(ax, grid, t, "[k, k]")
    o = _node(ax, 13.35, 1.1, "$m(x) = \\sum_i w_i V[i]$\n$w$ = softmax of the $k$", "out", w=2.3)
    v = _node(ax, 10.6, 0.45, "values $V$", "param", w=1.4, h=0.5)
    _edge(ax, t, o, "slot ids i·n+j: [k]")
    _edge(ax, v, o, "[N = n², D_v]", dy=-0.3, fontsize=7)
    _edge(ax, o, (14.9, 1.1), "[D_v]", dy=0.12)
    fig.tight_layout()
    return fig


def tdqkr_diagram() -> Figure:
    """UltraMem's TDQKR with the rank-1 prefilter: per-rank scores -> rank-1 factors -> top-k per axis
    -> k x k candidates rescored with every core -> top-m."""
    fig, ax = _canvas(16.0, 5.6, "TDQKR: Tucker-decomposed retrieval with the rank-1 prefilter")
    x = _node(ax, 0.6, 2.8, "$\\bar x$", "data", w=0.8)
    q = _node(ax, 2.4, 2.8, "per-rank queries\n$W_q$, then norm", "op", w=1.9)
    sr = _node(ax, 5.3, 4.2, "row scores\n$S_{row}[i,\\rho] = q^{(\\rho)}_{row}\\cdot K_{row}[i,:,\\rho]$", "op", w=3.2)
    sc = _node(ax, 5.3, 1.4, "column scores\n$S_{col}[j,\\rho] = q^{(\\rho)}_{col}\\cdot K_{col}[j,:,\\rho]$", "op", w=3.2)
    a = _node(ax, 8.9, 4.2, "rank-1 factor $a = S_{row}u$\ntop-$k$ rows $I$", "op", w=2.4)
    b = _node(ax, 8.9, 1.4, "rank-1 factor $b = S_{col}v$\ntop-$k$ columns $J$", "op", w=2.4)
    svd = _node(ax, 8.9, 2.8, "$\\sum_c C_c \\approx \\lambda_1 u v^\\top$\n(SVD, once per step)", "param", w=2.4, h=0.75)
    g = _node(ax, 12.0, 2.8, "rescore the $k\\times k$ pairs\nwith every core:\n"
              "$g_c = S_{row}[I]\\,C_c\\,S_{col}[J]^\\top$", "op", w=2.8, h=1.2)
    cores = _node(ax, 12.0, 4.75, "cores $C_c$", "param", w=1.5, h=0.5)
    top = _node(ax, 14.8, 2.8, "rank by $\\sum_c g_c$\nkeep the top-$m$", "op", w=1.9)
    out = _node(ax, 14.8, 0.9, "slot ids $i\\cdot n + j$\nper-core scores", "out", w=1.9)
    _edge(ax, x, q, "[d]")
    _edge(ax, q, sr, "[r, D_k]")
    _edge(ax, q, sc, "[r, D_k]", dy=-0.35)
    _edge(ax, sr, a, "[n, r]")
    _edge(ax, sc, b, "[n, r]")
    _edge(ax, svd, a, "u: [r]", label_at=0.4, dy=-0.05, fontsize=7)
    _edge(ax, svd, b, "v: [r]", label_at=0.4, dy=-0.05, fontsize=7)
    _edge(ax, a, g, "I: [k]")
    _edge(ax, b, g, "J: [k]", dy=-0.35)
    _edge(ax, cores, g, "[c, r, r]", label_at=0.0, dy=-0.02, fontsize=7)
    _edge(ax, g, top, "[c, k, k]")
    _edge(ax, top, out, "[m], [m, c]", dy=-0.05)
    ax.text(9.6, 0.4, "the k×k block needs only the rows S_row[I], S_col[J]: [k, r] each",
            ha="center", fontsize=7.5, style="italic")
    fig.tight_layout()
    return fig


def value_expansion_diagram(n: int = 4, expand: int = 4, picks=(1, 6, 11), seed: int = 0) -> Figure:
    """UltraMem's implicit value expansion: virtual grid slots -> (block, physical row) by a fixed
    shuffle -> rows pooled per block -> one projector per block; UltraMemV2 shares one projector.

    The grid has ``n * n = expand * N`` virtual slots over ``N`` physical rows; ``picks`` are the
    virtual slots one token selected.  Colours are blocks.
    """
    if (n * n) % expand:
        raise ValueError(f"n*n = {n * n} virtual slots must be a multiple of expand = {expand}")
    n_rows = n * n // expand
    perm = np.random.default_rng(seed).permutation(n * n)
    block, row = perm // n_rows, perm % n_rows
    colors = _category_colors(expand)
    fig, ax = _canvas(15.0, 6.0, f"Implicit value expansion: {n * n} virtual slots over N = {n_rows} physical rows, "
                                 f"E = {expand}")
    x0, y0, side = 0.5, 1.5, 3.0
    cell = side / n
    for v in range(n * n):
        i, j = divmod(v, n)
        ax.add_patch(Rectangle((x0 + j * cell, y0 + side - (i + 1) * cell), cell, cell, fc=colors(block[v]),
                               alpha=0.55, ec="white", lw=1.0, gid="virtual_slot"))
        ax.text(x0 + (j + 0.5) * cell, y0 + side - (i + 0.5) * cell, f"{v}", ha="center", va="center", fontsize=7)
    for v in picks:
        i, j = divmod(v, n)
        ax.add_patch(Rectangle((x0 + j * cell, y0 + side - (i + 1) * cell), cell, cell, fill=False, ec="black", lw=2.2,
                               gid="virtual_selected"))
    ax.text(x0 + side / 2, y0 - 0.2, "virtual grid (colour = block p)\nframed: the token's top-m",
            ha="center", va="top", fontsize=7.5)
    ax.text(x0 + side / 2, y0 + side + 0.25, "scores s: [m]", ha="center", fontsize=7.5, gid="shape")
    # physical rows
    px, pw, ph = 5.8, 1.8, 0.45
    row_y = {r: y0 + side - (r + 0.5) * (side / n_rows) for r in range(n_rows)}
    for r in range(n_rows):
        ax.add_patch(Rectangle((px - pw / 2, row_y[r] - ph / 2), pw, ph, fc="#eaf6ea", ec="#2e8b57", gid="physical_row"))
        ax.text(px, row_y[r], f"V[{r}]", ha="center", va="center", fontsize=8)
    ax.text(px, y0 - 0.2, "physical table V: [N, D_v]", ha="center", va="top", fontsize=7.5, gid="shape")
    pooled = {}
    for p in range(expand):
        pooled[p] = _node(ax, 9.0, y0 + side - (p + 0.5) * side / expand,
                          f"$z_{{{p}}} = \\sum_{{i \\in p}} s_i V[\\mathrm{{row}}_i]$", "data", w=2.5, h=0.55)
        ax.patches[-1].set_facecolor(colors(p))
        ax.patches[-1].set_alpha(0.5)
    for v in picks:
        i, j = divmod(v, n)
        start = (x0 + (j + 1) * cell, y0 + side - (i + 0.5) * cell)
        _edge(ax, start, (px - pw / 2, row_y[row[v]]), color=colors(block[v]))
        _edge(ax, (px + pw / 2, row_y[row[v]]), pooled[block[v]], color=colors(block[v]))
    ax.text((x0 + side + px - pw / 2) / 2, y0 + side + 0.25, "π(v): block ⌊π/N⌋, row π mod N",
            ha="center", fontsize=7.5)
    ax.text(9.0, y0 + side + 0.25, "pooled per block: [E, D_v]", ha="center", fontsize=7.5, gid="shape")
    total = _node(ax, 13.6, y0 + side / 2, "$o = \\sum_p W_p^\\top z_p$", "out", w=1.9, h=0.7)
    for p in range(expand):
        w = _node(ax, 11.5, pooled[p][1], f"$W_{{{p}}}$", "param", w=0.7, h=0.45)
        _edge(ax, pooled[p], w, "[D_v]" if p == 0 else "", fontsize=7)
        _edge(ax, w, total, "[d]" if p == 0 else "", fontsize=7, label_at=0.6)
    _edge(ax, total, (14.9, y0 + side / 2), "[d]")
    ax.text(7.5, 0.35, "UltraMemV2 (Eq. 12): one shared projector W.  Then o = Wᵀ Σ_p z_p: the blocks are summed "
            "first, and the read is a plain weighted sum of rows π(v) mod N.", ha="center", fontsize=8, style="italic")
    fig.tight_layout()
    return fig


def ultramemv2_block_diagram() -> Figure:
    """One UltraMemV2 transformer block: the memory layer runs in parallel with a shrunk FFN on the
    same normalised input; its slots are FFN-like (pre-value x value, no activation)."""
    fig, ax = _canvas(16.5, 6.6, "An UltraMemV2 block: $x_{l+1} = h_l + \\mathrm{FFN}(\\bar x_l) + "
                                 "\\mathrm{Mem}_l(\\bar x_l)$")
    y = 3.7
    x = _node(ax, 0.6, y, "$x_l$", "data", w=0.8)
    att = _node(ax, 2.5, y, "RMSNorm\n+ attention", "op", w=1.7)
    plus1 = _node(ax, 4.3, y, "+", "op", w=0.5, h=0.5, fontsize=11)
    norm = _node(ax, 6.0, y, "RMSNorm", "op", w=1.4)
    ffn = _node(ax, 10.3, 5.1, "FFN: SwiGLU with a shrunk inner width", "op", w=4.0, h=0.7)
    plus2 = _node(ax, 15.0, y, "+", "op", w=0.5, h=0.5, fontsize=11)
    _edge(ax, x, att, "[T, d]")
    _edge(ax, att, plus1, "[T, d]")
    _edge(ax, plus1, norm, "h_l: [T, d]")
    ax.plot([0.6, 0.6, 4.3], [y + 0.43, 5.7, 5.7], color="#444444", lw=1.2)
    _edge(ax, (4.3, 5.7), (4.3, y + 0.26))
    ax.text(2.5, 5.78, "residual x_l", ha="center", fontsize=7.5)
    ax.plot([5.0, 5.0, 15.0], [y, 6.35, 6.35], color="#444444", lw=1.2)
    _edge(ax, (15.0, 6.35), (15.0, y + 0.26))
    ax.text(9.6, 6.42, "residual h_l", ha="center", fontsize=7.5)
    _edge(ax, norm, ffn, "x̄: [T, d]", label_at=0.35)
    _edge(ax, ffn, plus2, "[T, d]")
    # the memory branch
    frame = FancyBboxPatch((7.1, 0.15), 7.3, 3.1, boxstyle="round,pad=0.02,rounding_size=0.15", fill=False,
                           ec="#999999", ls="--", lw=1.0, gid="frame")
    ax.add_patch(frame)
    ax.text(7.25, 0.3, "UltraMemV2 memory layer (every block)", fontsize=8, va="bottom", style="italic")
    ret = _node(ax, 8.6, 2.2, "TDQKR top-$m$\n(notebook 02)", "op", w=2.0)
    pre = _node(ax, 8.6, 1.05, "$\\tilde x = W_{pre}\\bar x$", "op", w=2.0, h=0.6)
    mul = _node(ax, 11.0, 1.5, "pre-score $\\times$ score\n$w_i = \\langle P[i], \\tilde x\\rangle\\, s_i$",
                "op", w=2.4, h=0.95)
    pool = _node(ax, 13.3, 1.5, "$z = \\sum_i w_i V[i]$\nthen $W_v z$", "op", w=1.7, h=0.95)
    pv = _node(ax, 11.0, 2.75, "pre-values $P$", "param", w=1.7, h=0.45)
    vv = _node(ax, 13.3, 2.75, "values $V$", "param", w=1.4, h=0.45)
    _edge(ax, norm, ret, "[T, d]", label_at=0.55)
    _edge(ax, norm, pre, "", label_at=0.55)
    _edge(ax, ret, mul, "ids [T, m]; s [T, m, c]", label_at=0.5, dy=0.12, fontsize=7)
    _edge(ax, pre, mul, "[T, D_p]", dy=-0.32)
    _edge(ax, pv, mul, "[N, D_p]", label_at=0.0, dy=-0.02, fontsize=7)
    _edge(ax, mul, pool, "w: [T, m, c]", fontsize=7)
    _edge(ax, vv, pool, "[N, D_v]", label_at=0.0, dy=-0.02, fontsize=7)
    _edge(ax, pool, plus2, "[T, d]")
    _edge(ax, plus2, (16.4, y), "", label_at=0.5)
    ax.text(15.9, y - 0.45, "$x_{l+1}$", ha="center", fontsize=9)
    ax.text(3.5, 1.6, "No activation on the pre-score (Eq. 15):\nthe top-m retrieval plays\nSwiGLU's gate, "
            "$P\\tilde x$ its linear branch.\nWith c cores, score c weights\nvalue slice c ($D_v/c$ channels).",
            fontsize=7.5, va="center", ha="center", style="italic")
    fig.tight_layout()
    return fig


def fused_kernel_diagram() -> Figure:
    """Data flow of the UltraMemV2 value path: the naive PyTorch gathers write [T, m, *] intermediates
    to memory; the fused kernel keeps them in registers and writes only z."""
    fig, ax = _canvas(15.5, 6.2, "The value path $z = \\sum_i \\langle P[i], \\tilde x\\rangle\\, s_i\\, V[i]$: "
                                 "naive gathers vs the fused kernel")
    ax.text(0.2, 5.65, "naive PyTorch (umv2_ref.values)", fontsize=9, weight="bold")
    ins = "idx [T, m], s [T, m, c]\n$\\tilde x$ [T, D_p]\nP [N, D_p], V [N, D_v]"
    i1 = _node(ax, 1.5, 4.3, ins, "hbm", w=2.6, h=1.2, fontsize=7.5)
    g1 = _node(ax, 4.6, 4.3, "gather P[idx]", "op", w=1.7)
    d1 = _node(ax, 7.3, 4.3, "$a = \\langle P[idx], \\tilde x\\rangle$\n$w = a\\cdot s$", "op", w=2.0)
    g2 = _node(ax, 10.1, 4.3, "gather V[idx]", "op", w=1.7)
    s2 = _node(ax, 12.7, 4.3, "$\\sum_i w_i V[idx_i]$", "op", w=1.9)
    _edge(ax, i1, g1, "")
    _edge(ax, g1, d1, "[T, m, D_p] (HBM)", fontsize=7)
    _edge(ax, d1, g2, "w: [T, m, c] (HBM)", fontsize=7)
    _edge(ax, g2, s2, "[T, m, D_v] (HBM)", fontsize=7)
    _edge(ax, s2, (15.3, 4.3), "z: [T, D_v]", label_at=0.45, fontsize=7)
    ax.text(8.4, 3.35, "every arrow marked (HBM) is a tensor written to GPU memory and read back",
            ha="center", fontsize=7.5, style="italic", color=_KINDS["hbm"][1])
    ax.text(0.2, 2.55, "fused (kernels.peer_values, one program per BLOCK_T tokens)", fontsize=9, weight="bold")
    i2 = _node(ax, 1.5, 1.3, ins, "hbm", w=2.6, h=1.2, fontsize=7.5)
    k = _node(ax, 7.6, 1.3, "for each of the m slots:  load the rows P[i] and V[i]\n"
              "$a = \\langle P[i], \\tilde x\\rangle$,  $w = a\\cdot s$,  $z$ += $w\\cdot V[i]$   (fp32 registers)\n"
              "the [BLOCK_T, m, ·] tensors never exist", "op", w=6.6, h=1.25, ls="--")
    _edge(ax, i2, k, "rows by index")
    _edge(ax, k, (15.3, 1.3), "z: [T, D_v], written once", label_at=0.5, fontsize=7)
    fig.tight_layout()
    return fig


# --- values and init (notebooks 04, 05) ---


def _positive(label: str, y) -> np.ndarray:
    y = _np(y).astype(float)
    if not np.all(np.isfinite(y)) or (y <= 0).any():
        raise ValueError(f"{label} must be finite and > 0 to draw on a log axis, got min {y.min():.3g}")
    return y


def _log_x(ax) -> None:
    """Log x axis labelled at 1, 2, 5 x 10^k in plain numbers (default minor labels overlap)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def log_curves(x, curves: Mapping[str, object], xlabel: str, ylabel: str, title: str = "", logx: bool = False,
               hlines: Mapping[str, float] | None = None) -> Figure:
    """Positive curves over a shared x on a log y axis (variance per layer, a ratio per training step).

    curves: label -> y values (shape of x, all > 0).  hlines: label -> y of a dashed horizontal
    reference line (e.g. the variance a derivation predicts).
    """
    x = _np(x).astype(float)
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for label, y in curves.items():
        y = _positive(f"curve {label!r}", y)
        if y.shape != x.shape:
            raise ValueError(f"curve {label!r} has shape {y.shape}, x has {x.shape}")
        ax.plot(x, y, marker="o" if x.size <= 40 else None, ms=3.5, label=label)  # no dots on long curves
    for i, (label, y) in enumerate((hlines or {}).items()):
        ax.axhline(y, color=f"C{len(curves) + i}", ls="--", lw=1.2, label=label)
    ax.set_yscale("log")
    if logx:
        _log_x(ax)
    elif x.size <= 20 and np.allclose(x, np.round(x)):
        ax.set_xticks(x)  # integer positions (layers): no fractional ticks
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def variance_steps(steps: Sequence[str], predicted, measured,
                   title: str = "predicted vs measured variance, step by step") -> Figure:
    """Paired bars (log scale) of a derivation's predicted and Monte-Carlo variances, one pair per step.

    Each pair is annotated with measured / predicted (text artists with ``gid="ratio"``).
    """
    pred = _positive("predicted", predicted).reshape(-1)
    meas = _positive("measured", measured).reshape(-1)
    if not len(steps) == pred.size == meas.size:
        raise ValueError(f"need one predicted and one measured value per step; got {len(steps)}, {pred.size}, {meas.size}")
    pos = np.arange(len(steps))
    fig, ax = plt.subplots(figsize=(max(5.5, 1.6 * len(steps)), 3.8))
    ax.bar(pos - 0.2, pred, width=0.4, color="tab:blue", label="predicted")
    ax.bar(pos + 0.2, meas, width=0.4, color="tab:orange", label="measured (Monte-Carlo)")
    for p, a, b in zip(pos, pred, meas):
        ax.text(p, max(a, b) * 1.25, f"x{b / a:.2f}", ha="center", fontsize=8, gid="ratio")
    ax.set_yscale("log")
    ax.set_ylim(min(pred.min(), meas.min()) / 3, max(pred.max(), meas.max()) * 4)
    ax.set_xticks(pos, list(steps), fontsize=8)
    ax.set(title=title, ylabel="variance")
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    return fig


def prediction_vs_measurement(x, predicted, measured, xlabel: str, ylabel: str, title: str = "",
                              hlines: Mapping[str, float] | None = None, marker: float | None = None,
                              marker_label: str = "current") -> Figure:
    """A scaling law on log-log axes: the prediction as a line, measurements as dots.

    hlines: label -> y of dashed reference lines (e.g. the FFN variance a branch should match);
    marker: x of a dotted vertical line (the current choice, e.g. Eq. 26's sigma_V), labelled
    ``marker_label = x``.
    """
    x = _positive("x", x)
    pred, meas = _positive("predicted", predicted), _positive("measured", measured)
    if not x.shape == pred.shape == meas.shape:
        raise ValueError(f"x, predicted and measured must share one shape; got {x.shape}, {pred.shape}, {meas.shape}")
    fig, ax = plt.subplots(figsize=(6.2, 3.8))
    ax.plot(x, pred, color="tab:blue", label="prediction")
    ax.scatter(x, meas, color="tab:orange", zorder=3, s=22, label="measured (Monte-Carlo)")
    for i, (label, y) in enumerate((hlines or {}).items()):
        ax.axhline(y, color=f"C{2 + i}", ls="--", lw=1.2, label=label)
    if marker is not None:
        ax.axvline(marker, color="grey", ls=":", label=f"{marker_label} = {marker:.3g}")
    _log_x(ax)
    ax.set(yscale="log", title=title, xlabel=xlabel, ylabel=ylabel)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# --- training (notebooks 06, 08) ---


def loss_curves(curves: Mapping[str, tuple[object, object]], title: str = "validation loss", ylabel: str = "loss",
                xlabel: str = "step", hline: float | None = None) -> Figure:
    """One line per run, each with its own steps: ``curves[label] = (steps, values)`` (1-D, same length).

    ``hline`` draws a dotted reference level (e.g. ``log V``, the loss of a uniform guess).
    """
    fig, ax = plt.subplots(figsize=(6.2, 3.5))
    for label, (x, y) in curves.items():
        x, y = _np(x).astype(float), _np(y).astype(float)
        if x.ndim != 1 or x.shape != y.shape:
            raise ValueError(f"curve {label!r}: steps {x.shape} and values {y.shape} must be equal-length 1-D")
        ax.plot(x, y, marker="o" if x.size <= 40 else None, ms=3, label=label)  # no dots on long curves
    if hline is not None:
        ax.axhline(hline, color="grey", ls=":")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def usage_heatmap(counts, steps, title: str = "slot usage over training", sort: bool = True) -> Figure:
    """How often each memory slot was read, per evaluation: ``counts [n_evals, n_slots]``.

    Colour is a slot's share of the lookups relative to uniform use (1 = its fair share, log scale;
    slots never read sit at the floor 1e-2).  With ``sort`` the columns are ordered by the last
    evaluation's counts, so a collapse onto few slots shows as a bright left edge.
    """
    from matplotlib.colors import LogNorm

    counts, steps = _np(counts).astype(float), _np(steps)
    if counts.ndim != 2 or counts.shape[0] != steps.shape[0]:
        raise ValueError(f"counts must be [n_evals, n_slots] with one row per step; got {counts.shape}, {steps.shape}")
    if (counts.sum(1) <= 0).any():
        raise ValueError("every evaluation row of counts needs at least one lookup")
    rel = counts / counts.sum(1, keepdims=True) * counts.shape[1]  # [E, N], 1 = uniform share
    if sort:
        rel = rel[:, np.argsort(-counts[-1], kind="stable")]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(steps) + 1.6))
    im = ax.imshow(np.clip(rel, 1e-2, None), aspect="auto", interpolation="nearest", cmap="magma",
                   norm=LogNorm(vmin=1e-2, vmax=max(10.0, rel.max())))
    ax.set_yticks(range(len(steps)), [str(s) for s in steps])
    ax.set(title=title, xlabel="slot" + (" (sorted by final use)" if sort else ""), ylabel="step")
    ax.grid(False)
    fig.colorbar(im, ax=ax, label="reads / uniform share")
    fig.tight_layout()
    return fig


def task_bars(values: Mapping[str, Mapping[str, float]], ylabel: str, title: str = "") -> Figure:
    """Grouped bars ``values[model][task]`` (e.g. final accuracy of every model on every task)."""
    models = list(values)
    tasks = list(dict.fromkeys(t for v in values.values() for t in v))
    width = 0.8 / max(1, len(models))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(tasks) + 2), 3.5))
    for i, model in enumerate(models):
        heights = [values[model].get(t, np.nan) for t in tasks]
        ax.bar(np.arange(len(tasks)) + (i - (len(models) - 1) / 2) * width, heights, width, label=model)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set(title=title, ylabel=ylabel)
    ax.legend(fontsize=8, ncol=min(3, len(models)))
    fig.tight_layout()
    return fig


# --- kernels (notebook 07) ---


def bytes_breakdown(versions: Mapping[str, Mapping[str, float]], title: str = "bytes moved per forward") -> Figure:
    """Stacked horizontal bars: for each implementation, the bytes of each memory-traffic component.

    versions: implementation name -> {component: bytes}.  Components missing from a version count 0.
    """
    if not versions:
        raise ValueError("versions must name at least one implementation")
    components = list(dict.fromkeys(c for parts in versions.values() for c in parts))
    names = list(versions)
    fig, ax = plt.subplots(figsize=(7, 0.7 * len(names) + 1.6))
    left = np.zeros(len(names))
    for comp in components:
        gb = np.array([float(versions[n].get(comp, 0.0)) for n in names]) / 1e9
        if (gb < 0).any():
            raise ValueError(f"component {comp!r} has negative bytes")
        ax.barh(names, gb, left=left, label=comp)
        left += gb
    for y, total in enumerate(left):
        ax.text(total, y, f" {total:.2f} GB", va="center", fontsize=8)
    ax.set(xlabel="GB", title=title, xlim=(0, left.max() * 1.25 if left.max() > 0 else 1))
    ax.invert_yaxis()
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig
