"""Figures of analysis results, drawn on ``matplotlib.figure.Figure`` (Agg canvas, no pyplot
state). One function per figure; each takes typed results
(:class:`~flatlab.analysis.results.CheckpointResult`) and returns ``None`` when they lack its
data, so a report omits that section. Colours follow the method (SGD grey, SAM blue, NSO red,
...) in every figure.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from flatlab.analysis.results import CheckpointResult, Interpolation
from flatlab.io import atomic_path

METHOD_COLORS = {
    "sgd": "#555555",
    "sam": "#1f77b4",
    "asam": "#17becf",
    "rwp": "#2ca02c",
    "nso": "#d62728",
}
_SPARE_COLORS = ("#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#7f7f7f",
                 "#aec7e8", "#ff9896", "#98df8a", "#c5b0d5")


def checkpoint_colors(checkpoints: Sequence[CheckpointResult]) -> dict[str, str]:
    """Colour per checkpoint: its method's colour; later checkpoints of a used method get spares."""
    colors: dict[str, str] = {}
    for i, ck in enumerate(checkpoints):
        color = METHOD_COLORS.get(ck.method)
        if color is None or color in colors.values():
            free = [c for c in _SPARE_COLORS if c not in colors.values()]
            color = free[0] if free else _SPARE_COLORS[i % len(_SPARE_COLORS)]
        colors[ck.name] = color
    return colors


