"""Comparison report: analysis results -> HTML + Markdown + PNG + CSV.

``write_report(analysis, out_dir)`` writes::

    out_dir/index.html       self-contained page: opens offline, no CDN, needs no JavaScript
    out_dir/report.md        the same tables and figures in Markdown
    out_dir/comparison.csv   the table as raw numbers (full precision), with the changes
                             against the baseline
    out_dir/figures/*.png    one PNG per figure, referenced by relative path from both pages

File names: ``summary.csv`` is ``flatlab.analyze``'s contract file (the measurements, one row
per checkpoint); ``comparison.csv`` is this report's table (the same rows plus training
metrics, hyperparameters and changes relative to the baseline; it was ``report_summary.csv``
in flatlab 0.1.0). A study's ``summary.csv`` likewise has one row per compared arm.

Both pages are one :class:`~flatlab.reporting.page.Page`. Sections without data are omitted;
PNGs left in ``figures/`` by an earlier report that this one does not draw are removed.

Conventions: accuracies are shown in percent; the generalisation gap is
``train_acc - test_acc`` in percentage points (from the checkpoint's own metrics); the
relative change of a value ``x`` against the baseline's ``b`` is ``(x - b) / |b|``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure as MplFigure

import flatlab
from flatlab.analysis.results import Analysis, CheckpointResult
from flatlab.errors import FlatlabError
from flatlab.io import atomic_path
from flatlab.reporting import figures as plotting
from flatlab.reporting.format import (
    MISSING,
    fmt,
    fmt_int,
    fmt_pct,
    fmt_rel,
    fmt_trace,
    format_hyperparameters,
    num,
    relative_change,
)
from flatlab.reporting.page import BulletList, Code, Figure, Heading, Page, Paragraph, Table

FIGURES_DIR = "figures"
COMPARISON_CSV = "comparison.csv"

# Not needed to view the page: records whether every image decoded (read by the browser test).
IMAGE_CHECK = """
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var ok = images.filter(function (i) { return i.complete && i.naturalWidth > 0; });
  document.body.dataset.imagesTotal = String(images.length);
  document.body.dataset.imagesLoaded = String(ok.length);
  document.body.dataset.imagesOk = String(ok.length === images.length);
});
"""

TRAINING_CAPTION = (
    "Per-epoch loss and accuracy from each run's metrics.csv. Train values average each "
    "step's first pass, which for NSO (and RWP without a clean pass) is at the perturbed "
    "weights W + U, so its train curve sits above the loss at W.")


def resolve_baseline(checkpoints: Sequence[CheckpointResult], baseline: str | None = None) -> str:
    """The baseline's name: ``baseline`` if given, else the first SGD checkpoint, else the first."""
    names = [ck.name for ck in checkpoints]
    if baseline is not None:
        if baseline not in names:
            raise FlatlabError(f"baseline {baseline!r} is not among the checkpoints; "
                               f"choose one of {', '.join(names)}")
        return baseline
    return next((ck.name for ck in checkpoints if ck.method == "sgd"), names[0])


def summary_table(analysis: Analysis | Mapping, baseline: str | None = None) -> pd.DataFrame:
    """One row per checkpoint with raw numbers (``comparison.csv``); units as in the module
    docstring."""
    checkpoints = Analysis.coerce(analysis).checkpoints
    base_name = resolve_baseline(checkpoints, baseline)
    k = max((len(ck.eigenvalues or ()) for ck in checkpoints), default=0)
    rows = []
    for ck in checkpoints:
        eig = list(ck.eigenvalues or ())
        train_acc, test_acc = ck.metric("train_acc"), ck.metric("test_acc")
        row = {
            "name": ck.name,
            "optimizer": ck.method,
            "hyperparameters": format_hyperparameters(ck.hyperparameters),
            "epoch": ck.epoch,
            "grad_evals": ck.grad_evals,
            "test_acc": test_acc,
            "train_acc": train_acc,
            "train_loss": ck.metric("train_loss"),
            "test_loss": ck.metric("test_loss"),
            "gap": None if train_acc is None or test_acc is None else train_acc - test_acc,
            "analysis_loss": ck.loss,
            "analysis_accuracy": ck.accuracy,
            "trace": ck.trace,
            "trace_stderr": ck.trace_stderr,
        }
        for i in range(k):
            row[f"lambda_{i + 1}"] = eig[i] if i < len(eig) else None
        for name in ("trace_paper", "lambda_paper"):
            if any(getattr(c, name) is not None for c in checkpoints):
                row[name] = getattr(ck, name)
        rows.append(row)
    table = pd.DataFrame(rows)
    if "lambda_1" not in table:
        table["lambda_1"] = None
    base = table.loc[table["name"] == base_name].iloc[0]
    for column in ("test_acc", "trace", "lambda_1"):
        table[f"rel_{column}"] = [relative_change(num(v), num(base[column]))
                                  for v in table[column]]
    table["baseline"] = table["name"] == base_name
    return table


