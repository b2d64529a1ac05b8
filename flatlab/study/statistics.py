"""Study statistics: hyperparameter selection, per-method summaries, and NSO against the
baselines with paired t tests.

Seeds are shared across methods (seed s fixes the initial weights and the data order of every
method's run s), so two methods are compared **paired by seed**: with differences
``d_s = a_s - b_s`` over the ``n`` shared seeds,

    mean d,  se = sd(d) / sqrt(n)   (sd with ddof = 1),  t = mean d / se,  df = n - 1,
    p = 2 P(T_df > |t|),            95% CI = mean d ± t_{0.975, df} se.

Where the seeds are not shared (one side lost a run), Welch's unpaired test is used instead:
``se² = s_a²/n_a + s_b²/n_b`` and Welch–Satterthwaite
``df = se⁴ / ((s_a²/n_a)² / (n_a - 1) + (s_b²/n_b)² / (n_b - 1))``. With n = 3 seeds the
paired test has 2 degrees of freedom and t_{0.975, 2} = 4.303: a difference needs |t| > 4.3,
not 2, to be significant at 5%.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from flatlab.study.plan import BUDGETS, DEFAULT_NOISE

QUANTITIES = ("test_acc", "trace", "lambda_1")
# every quantity a study compares (the transfer study's too): which direction is better
HIGHER_IS_BETTER = {"test_acc": True, "trace": False, "lambda_1": False,
                    "test_acc_best": True, "test_acc_last": True, "lambda1": False,
                    "trace_paper": False, "lambda_paper": False, "norm_trace": False}
ALPHA = 0.05


@dataclass(frozen=True)
class Difference:
    """``a - b`` with its t test: mean difference, standard error, t, df, p and the CI."""

    test: str                   # "paired" | "welch"
    n: int                      # pairs (paired) or the smaller sample (welch)
    mean: float
    se: float
    df: float
    t: float
    p: float
    ci_low: float
    ci_high: float

    def significant(self, alpha: float = ALPHA) -> bool:
        return bool(self.p < alpha)


_UNDEFINED = Difference("none", 0, math.nan, math.nan, math.nan, math.nan, math.nan, math.nan,
                        math.nan)


def _difference(test: str, n: int, mean: float, se: float, df: float,
                confidence: float) -> Difference:
    if not (math.isfinite(se) and se > 0 and df > 0):
        return Difference(test, n, mean, se, df, math.nan, math.nan, math.nan, math.nan)
    t = mean / se
    half = float(stats.t.ppf(0.5 + confidence / 2, df)) * se
    return Difference(test, n, mean, se, df, t, float(2 * stats.t.sf(abs(t), df)),
                      mean - half, mean + half)


def paired_difference(a: np.ndarray, b: np.ndarray, confidence: float = 0.95) -> Difference:
    """Paired t test of ``mean(a - b)`` (``a[i]`` and ``b[i]`` share a seed).

    >>> d = paired_difference(np.array([2.0, 4.0, 9.0]), np.array([1.0, 2.0, 3.0]))
    >>> round(d.mean, 6), round(d.se ** 2, 6), d.df       # d = 1, 2, 6: var 7, se² = 7/3
    (3.0, 2.333333, 2)
    >>> round(d.ci_high - d.mean, 4)                      # 4.3027 x sqrt(7/3)
    6.5724
    """
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    n = len(d)
    if n < 2:
        return Difference("paired", n, float(d.mean()) if n else math.nan, math.nan, math.nan,
                          math.nan, math.nan, math.nan, math.nan)
    return _difference("paired", n, float(d.mean()), float(d.std(ddof=1) / math.sqrt(n)), n - 1,
                       confidence)


def welch_difference(a: np.ndarray, b: np.ndarray, confidence: float = 0.95) -> Difference:
    """Welch's unpaired t test of ``mean(a) - mean(b)`` (Welch–Satterthwaite df)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if min(len(a), len(b)) < 2:
        return _UNDEFINED
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se2 = va + vb
    df = se2 ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1)) if se2 > 0 else math.nan
    return _difference("welch", min(len(a), len(b)), float(a.mean() - b.mean()),
                       math.sqrt(se2), float(df), confidence)


def seed_difference(a: Mapping[int, float], b: Mapping[int, float],
                    confidence: float = 0.95) -> Difference:
    """``a - b`` from per-seed values: paired over the seeds both have when they have the same
    seeds, else Welch."""
    if set(a) == set(b):
        seeds = sorted(a)
        return paired_difference(np.array([a[s] for s in seeds]),
                                 np.array([b[s] for s in seeds]), confidence)
    return welch_difference(np.array(list(a.values())), np.array(list(b.values())), confidence)


# --------------------------------------------------------------------------- selection, summary


