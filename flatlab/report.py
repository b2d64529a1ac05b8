"""Comparison report: an analysis dict (``analysis.json``) -> HTML + Markdown + PNG + CSV.

``write_report(analysis, out_dir)`` writes::

    out_dir/index.html          self-contained page: opens offline, no CDN, needs no JavaScript
    out_dir/report.md           the same tables and figures in Markdown
    out_dir/report_summary.csv  the summary table as raw numbers (full precision)
    out_dir/figures/*.png       one PNG per figure, referenced by relative path from both pages

Figures are drawn on ``matplotlib.figure.Figure`` objects (Agg canvas, no pyplot state), one
function per figure; each returns ``None`` when the analysis lacks its data, and the report
then omits that section. Colours follow the method (SGD grey, SAM blue, NSO red, ...) in every
figure. PNGs left in ``figures/`` by an earlier report that this one does not draw are removed.

Conventions: accuracies are shown in percent; the generalisation gap is
``train_acc - test_acc`` in percentage points (from the checkpoint's own metrics); the
relative change of a value ``x`` against the baseline's ``b`` is ``(x - b) / |b|``.
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

import flatlab
from flatlab.errors import FlatlabError
from flatlab.io import atomic_path, atomic_write_text

FIGURES_DIR = "figures"
SUMMARY_CSV = "report_summary.csv"
MISSING = "n/a"

METHOD_COLORS = {
    "sgd": "#555555",
    "sam": "#1f77b4",
    "asam": "#17becf",
    "rwp": "#2ca02c",
    "nso": "#d62728",
}
_SPARE_COLORS = ("#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#7f7f7f",
                 "#aec7e8", "#ff9896", "#98df8a", "#c5b0d5")


# --------------------------------------------------------------------------- tables

def resolve_baseline(checkpoints: Sequence[Mapping], baseline: str | None = None) -> str:
    """The baseline's name: ``baseline`` if given, else the first SGD checkpoint, else the first."""
    names = [ck["name"] for ck in checkpoints]
    if baseline is not None:
        if baseline not in names:
            raise FlatlabError(f"baseline {baseline!r} is not among the checkpoints; "
                               f"choose one of {', '.join(names)}")
        return baseline
    for ck in checkpoints:
        if _method(ck) == "sgd":
            return ck["name"]
    return names[0]


def relative_change(value: float | None, base: float | None) -> float | None:
    """``(value - base) / |base|``; ``None`` when either is missing or ``base`` is zero."""
    if value is None or base is None or not _finite(value) or not _finite(base) or base == 0:
        return None
    return (value - base) / abs(base)


def summary_table(analysis: Mapping, baseline: str | None = None) -> pd.DataFrame:
    """One row per checkpoint with raw numbers (the CSV); see the module docstring for units."""
    checkpoints = analysis["checkpoints"]
    base_name = resolve_baseline(checkpoints, baseline)
    k = max((len(ck.get("eigenvalues") or []) for ck in checkpoints), default=0)
    rows = []
    for ck in checkpoints:
        m = ck.get("metrics") or {}
        eig = list(ck.get("eigenvalues") or [])
        train_acc, test_acc = m.get("train_acc"), m.get("test_acc")
        row = {
            "name": ck["name"],
            "optimizer": _method(ck),
            "hyperparameters": format_hyperparameters(_kwargs(ck)),
            "epoch": ck.get("epoch"),
            "grad_evals": ck.get("grad_evals"),
            "test_acc": test_acc,
            "train_acc": train_acc,
            "train_loss": m.get("train_loss"),
            "test_loss": m.get("test_loss"),
            "gap": None if train_acc is None or test_acc is None else train_acc - test_acc,
            "analysis_loss": ck.get("loss"),
            "analysis_accuracy": ck.get("accuracy"),
            "trace": ck.get("trace"),
            "trace_stderr": ck.get("trace_stderr"),
        }
        for i in range(k):
            row[f"lambda_{i + 1}"] = eig[i] if i < len(eig) else None
        rows.append(row)
    table = pd.DataFrame(rows)
    if "lambda_1" not in table:
        table["lambda_1"] = None
    base = table.loc[table["name"] == base_name].iloc[0]
    for column in ("test_acc", "trace", "lambda_1"):
        table[f"rel_{column}"] = [relative_change(_num(v), _num(base[column]))
                                  for v in table[column]]
    table["baseline"] = table["name"] == base_name
    return table