def save_figure(fig: Figure, path: Path) -> None:
    """Save ``fig`` as PNG atomically."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def plot_training_curves(metrics: Mapping[str, pd.DataFrame], colors: Mapping[str, str]
                         ) -> Figure | None:
    """Loss and accuracy per epoch (train solid, test dashed); test accuracy vs gradient evals."""
    metrics = {name: df for name, df in metrics.items() if "epoch" in df and len(df)}
    if not metrics:
        return None
    budget = any("grad_evals" in df and "test_acc" in df for df in metrics.values())
    fig = Figure(figsize=(15 if budget else 10, 4), layout="constrained")
    axes = fig.subplots(1, 3 if budget else 2)
    for name, df in metrics.items():
        for split, style in (("train", "-"), ("test", "--")):
            for ax, kind in zip(axes[:2], ("loss", "acc"), strict=True):
                column = f"{split}_{kind}"
                if column in df:
                    ax.plot(df["epoch"], df[column], style, color=colors[name],
                            label=name if split == "train" else None)
        if budget and "grad_evals" in df and "test_acc" in df:
            axes[2].plot(df["grad_evals"], df["test_acc"], "--", color=colors[name], label=name)
    axes[0].set(xlabel="epoch", ylabel="loss", title="Loss (train solid, test dashed)")
    axes[1].set(xlabel="epoch", ylabel="accuracy", title="Accuracy (train solid, test dashed)")
    if budget:
        axes[2].set(xlabel="gradient evaluations", ylabel="test accuracy",
                    title="Test accuracy at matched gradient budget")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def plot_eigenvalues(checkpoints: Sequence[CheckpointResult], colors: Mapping[str, str]
                     ) -> Figure | None:
    """Top-k Hessian eigenvalues as grouped bars (one group per rank, one bar per checkpoint)."""
    rows = [(ck.name, list(ck.eigenvalues)) for ck in checkpoints if ck.eigenvalues]
    if not rows:
        return None
    k = max(len(eig) for _, eig in rows)
    width = 0.8 / len(rows)
    fig = Figure(figsize=(max(6, 1.2 * k + 3), 4), layout="constrained")
    ax = fig.subplots()
    for j, (name, eig) in enumerate(rows):
        x = np.arange(len(eig)) + (j - (len(rows) - 1) / 2) * width
        ax.bar(x, eig, width=width, color=colors[name], label=name)
    ax.set_xticks(np.arange(k), [f"λ{i + 1}" for i in range(k)])
    ax.set(ylabel="eigenvalue", title="Top Hessian eigenvalues (full Hessian, Lanczos)")
    ax.axhline(0, color="black", lw=0.8)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def plot_density(checkpoints: Sequence[CheckpointResult], colors: Mapping[str, str]
                 ) -> Figure | None:
    """Eigenvalue densities overlaid; log y when the densities span more than three decades."""
    rows = [(ck.name, np.asarray(ck.density.grid, float), np.asarray(ck.density.density, float))
            for ck in checkpoints if ck.density is not None and ck.density.grid]
    if not rows:
        return None
    fig = Figure(figsize=(8, 4), layout="constrained")
    ax = fig.subplots()
    peak = max(float(np.max(d)) for _, _, d in rows)
    positive = [float(np.min(d[d > 0])) for _, _, d in rows if np.any(d > 0)]
    log_y = peak > 0 and positive and peak / min(positive) > 1e3
    floor = peak * 1e-8 if log_y else 0.0
    for name, grid, density in rows:
        ax.plot(grid, np.maximum(density, floor) if log_y else density, color=colors[name],
                label=name)
    if log_y:
        ax.set_yscale("log")
        ax.set_ylim(bottom=peak * 1e-7)
    ax.set(xlabel="eigenvalue", ylabel="density" + (" (log scale)" if log_y else ""),
           title="Hessian eigenvalue density (stochastic Lanczos quadrature)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def plot_slices_1d(checkpoints: Sequence[CheckpointResult], colors: Mapping[str, str]
                   ) -> Figure | None:
    """Loss and accuracy along a filter-normalised random direction, all checkpoints overlaid."""
    rows = [(ck.name, ck.landscape_1d) for ck in checkpoints if ck.landscape_1d is not None]
    if not rows:
        return None
    fig = Figure(figsize=(10, 4), layout="constrained")
    axes = fig.subplots(1, 2)
    for name, sl in rows:
        axes[0].plot(sl.alphas, _nan(sl.loss), color=colors[name], label=name)
        if sl.accuracy is not None:
            axes[1].plot(sl.alphas, _nan(sl.accuracy), color=colors[name], label=name)
    axes[0].set(xlabel="step along direction (α)", ylabel="loss", title="1-D loss slice")
    axes[1].set(xlabel="step along direction (α)", ylabel="accuracy", title="1-D accuracy slice")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def plot_slices_2d(checkpoints: Sequence[CheckpointResult], colors: Mapping[str, str]
                   ) -> Figure | None:
    """One loss contour per checkpoint on shared (log-spaced) levels so panels compare directly.

    ``loss[i][j]`` is the loss at ``alphas[i]`` (x axis) and ``betas[j]`` (y axis).
    """
    rows = [(ck.name, ck.landscape_2d) for ck in checkpoints if ck.landscape_2d is not None]
    if not rows:
        return None
    grids = [np.asarray(_nan(sl.loss), float) for _, sl in rows]
    finite = np.concatenate([g[np.isfinite(g)].ravel() for g in grids])
    if finite.size == 0:
        return None
    low, high = float(finite.min()), float(finite.max())
    log = low > 0 and high / low > 10
    levels = (np.geomspace(low, high, 16) if log else np.linspace(low, high + 1e-12, 16))
    ncols = min(3, len(rows))
    nrows = math.ceil(len(rows) / ncols)
    fig = Figure(figsize=(4.6 * ncols, 4 * nrows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols)).ravel()
    image = None
    for ax, (name, sl), loss in zip(axes, rows, grids, strict=False):
        alphas, betas = np.asarray(sl.alphas, float), np.asarray(sl.betas, float)
        image = ax.contourf(alphas, betas, loss.T, levels=levels, cmap="viridis",
                            norm=LogNorm(low, high) if log else None, extend="both")
        ax.contour(alphas, betas, loss.T, levels=levels, colors="white", linewidths=0.4)
        ax.plot([0], [0], marker="*", color=colors[name], markersize=12, markeredgecolor="white")
        ax.set(xlabel="α (direction 1)", ylabel="β (direction 2)", title=name, aspect="equal")
    for ax in axes[len(rows):]:
        ax.set_visible(False)
    fig.colorbar(image, ax=axes[: len(rows)].tolist(), label="loss", shrink=0.9, format="%.3g")
    return fig


def plot_interpolation(interpolation: Interpolation | None, colors: Mapping[str, str]
                       ) -> Figure | None:
    """Loss and accuracy on the straight line from one checkpoint (α=0) to another (α=1)."""
    if interpolation is None or not interpolation.alphas:
        return None
    start, end = interpolation.start, interpolation.end
    fig = Figure(figsize=(10, 4), layout="constrained")
    axes = fig.subplots(1, 2)
    for values, key, ax in ((interpolation.loss, "loss", axes[0]),
                            (interpolation.accuracy, "accuracy", axes[1])):
        if values is None:
            continue
        ax.plot(interpolation.alphas, _nan(values), color="black")
        for alpha, name in ((0.0, start), (1.0, end)):
            ax.axvline(alpha, color=colors.get(name, "grey"), ls=":", label=name)
        ax.set(xlabel=f"α  (0 = {start}, 1 = {end})", ylabel=key,
               title=f"Linear interpolation: {key}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def _nan(values):
    """``None`` (a non-finite value in the JSON) as NaN, nested sequences kept."""
    if isinstance(values, list | tuple):
        return [_nan(v) for v in values]
    return math.nan if values is None else values
