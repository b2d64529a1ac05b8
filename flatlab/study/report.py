"""The study report: sweep, summary and comparison tables, figures, the paired-test verdict,
and one ``flatlab.report`` page per setting, all drawn from ``results.csv`` and
``analysis/<key>.json`` in the output folder (so the report regenerates from ``--out`` alone).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure as MplFigure
from scipy import stats

from flatlab.report import METHOD_COLORS, save_figure, write_report
from flatlab.reporting.page import BulletList, Code, Figure, Heading, Page, Paragraph, Table
from flatlab.study.plan import (
    DEFAULT_NOISE,
    REFERENCE_OPTIMIZER,
    Setting,
    StudyConfig,
    final_runs,
    passes_per_step,
    sweep_runs,
)
from flatlab.study.runner import ANALYSIS_DIR, RESULTS_CSV, planned_rows, write_csv
from flatlab.study.statistics import (
    ALPHA,
    HIGHER_IS_BETTER,
    QUANTITY_NAMES,
    compare,
    is_accuracy,
    scorecard,
    select_hyperparameters,
    summarize,
)

SWEEP_CSV, SUMMARY_CSV, COMPARISON_CSV = "sweep.csv", "summary.csv", "comparison.csv"
# The paper's headline numbers (relative change of NSO; accuracy in percentage points).
PAPER = {
    "trace": "-17.7% (v3, vs 4 baselines); -12.6% (v1, vs SAM)",
    "lambda_1": "-12.8% (v3); -7.8% (v1, vs SAM)",
    "test_acc": "up to +1.8 pts (v3); up to +2.4 pts (v4)",
}


@dataclass
class StudyResult:
    index: Path                 # the report's index.html
    summary: pd.DataFrame       # summary.csv
    comparison: pd.DataFrame    # comparison.csv


def _pm(mean: float, std: float, fmt: str = "{:.4g}", scale: float = 1.0) -> str:
    if mean is None or not math.isfinite(mean):
        return "n/a"
    text = fmt.format(scale * mean)
    return text if std is None or not math.isfinite(std) else f"{text} ± {fmt.format(scale * std)}"


def results_table(summary: pd.DataFrame, setting: str) -> pd.DataFrame:
    """One setting's methods: budgets, mean ± std over seeds of accuracy, trace, λ1, loss."""
    table = summary[summary["setting"] == setting]
    return pd.DataFrame({
        "method": table["variant"],
        "hyperparameter": table["hyperparameter"],
        "epochs": table["epochs"].astype(int),
        "passes/example": (table["epochs"] * table["passes_per_step"]).astype(int),
        "grad evals": table["grad_evals"].round().astype(int),
        "comparisons": table["budgets"].str.replace(";", ", "),
        "test acc (%)": [_pm(m, s, "{:.2f}", 100) for m, s in
                         zip(table["test_acc_mean"], table["test_acc_std"], strict=True)],
        "trace": [_pm(m, s) for m, s in zip(table["trace_mean"], table["trace_std"],
                                             strict=True)],
        "trace s.e. (mean)": [f"{v:.2g}" if math.isfinite(v) else "n/a"
                              for v in table["trace_stderr_mean"]],
        "λ1": [_pm(m, s) + ("*" if u else "") for m, s, u in
               zip(table["lambda_1_mean"], table["lambda_1_std"],
                   table["lambda_1_unconverged"], strict=True)],
        "train loss at W": [_pm(m, s, "{:.3g}") for m, s in
                            zip(table["analysis_loss_mean"], table["analysis_loss_std"],
                                strict=True)],
        "n": table["n"],
    })


def _change_text(quantity: str, value: float) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:+.2f} pts" if is_accuracy(quantity) else f"{100 * value:+.1f}%"