def display_table(table: pd.DataFrame, analysis: Analysis | Mapping) -> pd.DataFrame:
    """The summary table as formatted strings (what the HTML and Markdown pages show)."""
    checkpoints = Analysis.coerce(analysis).checkpoints
    converged = {ck.name: list(ck.eigen_converged or ()) for ck in checkpoints}
    shared = shared_hyperparameters(checkpoints)
    lambdas = [c for c in table.columns if c.startswith("lambda_") and c[7:].isdigit()]
    out = pd.DataFrame({
        "checkpoint": [name + (" (baseline)" if is_base else "")
                       for name, is_base in zip(table["name"], table["baseline"], strict=True)],
        "method": table["optimizer"],
        "hyperparameters": [format_hyperparameters(ck.hyperparameters, skip=shared)
                            for ck in checkpoints],
        "epochs": [fmt_int(v) for v in table["epoch"]],
        "grad evals": [fmt_int(v) for v in table["grad_evals"]],
        "test acc (%)": [fmt_pct(v) for v in table["test_acc"]],
        "train loss": [fmt(v) for v in table["train_loss"]],
        "loss at W": [fmt(v) for v in table["analysis_loss"]],
        "gap (pts)": [fmt_pct(v) for v in table["gap"]],
        "trace ± s.e.": [fmt_trace(t, s) for t, s in zip(table["trace"], table["trace_stderr"],
                                                          strict=True)],
    })
    if table["analysis_loss"].isna().all():
        out = out.drop(columns="loss at W")
    for column in lambdas:
        i = int(column.split("_")[1]) - 1
        out[f"λ{i + 1}"] = [
            fmt(v) + ("" if num(v) is None or (converged[name] + [True] * (i + 1))[i] else "*")
            for name, v in zip(table["name"], table[column], strict=True)]
    for column, label in (("trace_paper", "trace (paper)"), ("lambda_paper", "λ (paper)")):
        if column in table:
            out[label] = [fmt(v) for v in table[column]]
    for column, label in (("rel_test_acc", "Δ test acc"), ("rel_trace", "Δ trace"),
                          ("rel_lambda_1", "Δ λ1")):
        out[label] = [fmt_rel(v) for v in table[column]]
    empty = [c for c in out.columns[1:] if (out[c] == MISSING).all()]
    return out.drop(columns=empty)


def shared_hyperparameters(checkpoints: Sequence[CheckpointResult]) -> dict:
    """Optimizer settings equal in every checkpoint (empty for a single checkpoint): the table
    shows them once, above it, and each row only what differs."""
    if len(checkpoints) < 2:
        return {}
    first, *rest = [ck.hyperparameters for ck in checkpoints]
    return {key: value for key, value in first.items()
            if value is not None and all(key in kw and kw[key] == value for kw in rest)}


def provenance_table(analysis: Analysis | Mapping) -> pd.DataFrame:
    """Per-checkpoint seeds, data, model and estimator budgets, as strings."""
    rows = []
    for ck in Analysis.coerce(analysis).checkpoints:
        trace_budget = MISSING
        if ck.trace is not None:
            trace_budget = f"{ck.trace_method or '?'}, {ck.trace_matvecs or '?'} products"
        rows.append({
            "checkpoint": ck.name,
            "path": ck.path or "",
            "training seed": fmt_int(ck.seed),
            "dataset": _spec_text(ck.dataset),
            "model": _spec_text(ck.model),
            "trace estimator": trace_budget,
            "eigen products": fmt_int(ck.eigen_matvecs) if ck.eigenvalues else MISSING,
        })
    return pd.DataFrame(rows)


