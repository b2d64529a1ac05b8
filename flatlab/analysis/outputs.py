"""Files an analysis writes: ``analysis.json``, ``summary.csv`` and per-checkpoint figures.

``DIR/analysis.json`` is :meth:`Analysis.to_json` with every list of numbers on one line;
``DIR/summary.csv`` (a contract) has one row per checkpoint: ``name, optimizer, epoch,
grad_evals, test_acc, train_loss, loss, accuracy, trace, trace_stderr, lambda_1..lambda_k``
(``test_acc``/``train_loss``: the checkpoint's own final metrics; ``loss``/``accuracy``: at W on
the analysis samples), then ``trace_paper, lambda_paper`` where computed. Per-checkpoint figures
go to ``DIR/plots/<name>/<figure>.png`` (the comparison report owns ``DIR/figures/``).
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flatlab.analysis.results import Analysis
from flatlab.io import atomic_write_text
from flatlab.reporting import figures as plotting
from flatlab.reporting.report import write_report

ANALYSIS_JSON = "analysis.json"
SUMMARY_CSV = "summary.csv"
PLOTS_DIR = "plots"
SUMMARY_COLUMNS = ("name", "optimizer", "epoch", "grad_evals", "test_acc", "train_loss", "loss",
                   "accuracy", "trace", "trace_stderr")
PAPER_COLUMNS = ("trace_paper", "trace_paper_stderr", "lambda_paper")


def dumps_json(obj: Any, indent: str = "  ", _level: int = 0) -> str:
    """JSON with objects indented and every list of numbers on one line (a 1000-point density
    stays one line, not 1000). NaN is refused (results store it as ``None``)."""
    if isinstance(obj, Analysis):
        obj = obj.to_json()
    pad, inner = indent * _level, indent * (_level + 1)
    if isinstance(obj, Mapping) and obj:
        items = [f"{inner}{json.dumps(str(k))}: {dumps_json(v, indent, _level + 1)}"
                 for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list) and any(isinstance(v, Mapping | list) and v for v in obj):
        if all(isinstance(v, list) and not any(isinstance(w, Mapping | list) for w in v)
               for v in obj):  # a matrix: one row per line
            rows = [inner + json.dumps(v, allow_nan=False) for v in obj]
        else:
            rows = [inner + dumps_json(v, indent, _level + 1) for v in obj]
        return "[\n" + ",\n".join(rows) + "\n" + pad + "]"
    return json.dumps(obj, allow_nan=False)


def summary_rows(analysis: Analysis | Mapping) -> list[dict]:
    """``summary.csv`` rows: one per checkpoint, ``lambda_1..lambda_k`` for the top-k."""
    analysis = Analysis.coerce(analysis)
    k = max((len(ck.eigenvalues or ()) for ck in analysis.checkpoints), default=0)
    paper = [c for c in PAPER_COLUMNS
             if any(getattr(ck, c) is not None for ck in analysis.checkpoints)]
    rows = []
    for ck in analysis.checkpoints:
        row = {"name": ck.name, "optimizer": ck.method or None, "epoch": ck.epoch,
               "grad_evals": ck.grad_evals, "test_acc": ck.metric("test_acc"),
               "train_loss": ck.metric("train_loss"), "loss": ck.loss,
               "accuracy": ck.accuracy, "trace": ck.trace, "trace_stderr": ck.trace_stderr}
        eig = ck.eigenvalues or ()
        for i in range(k):
            row[f"lambda_{i + 1}"] = eig[i] if i < len(eig) else None
        row.update({c: getattr(ck, c) for c in paper})
        rows.append(row)
    return rows


def summary_csv(analysis: Analysis | Mapping) -> str:
    """The text of ``summary.csv`` (floats in full precision, missing values empty)."""
    rows = summary_rows(analysis)
    columns = list(SUMMARY_COLUMNS) + [c for c in (rows[0] if rows else {})
                                       if c not in SUMMARY_COLUMNS]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else repr(v) if isinstance(v, float) else v)
                         for k, v in row.items()})
    return buf.getvalue()


def plot_path(out_dir: Path, name: str, figure: str) -> Path:
    """``out_dir/plots/<name>/<figure>.png`` with unsafe characters of ``name`` replaced."""
    safe = "/".join(re.sub(r"[^A-Za-z0-9._+-]", "_", part) or "_"
                    for part in name.split("/") if part not in ("", ".", ".."))
    return out_dir / PLOTS_DIR / (safe or "_") / f"{figure}.png"


def write_figures(analysis: Analysis | Mapping, out_dir: Path) -> list[Path]:
    """Per-checkpoint PNGs (density, eigenvalues, 1-D and 2-D slices) and the interpolation."""
    analysis = Analysis.coerce(analysis)
    colors = plotting.checkpoint_colors(analysis.checkpoints)
    written = []
    drawers = (("eigenvalues", plotting.plot_eigenvalues), ("density", plotting.plot_density),
               ("landscape_1d", plotting.plot_slices_1d), ("landscape_2d", plotting.plot_slices_2d))
    for ck in analysis.checkpoints:
        for figure, draw in drawers:
            fig = draw([ck], colors)
            if fig is not None:
                path = plot_path(out_dir, ck.name, figure)
                plotting.save_figure(fig, path)
                written.append(path)
    fig = plotting.plot_interpolation(analysis.interpolation, colors)
    if fig is not None:
        path = out_dir / PLOTS_DIR / "interpolation.png"
        plotting.save_figure(fig, path)
        written.append(path)
    return written


def write_outputs(analysis: Analysis | Mapping, out_dir: str | Path, *, report: bool = False,
                  baseline: str | None = None, figures: bool = True) -> Path:
    """Write figures (``plots/NAME/*.png``, unless ``figures=False``), ``summary.csv``,
    ``analysis.json`` (last, each atomically) and with ``report`` the comparison report
    (:func:`flatlab.reporting.report.write_report`). Returns the JSON path."""
    analysis = Analysis.coerce(analysis)
    out_dir = Path(out_dir)
    if figures:
        write_figures(analysis, out_dir)
    atomic_write_text(out_dir / SUMMARY_CSV, summary_csv(analysis))
    path = out_dir / ANALYSIS_JSON
    atomic_write_text(path, dumps_json(analysis) + "\n")
    if report:
        write_report(analysis, out_dir, baseline=baseline)
    return path