def _ci_text(quantity: str, low: float, high: float, reference: float) -> str:
    """The CI of the raw difference in the units of the change column."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return ""
    if is_accuracy(quantity):
        return f"[{100 * low:+.2f}, {100 * high:+.2f}]"
    if not math.isfinite(reference) or reference == 0:
        return ""
    return f"[{100 * low / abs(reference):+.1f}, {100 * high / abs(reference):+.1f}]%"


def _t_text(t: float, df: float, p: float) -> str:
    if not math.isfinite(t):
        return ""
    df_text = f"{df:.0f}" if abs(df - round(df)) < 1e-9 else f"{df:.1f}"
    return f"{t:+.2f} ({df_text}), p={p:.2g}"


def comparison_table(comparison: pd.DataFrame) -> pd.DataFrame:
    """NSO against the best baseline and SAM: change, 95% CI, t (df) and p of the paired test."""
    rows = []
    for r in comparison.to_dict("records"):
        q = r["quantity"]
        rows.append({
            "setting": r["setting"], "budget": r["budget"], "NSO": r["nso"],
            "quantity": QUANTITY_NAMES[q], "best baseline": r["best_baseline"],
            "NSO vs best": _change_text(q, r["change"]),
            "95% CI": _ci_text(q, r.get("ci_low", math.nan), r.get("ci_high", math.nan),
                               r.get("best_mean", math.nan)),
            "t (df), p": _t_text(r.get("t", math.nan), r.get("df", math.nan),
                                 r.get("p", math.nan)),
            "NSO vs SAM": _change_text(q, r.get("change_vs_sam", math.nan)),
            "95% CI vs SAM": _ci_text(q, r.get("vs_sam_ci_low", math.nan),
                                      r.get("vs_sam_ci_high", math.nan),
                                      r.get("sam_mean", math.nan)),
            "t (df), p vs SAM": _t_text(r.get("vs_sam_t", math.nan),
                                        r.get("vs_sam_df", math.nan),
                                        r.get("vs_sam_p", math.nan)),
            "paper": r["paper"] if isinstance(r.get("paper"), str) else PAPER.get(q, "")})
    return pd.DataFrame(rows)


def verdict(comparison: pd.DataFrame, alpha: float = ALPHA) -> tuple[list[str], list[str]]:
    """Sentences counting the significant differences, and one line per significant
    difference from the best baseline."""
    rows = comparison[~comparison["setting"].str.startswith("mean over")]
    if rows.empty:
        return [], []
    sentences = []
    for prefix, against in (("", "the best baseline"), ("vs_sam_", "SAM")):
        if f"{prefix}p" not in rows:
            continue
        sign = np.where(rows["quantity"].map(HIGHER_IS_BETTER), 1.0, -1.0)
        significant = rows[f"{prefix}p"] < alpha
        better = significant & (sign * rows[f"{prefix}diff"] > 0)
        worse = significant & (sign * rows[f"{prefix}diff"] < 0)
        sentences.append(
            f"Against {against}: of {len(rows)} comparisons (settings × budgets × NSO variants "
            f"× quantities; a 2-pass NSO variant appears in both budgets), NSO is significantly "
            f"better (p < {alpha:g}, two-sided paired t) in {int(better.sum())}, significantly "
            f"worse in {int(worse.sum())}, and not distinguishable from seed noise in "
            f"{int((~significant).sum())}.")
    found = rows[rows["p"] < alpha]
    if len(found):
        sentences.append("The significant differences from the best baseline:")
    lines = [f"{r.setting}, {r.budget}, {r.nso}: {QUANTITY_NAMES[r.quantity]} "
             f"{_change_text(r.quantity, r.change)} vs {r.best_baseline} "
             f"(t = {r.t:+.2f}, {r.df:.0f} df, p = {r.p:.2g})" for r in found.itertuples()]
    return sentences, lines


def plot_setting(summary: pd.DataFrame, setting: str) -> MplFigure:
    """Bars with standard-deviation whiskers: test accuracy, trace and λ1 per method."""
    table = summary[summary["setting"] == setting]
    fig = MplFigure(figsize=(13, 3.8), layout="constrained")
    axes = fig.subplots(1, 3)
    x = np.arange(len(table))
    colors = [METHOD_COLORS.get(o, "#7f7f7f") for o in table["optimizer"]]
    hatches = ["//" if "(" in v else ("xx" if "k=2" in v else "") for v in table["variant"]]
    for ax, (q, label, scale) in zip(axes, (("test_acc", "test accuracy (%)", 100),
                                            ("trace", "Hessian trace", 1),
                                            ("lambda_1", "top eigenvalue λ1", 1)), strict=True):
        means = scale * table[f"{q}_mean"].to_numpy(dtype=float)
        stds = scale * np.nan_to_num(table[f"{q}_std"].to_numpy(dtype=float))
        bars = ax.bar(x, means, yerr=stds, color=colors, capsize=3, edgecolor="black",
                      linewidth=0.5)
        for bar, hatch in zip(bars, hatches, strict=True):
            bar.set_hatch(hatch)
        ax.set_xticks(x, table["variant"], rotation=45, ha="right", fontsize=8)
        ax.set_title(label)
        ax.grid(axis="y", alpha=0.3)
        if q == "test_acc" and np.isfinite(means).any():
            low = np.nanmin(means - stds)
            ax.set_ylim(max(0.0, low - 0.5 * (np.nanmax(means + stds) - low) - 0.5), None)
    fig.suptitle(f"{setting}: mean ± std over seeds (hatching: // other epoch count than E, "
                 f"xx NSO k=2 at E epochs = twice the passes)")
    return fig


def write_setting_report(study: StudyConfig, setting: Setting, rows: pd.DataFrame, out: Path,
                         command: str) -> Path | None:
    """``flatlab.report.write_report`` page of the setting's lowest-seed final runs."""
    seed = min(study.seeds)
    final = rows[(rows["phase"] == "final") & (rows["status"] == "ok")
                 & (rows["setting"] == setting.name) & (rows["seed"] == seed)]
    checkpoints, metrics, analysis = [], {}, None
    for _, row in final.iterrows():
        path = out / ANALYSIS_DIR / f"{row['key']}.json"
        if not path.is_file():
            return None
        record = json.loads(path.read_text(encoding="utf-8"))
        checkpoints.append(dict(record["entry"], name=row["variant"]))
        metrics[row["variant"]] = pd.DataFrame(record["metrics"])
        analysis = record["analysis"]
    if not checkpoints:
        return None
    analysis = dict(analysis, checkpoints=checkpoints, interpolation=None, command=None)
    baseline = "sgd" if "sgd" in metrics else None
    return write_report(analysis, out / setting.name, baseline=baseline, metrics=metrics,
                        command=command,
                        title=f"flatness study, {setting.name}: the seed-{seed} runs")