def select_hyperparameters(rows: pd.DataFrame) -> tuple[dict[tuple[str, str], dict],
                                                         pd.DataFrame]:
    """Per setting and sweep, the value with the highest validation accuracy averaged over the
    sweep seeds (ties: lower mean validation loss, then the smaller value). Returns the choices
    and the sweep table (one row per value; ``seeds``: how many runs the means average)."""
    sweep = rows[(rows["phase"] == "sweep") & (rows["status"] == "ok")].copy()
    if "sweep" not in sweep:  # rows from before sweeps were named: the optimizer's sweep
        sweep["sweep"] = sweep["optimizer"]
    sweep["sweep"] = sweep["sweep"].fillna(sweep["optimizer"])
    for column in ("test_acc", "test_loss", "hyper_value"):
        sweep[column] = pd.to_numeric(sweep[column], errors="coerce")
    table = (sweep.groupby(["setting", "sweep", "hyperparameter", "hyper_value", "epochs"],
                           sort=False)
             .agg(val_acc=("test_acc", "mean"), val_loss=("test_loss", "mean"),
                  seeds=("test_acc", "size")).reset_index())
    chosen: dict[tuple[str, str], dict] = {}
    table["chosen"] = False
    for (setting, name), group in table.groupby(["setting", "sweep"], sort=False):
        best = group.sort_values(["val_acc", "val_loss", "hyper_value"],
                                 ascending=[False, True, True]).iloc[0]
        chosen[(setting, name)] = {str(best["hyperparameter"]): float(best["hyper_value"])}
        table.loc[best.name, "chosen"] = True
    table = table[["setting", "sweep", "hyperparameter", "hyper_value", "epochs", "val_acc",
                   "val_loss", "seeds", "chosen"]].rename(columns={"sweep": "optimizer"})
    return chosen, table.reset_index(drop=True)