def display_table(table: pd.DataFrame, analysis: Mapping) -> pd.DataFrame:
    """The summary table as formatted strings (what the HTML and Markdown pages show)."""
    converged = {ck["name"]: list(ck.get("eigen_converged") or [])
                 for ck in analysis["checkpoints"]}
    shared = shared_hyperparameters(analysis["checkpoints"])
    lambdas = [c for c in table.columns if c.startswith("lambda_")]
    out = pd.DataFrame({
        "checkpoint": [name + (" (baseline)" if is_base else "")
                       for name, is_base in zip(table["name"], table["baseline"], strict=True)],
        "method": table["optimizer"],
        "hyperparameters": [format_hyperparameters(_kwargs(ck), skip=shared)
                            for ck in analysis["checkpoints"]],
        "epochs": [_fmt_int(v) for v in table["epoch"]],
        "grad evals": [_fmt_int(v) for v in table["grad_evals"]],
        "test acc (%)": [_fmt_pct(v) for v in table["test_acc"]],
        "train loss": [_fmt(v) for v in table["train_loss"]],
        "loss at W": [_fmt(v) for v in table["analysis_loss"]],
        "gap (pts)": [_fmt_pct(v) for v in table["gap"]],
        "trace ± s.e.": [_fmt_trace(t, s) for t, s in zip(table["trace"], table["trace_stderr"],
                                                           strict=True)],
    })
    if table["analysis_loss"].isna().all():
        out = out.drop(columns="loss at W")
    for column in lambdas:
        i = int(column.split("_")[1]) - 1
        out[f"λ{i + 1}"] = [
            _fmt(v) + ("" if _num(v) is None or _at(converged[name], i, True) else "*")
            for name, v in zip(table["name"], table[column], strict=True)]
    for column, label in (("rel_test_acc", "Δ test acc"), ("rel_trace", "Δ trace"),
                          ("rel_lambda_1", "Δ λ1")):
        out[label] = [_fmt_rel(v) for v in table[column]]
    empty = [c for c in out.columns[1:] if (out[c] == MISSING).all()]
    return out.drop(columns=empty)


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table of ``frame``'s string cells (no index)."""
    def cell(value) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(c) for c in frame.columns) + " |",
             "|" + "|".join("---" for _ in frame.columns) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |"
              for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def format_hyperparameters(kwargs: Mapping | None, skip: Mapping | None = None) -> str:
    """``{"lr": 0.1, "rho": 0.05}`` -> ``"lr=0.1, rho=0.05"`` (sorted; ``None`` values and the
    keys in ``skip`` dropped)."""
    return ", ".join(f"{key}={_fmt_value(value)}" for key, value in sorted((kwargs or {}).items())
                     if value is not None and key not in (skip or {}))


def shared_hyperparameters(checkpoints: Sequence[Mapping]) -> dict:
    """Optimizer settings equal in every checkpoint (empty for a single checkpoint): the table
    shows them once, above it, and each row only what differs."""
    if len(checkpoints) < 2:
        return {}
    first, *rest = [_kwargs(ck) for ck in checkpoints]
    return {key: value for key, value in first.items()
            if value is not None and all(key in kw and kw[key] == value for kw in rest)}


# --------------------------------------------------------------------------- figures

def checkpoint_colors(checkpoints: Sequence[Mapping]) -> dict[str, str]:
    """Colour per checkpoint: its method's colour; later checkpoints of a used method get spares."""
    colors: dict[str, str] = {}
    for i, ck in enumerate(checkpoints):
        color = METHOD_COLORS.get(_method(ck))
        if color is None or color in colors.values():
            free = [c for c in _SPARE_COLORS if c not in colors.values()]
            color = free[0] if free else _SPARE_COLORS[i % len(_SPARE_COLORS)]
        colors[ck["name"]] = color
    return colors


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