def _setup_items(study: StudyConfig) -> list[str]:
    ref = passes_per_step(REFERENCE_OPTIMIZER)
    sweeps = "; ".join(f"{name} {arg} ∈ {{{', '.join(f'{v:g}' for v in values)}}}"
                       for name, (arg, values) in study.sweep.items())
    shared = [f"{m.label} uses the value chosen for {m.sweep_name}" for m in study.methods
              if m.sweep_name in study.sweep and m.num_perturbs not in (None, 1)]
    noise = "; ".join(f"{m.label} {m.train_args.get('noise') or DEFAULT_NOISE[m.optimizer]}"
                      for m in study.methods if m.optimizer in DEFAULT_NOISE)
    return [
        "**Budgets.** Passes per step (forward + backward, counted by the training loop and "
        "equal to `gradient_evaluations_per_step`): SGD 1; SAM, ASAM, RWP (clean + one "
        "perturbed pass) and NSO k=1 (W+U, W−U) 2; NSO k=2 4. All methods use the same batch "
        "size, so passes per example = passes per step × epochs. *Same epochs*: every method E "
        f"epochs. *Same gradient evaluations*: every method {ref}E passes per example (SAM's "
        "budget at E epochs): SGD trains 2E epochs, NSO k=2 E/2 epochs (its cosine schedule "
        "spans the shorter run); the 2-pass methods are shared by both comparisons. The "
        "'grad evals' column is the measured total.",
        "**Hyperparameters.** Shared by all methods: learning rate, momentum, weight decay, "
        "batch size, cosine schedule. Swept per setting on a validation split "
        f"({study.validation_fraction:.0%} of the training split held out, seed "
        f"{study.validation_seed}; the test split is never used for selection), seed "
        f"{study.sweep_seed}, E epochs, picked by validation accuracy (ties: lower validation "
        f"loss): {sweeps}. Noise: {noise} (absolute: N(0, σ²I); filter: relative to each "
        "filter's norm; RWP with clean weight 0.5, the library default)"
        + (f"; {'; '.join(shared)}" if shared else "") + ".",
        f"**Measurements.** Test accuracy after the last epoch. On a fixed subset of "
        f"{study.samples} training examples (the same for all runs on a data set; analysis "
        f"seed {study.analysis_seed}), model in eval mode, loss = mean cross-entropy: trace of "
        f"the full-parameter Hessian by Hutch++ with {study.trace_matvecs} Hessian-vector "
        "products (its standard error is reported per run; the table shows the mean over seeds "
        "of those errors next to the spread over seeds) and top eigenvalue λ1 by Lanczos "
        f"(Ritz residual tolerance {study.eigen_tol:g}; * marks a run that did not converge), "
        "via `flatlab.analyze.analyze`.",
        "**Aggregation and tests.** Mean ± sample standard deviation (ddof = 1) over seeds. NSO "
        "is compared with the *best baseline* of the same budget group, best = the baseline "
        "(SGD, SAM, ASAM, RWP) with the best mean of the quantity compared (highest accuracy, "
        "lowest trace, lowest λ1), so each quantity may have a different best baseline. Trace "
        "and λ1 changes are relative, (NSO − best) / |best|; accuracy changes are differences "
        "in percentage points. Seeds are shared across methods (seed s fixes the initial "
        "weights and the data order of every method), so each difference is tested **paired "
        "by seed**: t = mean(d) / (sd(d) / √n) over the per-seed differences d, with n − 1 "
        "degrees of freedom, two-sided p, and the 95% confidence interval mean(d) ± "
        f"t(0.975, n − 1) · sd(d) / √n (with {len(study.seeds)} seeds: "
        f"{len(study.seeds) - 1} degrees of freedom, critical |t| = "
        f"{_t_critical(len(study.seeds) - 1)}); Welch's test only where the seeds differ. "
        "The CI is shown relative to the baseline's mean. Picking the best baseline by its "
        "mean favours it slightly (its own seed noise helped it win). 'NSO vs SAM' is the "
        "paper-v1 comparison.",
    ]