def load_metrics(checkpoints: Sequence[CheckpointResult],
                 metrics: Mapping[str, pd.DataFrame] | None = None) -> dict[str, pd.DataFrame]:
    """Per-checkpoint training curves: ``metrics[name]`` if given, else ``run_dir/metrics.csv``."""
    found: dict[str, pd.DataFrame] = {}
    for ck in checkpoints:
        if metrics is not None and ck.name in metrics:
            found[ck.name] = metrics[ck.name]
            continue
        path = _run_file(ck, "metrics.csv")
        if path is not None:
            try:
                found[ck.name] = pd.read_csv(path)
            except (OSError, ValueError, pd.errors.EmptyDataError):
                continue
    return found


def write_report(analysis: Analysis | Mapping, out_dir: str | os.PathLike, *,
                 baseline: str | None = None, metrics: Mapping[str, pd.DataFrame] | None = None,
                 command: str | None = None, title: str | None = None) -> Path:
    """Write ``out_dir/index.html``, ``report.md``, ``comparison.csv`` and ``figures/*.png``.

    ``analysis``: an :class:`Analysis` (or a dict of the analysis.json schema); ``baseline``
    names the checkpoint the relative changes are computed against (default: the SGD run if
    any, else the first); ``metrics`` maps checkpoint names to metrics.csv DataFrames (default:
    read each ``run_dir/metrics.csv``); ``command`` regenerates this report (default the
    analysis command). Returns the index.html path.
    """
    analysis = Analysis.coerce(analysis)
    checkpoints = analysis.checkpoints
    if not checkpoints:
        raise FlatlabError("the analysis holds no checkpoints; nothing to report")
    out_dir = Path(out_dir)
    base_name = resolve_baseline(checkpoints, baseline)
    table = summary_table(analysis, base_name)
    with atomic_path(out_dir / COMPARISON_CSV) as tmp:
        table.to_csv(tmp, index=False)
    drawn = _draw_figures(analysis, out_dir / FIGURES_DIR, metrics)

    command = command or analysis.command
    page = Page(title or "flatlab report: " + " vs ".join(ck.name for ck in checkpoints),
                script=IMAGE_CHECK)
    if command:
        page.add(Paragraph(f"Regenerate with: `{command}`"))
    note = _summary_note(base_name, checkpoints)
    if any(ck.trace_paper is not None or ck.lambda_paper is not None for ck in checkpoints):
        note += (" trace (paper) and λ (paper) follow the paper's official code: Hutchinson "
                 "over the convolution and head weights only, and the sum of per-layer "
                 "Rayleigh quotients of a per-layer-normalised power iteration.")
    page.add(Heading("Summary"), Paragraph(note),
             Table(display_table(table, analysis), css_class="summary"),
             Paragraph(f"Also as CSV (full precision): [{COMPARISON_CSV}]({COMPARISON_CSV}) "
                       f"(this table with the changes against the baseline; `summary.csv`, "
                       f"written by `flatlab.analyze`, holds the measurements alone)."))
    for heading, rel, caption in drawn:
        page.add(Heading(heading), Figure(rel, heading, caption))
    page.add(Heading("How this was made"),
             BulletList(f"{k}: `{v}`" for k, v in _made_items(command, analysis)),
             Table(provenance_table(analysis), css_class="provenance"))
    for ck in checkpoints:
        text = _read_run_text(ck, "config.toml")
        if text is not None:
            page.add(Heading(f"Training config: {ck.name}", 3), Code(text, "toml"))
    return page.write(out_dir)


