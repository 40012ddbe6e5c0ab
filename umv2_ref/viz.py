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
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from . import metrics


def _np(x) -> np.ndarray:
    """Tensor or array-like -> NumPy array (detached, on the CPU)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


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
) -> Figure:
    """Heatmap of an ``[n, n]`` slot-score grid with the chosen slots outlined.

    Args:
        grid: ``[n, n]`` scores, ``grid[i, j]`` for slot ``i * n + j``.
        selected: flat slot ids to outline in red (e.g. the top-k), any shape.
        row_candidates, col_candidates: per-axis candidate rows / columns (the k x k candidate set
            of the product-key search or the rank-1 prefilter): marked by orange bars in the margin,
            while the other rows and columns are dimmed.
    """
    grid = _np(grid).astype(float)
    if grid.ndim != 2 or grid.shape[0] != grid.shape[1]:
        raise ValueError(f"grid must be [n, n], got shape {grid.shape}")
    n = grid.shape[0]
    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    im = ax.imshow(grid, cmap=cmap, origin="upper", interpolation="nearest")
    fig.colorbar(im, ax=ax, shrink=0.85)
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
    if selected is not None:
        for s in _np(selected).reshape(-1).tolist():
            i, j = divmod(int(s), n)
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.6, gid="selected"))
    ax.set(title=title, xlabel="column key j", ylabel="row key i")
    ax.grid(False)
    fig.tight_layout()
    return fig


def highlighted_cells(fig: Figure, gid: str = "selected") -> list[tuple[int, int]]:
    """``(row, col)`` of every patch with ``gid`` in a :func:`key_score_grid` figure; for tests.

    Candidate bars sit in the margin: a row candidate p is reported as ``(p, -1)``, a column
    candidate as ``(-1, p)``.
    """
    cells = []
    for patch in fig.axes[0].patches:
        if patch.get_gid() == gid:
            x, y = patch.get_xy()
            cells.append((int(round(y + 0.5)), int(round(x + 0.5))))
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
# Slot usage ("dead keys"; papers.md Sec. 2.3, 7.7)
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


def slot_usage(counts, title: str = "slot usage", bins: int = 30) -> Figure:
    """Per-slot access counts as an n x n heatmap (left) and a histogram (right).

    counts: ``[n*n]`` or ``[n, n]``; dead slots (count 0) are drawn black.  The title carries
    :func:`usage_metrics`.
    """
    c = _np(counts).astype(float).reshape(-1)
    n = _square_side(c.size)
    m = usage_metrics(c)
    fig, (ax_map, ax_hist) = plt.subplots(1, 2, figsize=(9, 3.8), gridspec_kw={"width_ratios": [1, 1.2]})
    cmap = plt.get_cmap("magma").with_extremes(under="black")
    im = ax_map.imshow(c.reshape(n, n), cmap=cmap, vmin=0.5, interpolation="nearest")
    fig.colorbar(im, ax=ax_map, shrink=0.85, label="accesses")
    ax_map.set(title="counts on the key grid (black = dead)", xlabel="column key j", ylabel="row key i")
    ax_map.grid(False)
    ax_hist.hist(c, bins=bins, color="tab:blue")
    ax_hist.axvline(c.mean(), color="tab:orange", ls="--", label=f"mean {c.mean():.1f}")
    ax_hist.set(title="accesses per slot", xlabel="accesses", ylabel="slots")
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


def slot_activations(indices, weights, n_slots: int, title: str = "which slots fire for which inputs") -> Figure:
    """Inputs x slots heatmap of the weight each input puts on each slot (0 where not selected).

    indices: ``[B, m]`` slot ids; weights: ``[B, m]`` (or ``[B, m, c]``, summed over cores).
    Columns are only the slots some input selected, in ascending id order (labels on the x axis).
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
    fig, ax = plt.subplots(figsize=(min(12, 2 + 0.22 * used.size), 0.5 + 0.35 * idx.shape[0] + 1.2))
    lim = np.abs(dense[:, used]).max() or 1.0
    im = ax.imshow(dense[:, used], cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
    fig.colorbar(im, ax=ax, label="weight")
    ax.set_xticks(np.arange(used.size), [str(u) for u in used], rotation=90, fontsize=6)
    ax.set(title=title, xlabel="slot id (selected by some input)", ylabel="input")
    ax.grid(False)
    fig.tight_layout()
    return fig


def value_distributions(samples: Mapping[str, object], title: str = "distribution", xlabel: str = "value",
                        bins: int = 40) -> Figure:
    """Overlaid histograms of several samples (e.g. pre-scores with and without an activation)."""
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    for label, x in samples.items():
        x = _np(x).astype(float).reshape(-1)
        ax.hist(x, bins=bins, alpha=0.55, density=True, label=f"{label} (std {x.std():.3g})")
    ax.set(title=title, xlabel=xlabel, ylabel="density")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def contribution_norms(norms, labels: Sequence[str] | None = None, title: str = "per-slot contribution norm",
                       ylabel: str = r"$\|w_i V[i]\|$") -> Figure:
    """Bar plot of each selected slot's contribution norm (one bar per slot, in the given order)."""
    h = _np(norms).astype(float).reshape(-1)
    fig, ax = plt.subplots(figsize=(min(12, 2.5 + 0.3 * h.size), 3.2))
    ax.bar(np.arange(h.size), h, color="tab:purple")
    if labels is not None:
        ax.set_xticks(np.arange(h.size), list(labels), rotation=90, fontsize=7)
    ax.set(title=title, xlabel="selected slot", ylabel=ylabel)
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
        ax.plot(x, y, marker="o", ms=3, label=label)
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


# --- a trained model, token by token (notebooks 06, 08; umv2_ref.explore) ---


def seed_curves(curves: Mapping[str, tuple[object, object]], title: str = "validation loss", ylabel: str = "loss",
                xlabel: str = "step", zoom_from: float = 0.3) -> Figure:
    """Mean over seeds with a min–max band, one colour per model: ``curves[label] = (steps [E], runs [R, E])``.

    The y-range covers the curves from ``zoom_from`` of the way along the x-axis onwards (the start of
    training is far above the end), so differences at the end are readable; the legend carries each
    model's final mean.  With a single run per label the band is empty.
    """
    fig, ax = plt.subplots(figsize=(6.8, 3.8))
    low, high = np.inf, -np.inf
    for label, (x, runs) in curves.items():
        x = _np(x).astype(float)
        runs = np.atleast_2d(_np(runs).astype(float))
        if x.ndim != 1 or runs.shape[1] != x.shape[0]:
            raise ValueError(f"curve {label!r}: steps {x.shape} and runs {runs.shape} must be [E] and [R, E]")
        mean = runs.mean(0)
        (line,) = ax.plot(x, mean, marker="o", ms=3, label=f"{label} (end {mean[-1]:.3f})")
        if runs.shape[0] > 1:
            ax.fill_between(x, runs.min(0), runs.max(0), color=line.get_color(), alpha=0.2, lw=0)
        tail = x >= x.min() + zoom_from * (x.max() - x.min())
        low, high = min(low, runs[:, tail].min()), max(high, runs[:, tail].max())
    if np.isfinite(low) and np.isfinite(high):
        pad = 0.08 * max(high - low, 1e-6)
        ax.set_ylim(low - pad, high + pad)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def trace_panel(grid, rows, cols, scores, pre_scores, norms, branch_norms: Mapping[str, float],
                highlight: int | None = None, title: str = "") -> Figure:
    """What one memory layer did for one token (:func:`umv2_ref.explore.trace`).

    Panels: the ``[n, n]`` key grid with the read cells outlined (``gid="selected"``; the
    ``highlight`` slot in cyan, ``gid="highlight"``); then, one bar per read slot ordered by
    contribution norm: the score (stacked per core when ``scores`` is ``[S, c]``), the pre-score
    (PEER / UltraMemV2; "none" otherwise), the contribution norm; and the RMS of the memory
    output, the FFN output and the residual stream.

    rows, cols: ``[S]`` grid cells of the read slots; norms: ``[S]`` contribution norms.
    """
    grid = _np(grid).astype(float)
    rows, cols, norms = _np(rows).astype(int), _np(cols).astype(int), _np(norms).astype(float)
    scores = _np(scores).astype(float)
    if grid.ndim != 2 or grid.shape[0] != grid.shape[1]:
        raise ValueError(f"grid must be [n, n], got {grid.shape}")
    S = rows.shape[0]
    if cols.shape != (S,) or norms.shape != (S,) or scores.shape[0] != S:
        raise ValueError(f"rows, cols, norms must be [S] and scores [S] or [S, c]; got {rows.shape}, {cols.shape}, "
                         f"{norms.shape}, {scores.shape}")
    order = np.argsort(-norms, kind="stable")
    labels = [f"({rows[s]},{cols[s]})" for s in order]
    colors = ["tab:cyan" if s == highlight else "tab:purple" for s in order]
    fig = plt.figure(figsize=(12, 5.6))
    spec = fig.add_gridspec(2, 3, width_ratios=[1.15, 1, 1])
    ax = fig.add_subplot(spec[:, 0])
    lim = np.abs(grid).max() or 1.0
    im = ax.imshow(grid, cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, label="grid score")
    for s in range(S):
        gid = "highlight" if s == highlight else "selected"
        ax.add_patch(Rectangle((cols[s] - 0.5, rows[s] - 0.5), 1, 1, fill=False, lw=1.6, gid=gid,
                               edgecolor="cyan" if s == highlight else "black"))
    ax.set(title=f"key grid, {S} read cells outlined", xlabel="column key j", ylabel="row key i")
    ax.grid(False)
    x = np.arange(S)
    ax = fig.add_subplot(spec[0, 1])
    if scores.ndim == 2:
        bottom = np.zeros(S)
        for c in range(scores.shape[1]):
            ax.bar(x, scores[order, c], bottom=bottom, label=f"core {c + 1}")
            bottom += scores[order, c]
        ax.legend(fontsize=7)
    else:
        ax.bar(x, scores[order], color=colors)
    ax.set(title="score of each read slot", xticks=[])
    ax = fig.add_subplot(spec[0, 2])
    if pre_scores is not None:
        ax.bar(x, _np(pre_scores).astype(float)[order], color=colors)
        ax.set(title="pre-score <P[i], W_pre x>", xticks=[])
    else:
        ax.text(0.5, 0.5, "no pre-scores\n(this layer has none)", ha="center", va="center", transform=ax.transAxes)
        ax.set(title="pre-score", xticks=[], yticks=[])
    ax = fig.add_subplot(spec[1, 1])
    ax.bar(x, norms[order], color=colors)
    ax.set_xticks(x, labels, rotation=90, fontsize=6)
    ax.set(title="|contribution| (row i, col j)")
    ax = fig.add_subplot(spec[1, 2])
    names = list(branch_norms)
    values = [float(branch_norms[k]) for k in names]
    ax.bar(names, np.nan_to_num(values), color=["tab:purple", "tab:green", "tab:grey"][:len(names)])
    for i, v in enumerate(values):
        ax.text(i, np.nan_to_num(v), "n/a" if not np.isfinite(v) else f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    ax.set(title="RMS at this token")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def seed_bars(values: Mapping[str, Mapping[str, Mapping[str, float]]], ylabel: str, title: str = "",
              chance: Mapping[str, float] | None = None) -> Figure:
    """Grouped bars of a mean with a min–max error bar: ``values[model][task] = {"mean", "min", "max"}``.

    ``chance[task]`` draws a dashed chance level over that task's group (labelled once).
    """
    models = list(values)
    tasks = list(dict.fromkeys(t for v in values.values() for t in v))
    width = 0.8 / max(1, len(models))
    fig, ax = plt.subplots(figsize=(max(6.5, 1.6 * len(tasks) + 0.5 * len(models) + 2), 3.8))
    for i, model in enumerate(models):
        stats = [values[model].get(t) for t in tasks]
        mean = np.array([s["mean"] if s else np.nan for s in stats])
        lo = np.array([s["mean"] - s["min"] if s else 0.0 for s in stats])
        hi = np.array([s["max"] - s["mean"] if s else 0.0 for s in stats])
        ax.bar(np.arange(len(tasks)) + (i - (len(models) - 1) / 2) * width, mean, width, yerr=[lo, hi],
               capsize=2, label=model)
    for k, task in enumerate(tasks):
        if chance and task in chance:
            ax.hlines(chance[task], k - 0.45, k + 0.45, colors="black", linestyles="--", lw=1,
                      label="chance" if k == next(i for i, t in enumerate(tasks) if t in chance) else None, gid="chance")
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set(title=title, ylabel=ylabel)
    ax.legend(fontsize=7, ncol=min(4, len(models) + 1))
    fig.tight_layout()
    return fig