def _t_critical(df: int) -> str:
    return f"{stats.t.ppf(0.975, df):.3f}" if df >= 1 else "n/a"


def _sweep_table(sweep: pd.DataFrame) -> pd.DataFrame:
    shown = sweep.copy()
    shown["val acc (%)"] = (100 * shown.pop("val_acc")).map("{:.2f}".format)
    shown["val loss"] = shown.pop("val_loss").map("{:.4f}".format)
    shown["hyper_value"] = shown["hyper_value"].map("{:g}".format)
    shown["chosen"] = shown["chosen"].map({True: "✓", False: ""})
    return shown


def _edge_choices(study: StudyConfig, sweep: pd.DataFrame) -> list[str]:
    """Chosen values at the edge of a grid of more than two values."""
    edges = []
    for r in sweep[sweep["chosen"]].itertuples():
        values = study.sweep.get(r.optimizer, (None, ()))[1]
        if len(values) > 2 and r.hyper_value in (min(values), max(values)):
            edges.append(f"{r.setting} {r.optimizer} {r.hyperparameter}={r.hyper_value:g}")
    return edges


def write_study_report(study: StudyConfig, rows: pd.DataFrame, out: Path, *, title: str,
                       command: str, wall_seconds: float | None = None,
                       new_runs: int = 0) -> StudyResult:
    """results.csv rows -> sweep/summary/comparison CSVs, figures, report.md, index.html."""
    planned = sweep_runs(study)
    chosen, sweep = select_hyperparameters(planned_rows(rows, planned))
    planned += final_runs(study, chosen)
    used = planned_rows(rows, planned)
    summary = summarize(used)
    comparison = compare(summary, used)
    if not comparison.empty:
        comparison["paper"] = comparison["quantity"].map(PAPER)
    write_csv(sweep, out / SWEEP_CSV)
    write_csv(summary, out / SUMMARY_CSV)
    write_csv(comparison, out / COMPARISON_CSV)

    page = Page(title)
    page.add(Paragraph("Regenerate with:"), Code(command), Paragraph(
        "Generated by `python -m flatlab.study`; every number below comes from "
        f"[{RESULTS_CSV}]({RESULTS_CSV}) (one row per run). Aggregates: "
        f"[{SUMMARY_CSV}]({SUMMARY_CSV}), [{COMPARISON_CSV}]({COMPARISON_CSV}), "
        f"[{SWEEP_CSV}]({SWEEP_CSV})."))
    ok = used[used["status"] == "ok"]
    timing = (f"Time recorded in results.csv (wall clock of each run, one CPU thread each, "
              f"on whatever else the machine was doing): "
              f"{pd.to_numeric(ok['train_seconds'], errors='coerce').sum() / 60:.1f} min "
              f"training + {pd.to_numeric(ok['analysis_seconds'], errors='coerce').sum() / 60:.1f}"
              f" min Hessian analysis over {len(used)} runs ({(used['phase'] == 'sweep').sum()} "
              f"sweep, {(used['phase'] == 'final').sum()} final).")
    if wall_seconds is not None:
        timing += (f" The invocation that wrote this report ran {new_runs} new run(s) in "
                   f"{wall_seconds / 60:.1f} min (the rest were reused from results.csv).")
    page.add(Paragraph(timing))
    failed = used[used["status"] != "ok"]
    if len(failed):
        page.add(Paragraph(f"{len(failed)} run(s) did not finish (diverged) and are left out "
                           "of the aggregates: " + "; ".join(f"{r.run_name}: {r.status}"
                                                             for r in failed.itertuples())))
    if len(planned) > len(used):
        page.add(Paragraph(f"**Incomplete**: {len(planned) - len(used)} planned run(s) have no "
                           "result yet."))

    page.add(Heading("Setup"), Table(pd.DataFrame([{
        "setting": s.name,
        "data": s.dataset + (f" {s.dataset_kwargs}" if s.dataset_kwargs else ""),
        "model": s.model + (f" {s.model_kwargs}" if s.model_kwargs else ""),
        "E (epochs)": s.epochs, "batch": study.batch_size, "lr (peak)": study.lr,
        "schedule": study.schedule, "momentum": study.momentum,
        "weight decay": study.weight_decay, "seeds": " ".join(map(str, study.seeds))}
        for s in study.settings])), BulletList(_setup_items(study)))

    page.add(Heading("Hyperparameter sweep (validation split)"))
    if not sweep.empty:
        page.add(Table(_sweep_table(sweep)))
        edges = _edge_choices(study, sweep)
        if edges:
            page.add(Paragraph(
                "Chosen at the edge of its grid (the best value may lie beyond it): "
                + "; ".join(edges) + f". The validation split holds "
                f"{study.validation_fraction:.0%} of the training examples, so accuracy "
                "differences of a few tenths of a point between grid values are within noise."))

    page.add(Heading("Results"))
    for setting in study.settings:
        if summary.empty or setting.name not in set(summary["setting"]):
            continue
        page.add(Heading(setting.name, 3), Table(results_table(summary, setting.name)))
        save_figure(plot_setting(summary, setting.name), out / "figures" / f"{setting.name}.png")
        page.add(Figure(f"figures/{setting.name}.png", f"{setting.name}: accuracy, trace, λ1"))
        if write_setting_report(study, setting, used, out, command) is not None:
            page.add(Paragraph(
                f"Training curves, eigenvalues and 1-D loss slices of the seed-"
                f"{min(study.seeds)} runs: [{setting.name}/index.html]({setting.name}/index.html)"
                f" ([report.md]({setting.name}/report.md))."))

    page.add(Heading("NSO against the best baseline, next to the paper"))
    if not comparison.empty:
        sentences, lines = verdict(comparison)
        page.add(Heading("Verdict", 3), *[Paragraph(text) for text in sentences])
        if lines:
            page.add(BulletList(lines))
        card = scorecard(comparison)
        if not card.empty:
            page.add(Paragraph(
                f"Scorecard: in how many settings NSO is *significantly* (p < {ALPHA:g}, paired "
                "t over seeds) better or worse than the best baseline of its budget group and "
                "than SAM (better = higher accuracy, lower trace, lower λ1). Differences that "
                "are not significant are not counted either way."), Table(card))
        page.add(Table(comparison_table(comparison)))
    page.add(Paragraph(
        "Paper: Ju, Li, Zhang, Noise Stability Optimization (arXiv 2306.08553): v1 reports "
        "trace −12.6% and top eigenvalue −7.8% against SAM averaged over eight data sets; v3 "
        "trace −17.7%, top eigenvalue −12.8% against four sharpness-reducing baselines and "
        "up to +1.8% test accuracy fine-tuning ResNet-34 (v4: −15.8% / −9.7%, up to +2.4%). "
        "Their top eigenvalue is a sum of per-layer power iterations; here λ1 is the top "
        "eigenvalue of the full Hessian. Their setting is fine-tuning pretrained ResNets; "
        "this study trains small networks from scratch on CPU-sized data, so it checks the "
        "direction and rough size of the effect, not the paper's exact numbers."), Paragraph(
        "Reading the numbers: the Hessian of the cross-entropy shrinks as the training loss "
        "goes to zero (the softmax saturates), so a run that fits the training set harder "
        "also looks flatter, and an under-trained run (few epochs, or too much noise) can "
        "look flat without being better. Read trace and λ1 together with 'train loss at W' "
        "(the clean loss on the analysis subset, eval mode) and test accuracy in the tables "
        "above. (The training loop's own train loss, in results.csv, comes from each step's "
        "first pass, which for NSO is at W + U, so it overstates NSO's clean training loss.)"))
    index = page.write(out)
    return StudyResult(index, summary, comparison)