def _draw_figures(analysis: Analysis, figures_dir: Path,
                  metrics: Mapping[str, pd.DataFrame] | None) -> list[tuple[str, str, str]]:
    """Draw every figure the analysis has data for; ``(heading, relative path, caption)``."""
    checkpoints = analysis.checkpoints
    colors = plotting.checkpoint_colors(checkpoints)
    specs: list[tuple[str, str, Callable[[], MplFigure | None], str]] = [
        ("Training curves", "training_curves.png",
         lambda: plotting.plot_training_curves(load_metrics(checkpoints, metrics), colors),
         TRAINING_CAPTION),
        ("Top Hessian eigenvalues", "eigenvalues.png",
         lambda: plotting.plot_eigenvalues(checkpoints, colors),
         "Largest eigenvalues of the full-parameter Hessian on the analysis samples."),
        ("Eigenvalue density", "density.png",
         lambda: plotting.plot_density(checkpoints, colors),
         "Smoothed spectral density (stochastic Lanczos quadrature), all checkpoints overlaid."),
        ("1-D loss slices", "landscape_1d.png",
         lambda: plotting.plot_slices_1d(checkpoints, colors),
         "Loss along a filter-normalised random direction through each checkpoint (α = 0)."),
        ("2-D loss landscapes", "landscape_2d.png",
         lambda: plotting.plot_slices_2d(checkpoints, colors),
         "Loss on a plane of two filter-normalised random directions; shared contour levels."),
        ("Interpolation", "interpolation.png",
         lambda: plotting.plot_interpolation(analysis.interpolation, colors),
         "Loss and accuracy on the straight line between two checkpoints' weights."),
    ]
    drawn = []
    for heading, filename, draw, caption in specs:
        fig = draw()
        if fig is not None:
            plotting.save_figure(fig, figures_dir / filename)
            drawn.append((heading, f"{FIGURES_DIR}/{filename}", caption))
    keep = {Path(rel).name for _, rel, _ in drawn}
    if figures_dir.is_dir():
        for stale in figures_dir.glob("*.png"):
            if stale.name not in keep:
                stale.unlink()
    return drawn


def _summary_note(base_name: str, checkpoints: Sequence[CheckpointResult]) -> str:
    shared = format_hyperparameters(shared_hyperparameters(checkpoints))
    shared = f"Settings shared by every run: {shared}. " if shared else ""
    return (f"Baseline: {base_name}. {shared}Test accuracy, train loss and the gap "
            "(train acc − test acc, percentage points) come from each checkpoint's own final "
            "metrics (train loss: the epoch's average over each step's first pass, which for "
            "NSO is at the perturbed weights W + U; \"loss at W\" is the loss at the "
            "checkpoint's own weights on the analysis samples); trace and eigenvalues are of "
            "the full Hessian on the analysis samples. "
            "Δ columns are relative changes (x − baseline) / |baseline|. "
            "λ values marked * did not converge (Ritz residual above tolerance).")


def _made_items(command: str | None, analysis: Analysis) -> list[tuple[str, str]]:
    items = []
    if command:
        items.append(("report command", command))
    if analysis.command and analysis.command != command:
        items.append(("analysis command", analysis.command))
    items.append(("flatlab version (analysis)", str(analysis.flatlab_version or MISSING)))
    items.append(("flatlab version (report)", flatlab.__version__))
    for value, label in ((analysis.samples, "analysis samples"),
                         (analysis.seed, "analysis seed"),
                         (analysis.mode, "model mode during analysis")):
        if value is not None:
            items.append((label, str(value)))
    return items


def _run_file(ck: CheckpointResult, filename: str) -> Path | None:
    candidates = [Path(p) / filename for p in (ck.run_dir,) if p]
    candidates += [Path(p).parent / filename for p in (ck.path,) if p]
    return next((p for p in candidates if p.is_file()), None)


def _read_run_text(ck: CheckpointResult, filename: str) -> str | None:
    path = _run_file(ck, filename)
    try:
        return path.read_text(encoding="utf-8") if path is not None else None
    except (OSError, UnicodeDecodeError):
        return None


def _spec_text(spec: Mapping | None) -> str:
    if not spec:
        return MISSING
    kwargs = format_hyperparameters(spec.get("kwargs"))
    seed = f", seed={spec['seed']}" if spec.get("seed") is not None else ""
    return f"{spec.get('name', '?')}({kwargs}{seed})".replace("(, ", "(")
