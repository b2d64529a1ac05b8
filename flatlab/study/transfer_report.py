"""The transfer study's report: sources, learning rates, sweeps, per-arm results, Pareto plots
over the whole grid, and NSO against the best baseline and SAM (paired t over seeds) for both
metric definitions (full Hessian: ``trace``, ``lambda1``; the paper's: ``trace_paper``,
``lambda_paper``), next to the paper's numbers. Everything is drawn from ``results.csv``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure as MplFigure

from flatlab.report import METHOD_COLORS, save_figure
from flatlab.reporting.page import BulletList, Code, Figure, Heading, Page, Paragraph, Table
from flatlab.study.report import comparison_table, scorecard, verdict
from flatlab.study.runner import RESULTS_CSV, planned_rows, write_csv
from flatlab.study.statistics import compare, select_hyperparameters, summarize
from flatlab.study.transfer import (
    LEARNING_RATES,
    PAPER_MAX_ITER,
    PAPER_TOL,
    PROTOCOL,
    SWEEP_TRACE_MATVECS,
    TITLE,
    VALIDATION,
)

SWEEP_CSV, SUMMARY_CSV, COMPARISON_CSV = "sweep.csv", "summary.csv", "comparison.csv"
QUANTITIES = ("test_acc_best", "test_acc_last", "trace", "lambda1", "trace_paper",
              "lambda_paper", "norm_trace")
SUMMARY_QUANTITIES = (*QUANTITIES, "train_loss_at_w", "trace_se", "dist_from_init",
                      "weight_norm", "sigma_rel", "best_epoch", "val_acc_best")
DEFINITIONS = {"full Hessian (trace, λ1)": ("trace", "lambda1"),
               "the paper's (trace_paper, λ_paper)": ("trace_paper", "lambda_paper"),
               "accuracy (best-validation checkpoint, last epoch)": ("test_acc_best",
                                                                     "test_acc_last")}
PAPER = {"trace": "v1 −12.6% vs SAM; v3 −17.7%; v4 −15.8%",
         "trace_paper": "v1 −12.6% vs SAM; v3 −17.7%; v4 −15.8%",
         "lambda1": "v1 −7.8% vs SAM; v3 −12.8%; v4 −9.7%",
         "lambda_paper": "v1 −7.8% vs SAM; v3 −12.8%; v4 −9.7%",
         "test_acc_best": "v3 up to +1.8 pts; v4 up to +2.4 pts",
         "test_acc_last": "", "norm_trace": ""}
MARKERS = {"adam": "o", "sam": "s", "asam": "D", "rwp": "^", "nso": "v", "nso-filter": "P",
           "nso k=2": "X"}


def grid_points(rows: pd.DataFrame) -> pd.DataFrame:
    """One point per (setting, arm, hyperparameter value) of the sweep (mean over its seeds):
    validation and test accuracy, clean train loss at W, trace."""
    sweep = rows[(rows["phase"] == "sweep") & (rows["status"] == "ok")].copy()
    for c in ("test_acc", "test_acc_best", "train_loss_at_w", "trace", "hyper_value",
              "sigma_rel"):
        sweep[c] = pd.to_numeric(sweep[c], errors="coerce")
    return (sweep.groupby(["setting", "method", "hyperparameter", "hyper_value"], sort=False)
            .agg(val_acc=("test_acc", "mean"), test_acc_best=("test_acc_best", "mean"),
                 train_loss_at_w=("train_loss_at_w", "mean"), trace=("trace", "mean"),
                 sigma_rel=("sigma_rel", "mean"), seeds=("seed", "size")).reset_index())


def plot_pareto(points: pd.DataFrame, summary: pd.DataFrame, setting: str) -> MplFigure:
    """Trace vs clean train loss at W, and test accuracy vs trace, one point per grid value
    (lines join an arm's values in grid order; large markers: the final runs' means)."""
    fig = MplFigure(figsize=(12, 4.4), layout="constrained")
    left, right = fig.subplots(1, 2)
    mine = points[points["setting"] == setting]
    for method, group in mine.groupby("method", sort=False):
        group = group.sort_values("hyper_value")
        color = METHOD_COLORS.get(method.split()[0].split("-")[0], None)
        marker = MARKERS.get(method, "o")
        left.plot(group["train_loss_at_w"], group["trace"], marker=marker, color=color,
                  label=method, alpha=0.7, markersize=5)
        right.plot(group["trace"], 100 * group["test_acc_best"], marker=marker, color=color,
                   label=method, alpha=0.7, markersize=5)
    final = summary[summary["setting"] == setting]
    for r in final.itertuples():
        color = METHOD_COLORS.get(r.method.split()[0].split("-")[0], None)
        marker = MARKERS.get(r.method, "o")
        left.scatter(r.train_loss_at_w_mean, r.trace_mean, s=140, marker=marker, color=color,
                     edgecolor="black", zorder=5)
        right.scatter(r.trace_mean, 100 * r.test_acc_best_mean, s=140, marker=marker,
                      color=color, edgecolor="black", zorder=5)
    left.set(xscale="log", yscale="log", xlabel="clean train loss at W (eval mode)",
             ylabel="Hessian trace (full)", title="flatter at the same fit: lower left")
    right.set(xscale="log", xlabel="Hessian trace (full)", ylabel="test accuracy (%)",
              title="accuracy vs flatness: upper left")
    for ax in (left, right):
        ax.grid(alpha=0.3, which="both")
    left.legend(fontsize=8)
    fig.suptitle(f"{setting}: every sweep point (mean of 2 seeds, small) and the final runs "
                 f"(mean of the seeds, large)")
    return fig


def _fmt(mean: float, std: float, scale: float = 1.0, fmt: str = "{:.4g}") -> str:
    if mean is None or not math.isfinite(mean):
        return "n/a"
    text = fmt.format(scale * mean)
    return text if not math.isfinite(std) else f"{text} ± {fmt.format(scale * std)}"


def results_table(summary: pd.DataFrame, setting: str) -> pd.DataFrame:
    table = summary[summary["setting"] == setting]
    columns = {"method": table["variant"], "hyperparameter": table["hyperparameter"],
               "epochs": table["epochs"].astype(int), "n": table["n"]}
    for q, label, scale, fmt in (
            ("test_acc_best", "test acc best-val (%)", 100, "{:.2f}"),
            ("test_acc_last", "test acc last (%)", 100, "{:.2f}"),
            ("train_loss_at_w", "train loss at W", 1, "{:.3g}"),
            ("trace", "trace", 1, "{:.4g}"), ("lambda1", "λ1", 1, "{:.4g}"),
            ("trace_paper", "trace_paper", 1, "{:.4g}"),
            ("lambda_paper", "λ_paper", 1, "{:.4g}"), ("norm_trace", "norm trace", 1, "{:.3g}"),
            ("dist_from_init", "‖W−W_pre‖", 1, "{:.3g}"), ("sigma_rel", "‖U‖/‖W‖", 1, "{:.3g}"),
            ("best_epoch", "best epoch", 1, "{:.1f}")):
        columns[label] = [_fmt(m, s, scale, fmt) for m, s in
                          zip(table[f"{q}_mean"], table[f"{q}_std"], strict=True)]
    return pd.DataFrame(columns)


def write_transfer_report(result: dict, out: Path, *, command: str,
                          wall_seconds: float | None = None) -> Path:
    """Write sweep/summary/comparison CSVs, figures, report.md and index.html into ``out``."""
    rows = result["rows"]
    lr_rows = planned_rows(rows, result["lr_runs"])
    sweep_rows = planned_rows(rows, result["sweep"])
    final_rows = planned_rows(rows, result["final"])
    _, lr_table = select_hyperparameters(lr_rows)
    _, sweep_table = select_hyperparameters(sweep_rows)
    points = grid_points(sweep_rows)
    sweep_table = sweep_table.merge(
        points.rename(columns={"method": "arm"}).drop(columns=["val_acc", "seeds"]),
        left_on=["setting", "hyperparameter", "hyper_value"],
        right_on=["setting", "hyperparameter", "hyper_value"], how="left")
    sweep_table = sweep_table[sweep_table["arm"].notna()]
    sweep_table = sweep_table[_same_arm(sweep_table)]
    used = pd.concat([lr_rows, sweep_rows, final_rows])
    summary = summarize(final_rows, SUMMARY_QUANTITIES)
    comparison = compare(summary, final_rows, QUANTITIES) if not summary.empty else pd.DataFrame()
    write_csv(pd.concat([lr_table, sweep_table], ignore_index=True), out / SWEEP_CSV)
    write_csv(summary, out / SUMMARY_CSV)
    write_csv(comparison, out / COMPARISON_CSV)

    page = Page(TITLE)
    page.add(Paragraph("Regenerate with:"), Code(command), Paragraph(
        f"Every number comes from [{RESULTS_CSV}]({RESULTS_CSV}) (one row per run); aggregates "
        f"in [{SUMMARY_CSV}]({SUMMARY_CSV}), [{COMPARISON_CSV}]({COMPARISON_CSV}), "
        f"[{SWEEP_CSV}]({SWEEP_CSV})."))
    ok = used[used["status"] == "ok"]
    timing = (f"Compute recorded in results.csv (one CPU thread per run): "
              f"{pd.to_numeric(ok['train_seconds'], errors='coerce').sum() / 60:.1f} min "
              f"training + {pd.to_numeric(ok['analysis_seconds'], errors='coerce').sum() / 60:.1f}"
              f" min measurement over {len(used)} runs ({len(lr_rows)} learning-rate, "
              f"{len(sweep_rows)} sweep, {len(final_rows)} final).")
    if wall_seconds is not None:
        timing += f" This invocation: {wall_seconds / 60:.1f} min wall clock."
    page.add(Paragraph(timing))
    planned = len(result["lr_runs"]) + len(result["sweep"]) + len(result["final"])
    failed = used[used["status"] != "ok"]
    if len(failed) or planned > len(used) or result.get("missing"):
        page.add(Paragraph(f"**Incomplete**: {planned - len(used)} planned run(s) have no "
                           f"result; {len(failed)} did not finish (left out)."
                           + (" Not reached: " + "; ".join(result["missing"]) + "."
                              if result.get("missing") else "")))
    _setup(page, result)
    page.add(Heading("Learning rate (plain Adam, validation, mean of 2 seeds)"),
             Table(_shown(lr_table)))
    page.add(Heading("Sweeps (validation, mean of 2 seeds)"), Table(_shown(sweep_table)))
    falloff = grid_falloff(sweep_table)
    if not falloff.empty:
        page.add(Paragraph(
            "Does validation accuracy fall off on both sides of the chosen value? Mean "
            "validation accuracy (2 seeds) at the chosen value and at the lowest and highest "
            "grid values; 'both sides' when each end is lower by more than one validation "
            "example."), Table(falloff))
    edges = edge_choices(pd.concat([lr_table, sweep_table], ignore_index=True))
    if edges:
        page.add(Paragraph(
            "Chosen at the edge of its grid (the best value may lie beyond it): "
            + "; ".join(edges) + ". The validation split has 250 (MNIST-1D) or ~143 (digits) "
            "examples, so one example is 0.4-0.7 points: most differences between grid values "
            "are within noise."))
    page.add(Heading("Results (final runs)"))
    for setting in result["main"].settings:
        if summary.empty or setting.name not in set(summary["setting"]):
            continue
        page.add(Heading(setting.name, 3), Table(results_table(summary, setting.name)))
        save_figure(plot_pareto(points, summary, setting.name),
                    out / "figures" / f"pareto-{setting.name}.png")
        page.add(Figure(f"figures/pareto-{setting.name}.png", f"{setting.name} Pareto plots"))
    page.add(Heading("NSO against the best baseline and SAM, next to the paper"))
    if not comparison.empty:
        comparison["paper"] = comparison["quantity"].map(PAPER)
        page.add(Heading("Headline: NSO (k=1) at the same epochs", 3), Paragraph(
            "Change of NSO's mean against the best baseline's and SAM's (relative for "
            "curvature, percentage points for accuracy), the 95% CI of the paired difference "
            "in the same units, t with its degrees of freedom (n − 1 seeds) and p."),
            Table(headline(comparison)))
        for definition, quantities in DEFINITIONS.items():
            part = comparison[comparison["quantity"].isin(quantities)]
            if part.empty:
                continue
            sentences, lines = verdict(part)
            page.add(Heading(f"Verdict, {definition}", 3), *[Paragraph(t) for t in sentences])
            if lines:
                page.add(BulletList(lines))
            page.add(Table(scorecard(part)))
        page.add(Heading("All comparisons (paired t over seeds, 95% CI)", 3),
                 Table(comparison_table(comparison)))
    page.add(Paragraph(
        "Paper (Ju, Li, Zhang, arXiv 2306.08553): v1 trace −12.6% and top eigenvalue −7.8% "
        "against SAM (eight data sets); v3 trace −17.7%, top eigenvalue −12.8% against four "
        "baselines, up to +1.8 pts accuracy; v4 −15.8% / −9.7%, up to +2.4 pts. Their 'top "
        "eigenvalue' is λ_paper (a sum of per-layer Rayleigh quotients over conv and head "
        "weights, per minibatch of 32), their trace is trace_paper (conv and head weights). "
        "Their setting is ImageNet-pretrained ResNet-34 on image data sets; this study is a "
        "CPU-sized version of the same protocol, so it tests the direction and rough size."))
    return page.write(out)


def headline(comparison: pd.DataFrame) -> pd.DataFrame:
    """NSO k=1 (absolute and filter noise) at E epochs: every quantity, both references."""
    rows = comparison[(comparison["budget"] == "same epochs")
                      & comparison["nso"].isin(["nso", "nso-filter"])]
    table = comparison_table(rows)
    return table.drop(columns=[c for c in ("budget",) if c in table])


def edge_choices(table: pd.DataFrame) -> list[str]:
    """``setting name arg=value (lowest|highest of N)`` for choices at the end of a grid."""
    out = []
    for (setting, name), group in table.groupby(["setting", "optimizer"], sort=False):
        values = sorted(group["hyper_value"].unique())
        chosen = group[group["chosen"].astype(bool)]
        if len(values) < 3 or chosen.empty:
            continue
        value = chosen["hyper_value"].iloc[0]
        if value in (values[0], values[-1]):
            end = "lowest" if value == values[0] else "highest"
            out.append(f"{setting} {'adam' if name == 'sgd' else name} "
                       f"{chosen['hyperparameter'].iloc[0]}={value:g} ({end} of {len(values)})")
    return out


def grid_falloff(table: pd.DataFrame) -> pd.DataFrame:
    """Per swept (setting, optimizer): validation accuracy at the chosen value and at both ends
    of the grid, and whether both ends are lower by more than one validation example. Means
    of ``s`` seeds (column ``seeds``, default 2) move in steps of 1 / (s n_val): the step is
    the smallest gap between a setting's distinct accuracies (gaps under 1e-6 are rounding),
    each drop is counted in whole steps, and one example is ``s`` steps."""
    rows = []
    steps = {}
    for setting, group in table.groupby("setting", sort=False):
        gaps = np.diff(np.sort(group["val_acc"].to_numpy(float)))
        steps[setting] = float(gaps[gaps > 1e-6].min()) if (gaps > 1e-6).any() else None
    for (setting, name), group in table.groupby(["setting", "optimizer"], sort=False):
        group = group.sort_values("hyper_value")
        chosen = group[group["chosen"].astype(bool)]
        if len(group) < 3 or chosen.empty or name == "sgd":
            continue
        acc = group["val_acc"].to_numpy(float)
        best = float(chosen["val_acc"].iloc[0])
        low, high = best - acc[0], best - acc[-1]
        seeds = int(group["seeds"].max()) if "seeds" in group else 2
        step = steps[setting]
        fall = tuple(step is not None and round(drop / step) > seeds for drop in (low, high))
        rows.append({"setting": setting, "sweep": name,
                     "chosen": f"{chosen['hyperparameter'].iloc[0]}="
                               f"{chosen['hyper_value'].iloc[0]:g}",
                     "val acc (%)": f"{100 * best:.2f}",
                     "lowest value: drop (pts)": f"{100 * low:.2f}",
                     "highest value: drop (pts)": f"{100 * high:.2f}",
                     "falls off": {(True, True): "both sides", (True, False): "low side only",
                                   (False, True): "high side only",
                                   (False, False): "neither"}[fall]})
    return pd.DataFrame(rows)


def _same_arm(table: pd.DataFrame) -> pd.Series:
    """Rows whose grid point's arm belongs to the sweep (a sweep shared by two arms, NSO k=1
    and k=2, is run by its first arm only)."""
    names = {"adam": "sgd", "nso": "nso", "nso-filter": "nso-filter", "sam": "sam",
             "asam": "asam", "rwp": "rwp"}
    return table["arm"].map(names) == table["optimizer"]


def _shown(table: pd.DataFrame) -> pd.DataFrame:
    shown = table.copy()
    for c in ("val_acc", "test_acc_best"):
        if c in shown:
            shown[c] = (100 * shown[c]).map("{:.2f}".format)
    for c in ("val_loss", "train_loss_at_w", "trace", "sigma_rel"):
        if c in shown:
            shown[c] = shown[c].map(lambda v: f"{v:.4g}" if np.isfinite(v) else "")
    shown["hyper_value"] = shown["hyper_value"].map("{:g}".format)
    shown["chosen"] = shown["chosen"].map({True: "✓", False: ""})
    return shown


def _setup(page: Page, result: dict) -> None:
    main = result["main"]
    sources = pd.DataFrame([{"setting": name, "source run": s["run"], "epochs": s["epochs"],
                             "source test acc (%)": f"{100 * s['test_acc']:.2f}"}
                            for name, s in result["sources"].items()])
    page.add(Heading("Setup"), Table(pd.DataFrame([{
        "setting": s.name, "data": f"{s.dataset} {s.dataset_kwargs}",
        "validation": f"{VALIDATION[s.name]:.3g} of the training examples",
        "model": f"{s.model} {s.model_kwargs}", "E": s.epochs, "batch": main.batch_size,
        "lr (chosen)": result["lrs"][s.name], "seeds": " ".join(map(str, main.seeds))}
        for s in main.settings])), Table(sources), BulletList([
            f"Protocol: {PROTOCOL}; weight decay {main.weight_decay}; learning rate chosen "
            f"per setting from {LEARNING_RATES} with plain Adam (validation accuracy of the "
            "best-validation checkpoint, mean of 2 seeds), then shared by every arm.",
            "Arms: Adam at E and 2E (same gradient evaluations as SAM), SAM, ASAM, RWP "
            "(filter noise, clean weight 0.5; 2 passes per step), NSO (absolute noise), NSO "
            "with filter noise (3 passes per step with the pass at W) at E and at 2E/3 (SAM's "
            "passes), NSO k=2 (5 passes) at E and at 2E/5 (SAM's passes); the StepLR "
            "period stretches with the run (round(10 x epochs / E)). NSO k=2 uses NSO k=1's σ.",
            "Head: every fine-tuning run starts from the source model's weights without its "
            "head (the last linear layer), which keeps the fresh initialisation of the run's "
            "seed (--init-from backbone.safetensors --init-partial).",
            "BatchNorm: running statistics at W, as the official code: SAM/ASAM/RWP keep "
            "those of their clean first pass, NSO makes a pass at W with gradient weight 0 "
            "(--clean-pass) and keeps its statistics. Measurements in eval mode.",
            "Measurements on the best-validation checkpoint, eval mode, on the run's training "
            f"split (at most {main.samples} examples), see flatlab.study.transfer_measure: "
            f"trace and trace_se: Hutch++ with {main.trace_matvecs} products over all "
            f"parameters; λ1: Lanczos, Ritz residual tolerance {main.eigen_tol:g}; "
            "trace_paper: Hutchinson over conv + head weights (stop at 1e-3 relative change, "
            "≤ 100 probes); λ_paper: per-layer-normalised power iteration over those weights "
            f"on each batch of 32 (≤ {PAPER_MAX_ITER} iterations, tolerance {PAPER_TOL:g}), "
            "mean over batches; norm_trace from trace_paper's per-layer parts. Sweep runs: "
            f"clean loss, trace ({SWEEP_TRACE_MATVECS} products) and test accuracy only, for "
            "the Pareto plots.",
            "Statistics: paired t over the shared seeds (df = n − 1), 95% CI of the mean "
            "difference; the best baseline is the one with the best mean of each quantity; "
            "scorecards count only significant differences (p < 0.05)."]))