def plot_eigenvalues(checkpoints: Sequence[Mapping], colors: Mapping[str, str]) -> Figure | None:
    """Top-k Hessian eigenvalues as grouped bars (one group per rank, one bar per checkpoint)."""
    rows = [(ck["name"], list(ck["eigenvalues"])) for ck in checkpoints if ck.get("eigenvalues")]
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


def plot_density(checkpoints: Sequence[Mapping], colors: Mapping[str, str]) -> Figure | None:
    """Eigenvalue densities overlaid; log y when the densities span more than three decades."""
    rows = [(ck["name"], np.asarray(ck["density"]["grid"], float),
             np.asarray(ck["density"]["density"], float))
            for ck in checkpoints if ck.get("density") and ck["density"].get("grid")]
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


def plot_slices_1d(checkpoints: Sequence[Mapping], colors: Mapping[str, str]) -> Figure | None:
    """Loss and accuracy along a filter-normalised random direction, all checkpoints overlaid."""
    rows = [(ck["name"], ck["landscape_1d"]) for ck in checkpoints if ck.get("landscape_1d")]
    if not rows:
        return None
    fig = Figure(figsize=(10, 4), layout="constrained")
    axes = fig.subplots(1, 2)
    for name, sl in rows:
        axes[0].plot(sl["alphas"], sl["loss"], color=colors[name], label=name)
        if sl.get("accuracy") is not None:
            axes[1].plot(sl["alphas"], sl["accuracy"], color=colors[name], label=name)
    axes[0].set(xlabel="step along direction (α)", ylabel="loss", title="1-D loss slice")
    axes[1].set(xlabel="step along direction (α)", ylabel="accuracy", title="1-D accuracy slice")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def plot_slices_2d(checkpoints: Sequence[Mapping], colors: Mapping[str, str]) -> Figure | None:
    """One loss contour per checkpoint on shared (log-spaced) levels so panels compare directly.

    ``loss[i][j]`` is the loss at ``alphas[i]`` (x axis) and ``betas[j]`` (y axis).
    """
    rows = [(ck["name"], ck["landscape_2d"]) for ck in checkpoints if ck.get("landscape_2d")]
    if not rows:
        return None
    grids = [np.asarray(sl["loss"], float) for _, sl in rows]
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
        alphas, betas = np.asarray(sl["alphas"], float), np.asarray(sl["betas"], float)
        image = ax.contourf(alphas, betas, loss.T, levels=levels, cmap="viridis",
                            norm=LogNorm(low, high) if log else None, extend="both")
        ax.contour(alphas, betas, loss.T, levels=levels, colors="white", linewidths=0.4)
        ax.plot([0], [0], marker="*", color=colors[name], markersize=12, markeredgecolor="white")
        ax.set(xlabel="α (direction 1)", ylabel="β (direction 2)", title=name, aspect="equal")
    for ax in axes[len(rows):]:
        ax.set_visible(False)
    fig.colorbar(image, ax=axes[: len(rows)].tolist(), label="loss", shrink=0.9, format="%.3g")
    return fig