def summarize(rows: pd.DataFrame, quantities: Sequence[str] = (
        *QUANTITIES, "train_loss", "analysis_loss", "trace_stderr")) -> pd.DataFrame:
    """One row per (setting, variant) of the final runs: n, mean and sample std (ddof=1) over
    seeds of each of ``quantities`` (default: test accuracy, trace, top eigenvalue, losses);
    budgets and hyperparameters."""
    final = rows[(rows["phase"] == "final") & (rows["status"] == "ok")]
    out = []
    for (setting, variant), group in final.groupby(["setting", "variant"], sort=False):
        first = group.iloc[0]
        row = {"setting": setting, "variant": variant, "method": first["method"],
               "optimizer": first["optimizer"], "baseline": bool(first["baseline"]),
               "budgets": first["budgets"], "hyperparameter": hyper_text(first),
               "epochs": int(first["epochs"]), "passes_per_step": int(first["passes_per_step"]),
               "grad_evals": float(group["grad_evals"].mean()), "n": len(group),
               "seeds": " ".join(str(int(s)) for s in sorted(group["seed"]))}
        for q in quantities:
            values = pd.to_numeric(group[q], errors="coerce").to_numpy(dtype=float)
            row[f"{q}_mean"] = float(np.mean(values))
            row[f"{q}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else math.nan
        if "lambda_1_converged" in group:
            row["lambda_1_unconverged"] = int((group["lambda_1_converged"].astype(str)
                                               .str.lower() == "false").sum())
        out.append(row)
    return pd.DataFrame(out)


def hyper_text(row: Mapping) -> str:
    """``sigma=0.05 (absolute)``: a results row's swept hyperparameter, for tables."""
    arg, value = row["hyperparameter"], row["hyper_value"]
    if not isinstance(arg, str) or pd.isna(value):
        return ""
    noise = row.get("noise") if isinstance(row.get("noise"), str) else None
    noise = noise or DEFAULT_NOISE.get(row["optimizer"])
    return f"{arg}={float(value):g}" + (f" ({noise})" if noise else "")


def is_accuracy(quantity: str) -> bool:
    """Accuracies (``test_acc``, ``test_acc_best``, ...) change in percentage points."""
    return quantity.startswith("test_acc")


def change(quantity: str, value: float, reference: float) -> float:
    """NSO's change against a reference: accuracy in percentage points, the rest relative,
    ``(value - reference) / |reference|``."""
    if is_accuracy(quantity):
        return 100.0 * (value - reference)
    if reference == 0 or not math.isfinite(reference):
        return math.nan
    return (value - reference) / abs(reference)


# --------------------------------------------------------------------------- NSO vs baselines


def _per_seed(rows: pd.DataFrame, setting: str, variant: str, quantity: str) -> dict[int, float]:
    mine = rows[(rows["setting"] == setting) & (rows["variant"] == variant)]
    values = pd.to_numeric(mine[quantity], errors="coerce")
    return {int(s): float(v) for s, v in zip(mine["seed"], values, strict=True)
            if math.isfinite(v)}


def _test_columns(prefix: str, diff: Difference) -> dict:
    return {f"{prefix}test": diff.test, f"{prefix}diff": diff.mean, f"{prefix}t": diff.t,
            f"{prefix}df": diff.df, f"{prefix}p": diff.p, f"{prefix}ci_low": diff.ci_low,
            f"{prefix}ci_high": diff.ci_high}


def _best_index(means: pd.Series, higher: bool) -> Any:
    """Index of the best mean; means within a relative 1e-6 of it tie, and a tie goes to the
    first in plan order, however the means were summed and whether the runs' values were read
    back from results.csv (8 significant digits)."""
    best = means.max() if higher else means.min()
    tied = means[(means - best).abs() <= 1e-6 * max(abs(best), 1e-12)]
    return tied.index[0]


def compare(summary: pd.DataFrame, rows: pd.DataFrame,
            quantities: Sequence[str] = QUANTITIES) -> pd.DataFrame:
    """NSO variants against the best baseline (by mean; see :data:`HIGHER_IS_BETTER`) and
    against SAM, per setting and budget group, each with its paired t test over seeds (columns
    ``t, df, p, ci_low, ci_high`` of the raw difference NSO − baseline, and the same with the
    suffix ``_vs_sam``); plus the mean change over settings."""
    if summary.empty:
        return pd.DataFrame()
    final = rows[(rows["phase"] == "final") & (rows["status"] == "ok")]
    out = []
    for setting, table in summary.groupby("setting", sort=False):
        for budget in BUDGETS:
            group = table[table["budgets"].str.split(";").apply(lambda b, x=budget: x in b)]
            baselines, nsos = group[group["baseline"]], group[~group["baseline"]]
            if baselines.empty:
                continue
            sam = baselines[baselines["optimizer"] == "sam"]
            for _, nso in nsos.iterrows():
                for q in quantities:
                    best = baselines.loc[_best_index(baselines[f"{q}_mean"],
                                                     HIGHER_IS_BETTER[q])]
                    ours = _per_seed(final, setting, nso["variant"], q)
                    row = {"setting": setting, "budget": budget, "nso": nso["variant"],
                           "quantity": q, "nso_mean": nso[f"{q}_mean"],
                           "nso_std": nso[f"{q}_std"], "best_baseline": best["variant"],
                           "best_mean": best[f"{q}_mean"], "best_std": best[f"{q}_std"],
                           "change": change(q, nso[f"{q}_mean"], best[f"{q}_mean"]),
                           **_test_columns("", seed_difference(
                               ours, _per_seed(final, setting, best["variant"], q)))}
                    if len(sam):
                        reference = sam.iloc[0]
                        row.update(sam_mean=reference[f"{q}_mean"],
                                   change_vs_sam=change(q, nso[f"{q}_mean"],
                                                        reference[f"{q}_mean"]),
                                   **_test_columns("vs_sam_", seed_difference(
                                       ours, _per_seed(final, setting, reference["variant"],
                                                       q))))
                    out.append(row)
    frame = pd.DataFrame(out)
    if frame.empty or frame["setting"].nunique() < 2:
        return frame
    means = [{"setting": f"mean over {len(group)} settings", "budget": budget, "nso": nso,
              "quantity": q, "best_baseline": "per setting", "change": group["change"].mean(),
              "change_vs_sam": group["change_vs_sam"].mean()}
             for (budget, nso, q), group in frame.groupby(["budget", "nso", "quantity"],
                                                          sort=False)]
    return pd.concat([frame, pd.DataFrame(means)], ignore_index=True)


def scorecard(comparison: pd.DataFrame, alpha: float = ALPHA) -> pd.DataFrame:
    """Per budget, NSO variant and quantity: in how many settings NSO is *significantly*
    better or worse (p < alpha, paired t) than the best baseline and than SAM."""
    per_setting = comparison[~comparison["setting"].str.startswith("mean over")]
    out = []
    for (budget, nso, q), group in per_setting.groupby(["budget", "nso", "quantity"],
                                                       sort=False):
        better = 1.0 if HIGHER_IS_BETTER[q] else -1.0

        def count(prefix: str, sign: float, g: pd.DataFrame = group) -> str:
            hits = (g[f"{prefix}p"] < alpha) & (sign * g[f"{prefix}diff"] > 0)
            return f"{int(hits.sum())} of {len(g)}"

        out.append({"budget": budget, "NSO": nso, "quantity": QUANTITY_NAMES[q],
                    "better than best baseline": count("", better),
                    "worse than best baseline": count("", -better),
                    "better than SAM": count("vs_sam_", better),
                    "worse than SAM": count("vs_sam_", -better)})
    return pd.DataFrame(out)


QUANTITY_NAMES = {"test_acc": "test acc", "trace": "trace", "lambda_1": "λ1",
                  "test_acc_best": "test acc (best-val ckpt)",
                  "test_acc_last": "test acc (last epoch)", "lambda1": "λ1 (full Hessian)",
                  "trace_paper": "trace_paper (conv+head)",
                  "lambda_paper": "λ_paper (per-layer power it.)", "norm_trace": "norm trace"}