def plot_interpolation(interpolation: Mapping | None, colors: Mapping[str, str]
                       ) -> Figure | None:
    """Loss and accuracy on the straight line from one checkpoint (α=0) to another (α=1)."""
    if not interpolation or not interpolation.get("alphas"):
        return None
    start, end = interpolation.get("from", "A"), interpolation.get("to", "B")
    fig = Figure(figsize=(10, 4), layout="constrained")
    axes = fig.subplots(1, 2)
    curves = [("loss", axes[0]), ("accuracy", axes[1])]
    for key, ax in curves:
        if interpolation.get(key) is None:
            continue
        ax.plot(interpolation["alphas"], interpolation[key], color="black")
        for alpha, name in ((0.0, start), (1.0, end)):
            ax.axvline(alpha, color=colors.get(name, "grey"), ls=":", label=name)
        ax.set(xlabel=f"α  (0 = {start}, 1 = {end})", ylabel=key,
               title=f"Linear interpolation: {key}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def save_figure(fig: Figure, path: Path) -> None:
    """Save ``fig`` as PNG atomically."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


# --------------------------------------------------------------------------- report

def load_metrics(checkpoints: Sequence[Mapping],
                 metrics: Mapping[str, pd.DataFrame] | None = None) -> dict[str, pd.DataFrame]:
    """Per-checkpoint training curves: ``metrics[name]`` if given, else ``run_dir/metrics.csv``."""
    found: dict[str, pd.DataFrame] = {}
    for ck in checkpoints:
        name = ck["name"]
        if metrics is not None and name in metrics:
            found[name] = metrics[name]
            continue
        path = _run_file(ck, "metrics.csv")
        if path is not None:
            try:
                found[name] = pd.read_csv(path)
            except (OSError, ValueError, pd.errors.EmptyDataError):
                continue
    return found


def write_report(analysis: Mapping, out_dir: str | os.PathLike, *, baseline: str | None = None,
                 metrics: Mapping[str, pd.DataFrame] | None = None,
                 command: str | None = None, title: str | None = None) -> Path:
    """Write ``out_dir/index.html``, ``report.md``, ``report_summary.csv`` and ``figures/*.png``.

    ``analysis`` follows the analysis.json schema; ``baseline`` names the checkpoint the
    relative changes are computed against (default: the SGD run if any, else the first);
    ``metrics`` maps checkpoint names to metrics.csv DataFrames (default: read each
    ``run_dir/metrics.csv``); ``command`` is the command that regenerates this report (default
    ``analysis["command"]``). Sections without data are omitted. Returns the index.html path.
    """
    checkpoints = analysis.get("checkpoints") or []
    if not checkpoints:
        raise FlatlabError("the analysis holds no checkpoints; nothing to report")
    out_dir = Path(out_dir)
    base_name = resolve_baseline(checkpoints, baseline)
    table = summary_table(analysis, base_name)
    shown = display_table(table, analysis)
    colors = checkpoint_colors(checkpoints)
    with atomic_path(out_dir / SUMMARY_CSV) as tmp:
        table.to_csv(tmp, index=False)

    figure_specs: list[tuple[str, str, Callable[[], Figure | None], str]] = [
        ("Training curves", "training_curves.png",
         lambda: plot_training_curves(load_metrics(checkpoints, metrics), colors),
         "Per-epoch loss and accuracy from each run's metrics.csv. Train values average each "
         "step's first pass, which for NSO (and RWP without a clean pass) is at the perturbed "
         "weights W + U, so its train curve sits above the loss at W."),
        ("Top Hessian eigenvalues", "eigenvalues.png",
         lambda: plot_eigenvalues(checkpoints, colors),
         "Largest eigenvalues of the full-parameter Hessian on the analysis samples."),
        ("Eigenvalue density", "density.png", lambda: plot_density(checkpoints, colors),
         "Smoothed spectral density (stochastic Lanczos quadrature), all checkpoints overlaid."),
        ("1-D loss slices", "landscape_1d.png", lambda: plot_slices_1d(checkpoints, colors),
         "Loss along a filter-normalised random direction through each checkpoint (α = 0)."),
        ("2-D loss landscapes", "landscape_2d.png", lambda: plot_slices_2d(checkpoints, colors),
         "Loss on a plane of two filter-normalised random directions; shared contour levels."),
        ("Interpolation", "interpolation.png",
         lambda: plot_interpolation(analysis.get("interpolation"), colors),
         "Loss and accuracy on the straight line between two checkpoints' weights."),
    ]
    figures_dir = out_dir / FIGURES_DIR
    drawn: list[tuple[str, str, str]] = []
    for heading, filename, draw, caption in figure_specs:
        fig = draw()
        if fig is None:
            continue
        save_figure(fig, figures_dir / filename)
        drawn.append((heading, f"{FIGURES_DIR}/{filename}", caption))
    keep = {Path(rel).name for _, rel, _ in drawn}
    if figures_dir.is_dir():
        for stale in figures_dir.glob("*.png"):
            if stale.name not in keep:
                stale.unlink()

    command = command or analysis.get("command")
    title = title or "flatlab report: " + " vs ".join(ck["name"] for ck in checkpoints)
    provenance = provenance_table(analysis)
    configs = {ck["name"]: text for ck in checkpoints
               if (text := _read_run_text(ck, "config.toml")) is not None}
    context = dict(title=title, command=command, base_name=base_name, shown=shown,
                   drawn=drawn, provenance=provenance, configs=configs, analysis=analysis)
    atomic_write_text(out_dir / "report.md", _render_markdown(**context))
    index = out_dir / "index.html"
    atomic_write_text(index, _render_html(**context))
    return index


def provenance_table(analysis: Mapping) -> pd.DataFrame:
    """Per-checkpoint seeds, data, model and estimator budgets, as strings."""
    rows = []
    for ck in analysis["checkpoints"]:
        dataset, model = ck.get("dataset") or {}, ck.get("model") or {}
        trace_budget = ""
        if ck.get("trace") is not None:
            trace_budget = f"{ck.get('trace_method', '?')}, {ck.get('trace_matvecs', '?')} products"
        rows.append({
            "checkpoint": ck["name"],
            "path": str(ck.get("path", "")),
            "training seed": _fmt_int(ck.get("seed")),
            "dataset": _spec_text(dataset),
            "model": _spec_text(model),
            "trace estimator": trace_budget or MISSING,
            "eigen products": (_fmt_int(ck.get("eigen_matvecs")) if ck.get("eigenvalues")
                               else MISSING),
        })
    return pd.DataFrame(rows)


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1250px; margin: 2em auto; padding: 0 1em;
       color: #222; line-height: 1.45; }
table { border-collapse: collapse; font-size: 0.88em; margin: 0.6em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.55em; text-align: right; }
th { background: #f2f2f2; } td:nth-child(-n+3) { text-align: left; }
code, pre { background: #f6f6f6; padding: 0.1em 0.3em; }
pre { padding: 0.6em; overflow-x: auto; }
figure { margin: 1em 0; } img { max-width: 100%; height: auto; }
figcaption { color: #555; font-size: 0.9em; }
"""

# Not needed to view the page: records whether every image decoded (read by the browser test).
_IMAGE_CHECK = """
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var ok = images.filter(function (i) { return i.complete && i.naturalWidth > 0; });
  document.body.dataset.imagesTotal = String(images.length);
  document.body.dataset.imagesLoaded = String(ok.length);
  document.body.dataset.imagesOk = String(ok.length === images.length);
});
"""


def _render_html(*, title, command, base_name, shown, drawn, provenance, configs, analysis) -> str:
    e = html.escape
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
             f"<title>{e(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
             f"<h1>{e(title)}</h1>\n"]
    if command:
        parts.append(f"<p>Regenerate with: <code>{e(command)}</code></p>\n")
    parts.append(f"<h2>Summary</h2>\n<p>{e(_summary_note(base_name, analysis))}</p>\n")
    parts.append(shown.to_html(index=False, border=0, classes="summary", na_rep=MISSING) + "\n")
    parts.append(f"<p>Also as CSV (full precision): "
                 f"<a href=\"{SUMMARY_CSV}\">{SUMMARY_CSV}</a></p>\n")
    for heading, rel, caption in drawn:
        parts.append(f"<h2>{e(heading)}</h2>\n<figure><img src=\"{e(rel)}\" alt=\"{e(heading)}\">"
                     f"<figcaption>{e(caption)}</figcaption></figure>\n")
    parts.append("<h2>How this was made</h2>\n<ul>\n")
    parts += [f"<li>{e(k)}: <code>{e(v)}</code></li>\n" for k, v in _made_items(command, analysis)]
    parts.append("</ul>\n")
    parts.append(provenance.to_html(index=False, border=0, classes="provenance") + "\n")
    for name, text in configs.items():
        parts.append(f"<h3>Training config: {e(name)}</h3>\n<pre>{e(text)}</pre>\n")
    parts.append(f"<script>{_IMAGE_CHECK}</script>\n</body>\n</html>\n")
    return "".join(parts)


def _render_markdown(*, title, command, base_name, shown, drawn, provenance, configs,
                     analysis) -> str:
    parts = [f"# {title}\n\n"]
    if command:
        parts.append(f"Regenerate with: `{command}`\n\n")
    parts.append(f"## Summary\n\n{_summary_note(base_name, analysis)}\n\n"
                 f"{markdown_table(shown)}\n\n"
                 f"Also as CSV (full precision): [{SUMMARY_CSV}]({SUMMARY_CSV})\n\n")
    for heading, rel, caption in drawn:
        parts.append(f"## {heading}\n\n![{heading}]({rel})\n\n{caption}\n\n")
    parts.append("## How this was made\n\n")
    parts += [f"- {k}: `{v}`\n" for k, v in _made_items(command, analysis)]
    parts.append(f"\n{markdown_table(provenance)}\n")
    for name, text in configs.items():
        parts.append(f"\n### Training config: {name}\n\n```toml\n{text.rstrip()}\n```\n")
    return "".join(parts)


def _summary_note(base_name: str, analysis: Mapping) -> str:
    shared = format_hyperparameters(shared_hyperparameters(analysis["checkpoints"]))
    shared = f"Settings shared by every run: {shared}. " if shared else ""
    return (f"Baseline: {base_name}. {shared}Test accuracy, train loss and the gap "
            "(train acc − test acc, percentage points) come from each checkpoint's own final "
            "metrics (train loss: the epoch's average over each step's first pass, which for "
            "NSO is at the perturbed weights W + U; \"loss at W\" is the loss at the "
            "checkpoint's own weights on the analysis samples); trace and eigenvalues are of "
            "the full Hessian on the analysis samples. "
            "Δ columns are relative changes (x − baseline) / |baseline|. "
            "λ values marked * did not converge (Ritz residual above tolerance).")


def _made_items(command: str | None, analysis: Mapping) -> list[tuple[str, str]]:
    items = []
    if command:
        items.append(("report command", command))
    if analysis.get("command") and analysis.get("command") != command:
        items.append(("analysis command", analysis["command"]))
    items.append(("flatlab version (analysis)", str(analysis.get("flatlab_version", MISSING))))
    items.append(("flatlab version (report)", flatlab.__version__))
    for key, label in (("samples", "analysis samples"), ("seed", "analysis seed"),
                       ("mode", "model mode during analysis")):
        if analysis.get(key) is not None:
            items.append((label, str(analysis[key])))
    return items


# --------------------------------------------------------------------------- helpers

def _kwargs(ck: Mapping) -> dict:
    return dict((ck.get("optimizer") or {}).get("kwargs") or {})


def _method(ck: Mapping) -> str:
    return str((ck.get("optimizer") or {}).get("name", "")).lower()


def _run_file(ck: Mapping, filename: str) -> Path | None:
    candidates = []
    if ck.get("run_dir"):
        candidates.append(Path(ck["run_dir"]) / filename)
    if ck.get("path"):
        candidates.append(Path(ck["path"]).parent / filename)
    return next((p for p in candidates if p.is_file()), None)


def _read_run_text(ck: Mapping, filename: str) -> str | None:
    path = _run_file(ck, filename)
    try:
        return path.read_text(encoding="utf-8") if path is not None else None
    except (OSError, UnicodeDecodeError):
        return None


def _spec_text(spec: Mapping) -> str:
    if not spec:
        return MISSING
    kwargs = format_hyperparameters(spec.get("kwargs"))
    seed = f", seed={spec['seed']}" if spec.get("seed") is not None else ""
    return f"{spec.get('name', '?')}({kwargs}{seed})".replace("(, ", "(")


def _num(value) -> float | None:
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _finite(value) -> bool:
    return _num(value) is not None


def _at(values: Sequence, i: int, default):
    return values[i] if i < len(values) else default


def _fmt(value) -> str:
    value = _num(value)
    return MISSING if value is None else f"{value:.4g}"


def _fmt_int(value) -> str:
    value = _num(value)
    return MISSING if value is None else str(int(value))


def _fmt_pct(value) -> str:
    value = _num(value)
    return MISSING if value is None else f"{100 * value:.2f}"


def _fmt_rel(value) -> str:
    value = _num(value)
    return MISSING if value is None else f"{100 * value:+.1f}%"


def _fmt_trace(estimate, stderr) -> str:
    if _num(estimate) is None:
        return MISSING
    return _fmt(estimate) + ("" if _num(stderr) is None else f" ± {_num(stderr):.2g}")


def _fmt_value(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
