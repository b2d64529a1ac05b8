"""flatlab.study: budget matching, aggregation math, run keys, and the whole pipeline on a
tiny synthetic setting (sweep on a validation split -> final runs -> analysis -> report ->
resume)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flatlab.errors import FlatlabError
from flatlab.study import plan, scratch
from flatlab.study.pipeline import run_study
from flatlab.study.report import SUMMARY_CSV
from flatlab.study.runner import RESULTS_CSV, planned_rows
from flatlab.study.statistics import compare, scorecard, select_hyperparameters, summarize

METHODS = scratch.METHODS


# --------------------------------------------------------------------------- budgets


def test_passes_per_step_come_from_the_library():
    counts = {m.label: plan.passes_per_step(m.optimizer, m.num_perturbs) for m in METHODS}
    assert counts == {"sgd": 1, "sam": 2, "asam": 2, "rwp": 2, "nso k=1": 2, "nso k=2": 4}


@pytest.mark.parametrize("epochs", [2, 4, 60])
def test_budget_matching_gives_equal_gradient_evaluations(epochs):
    variants = plan.plan_variants(METHODS, epochs)
    by_name = {v.name: v for v in variants}
    assert sorted(by_name) == sorted(["sgd", "sgd (2E)", "sam", "asam", "rwp", "nso k=1",
                                      "nso k=2", "nso k=2 (E/2)"])
    matched = [v for v in variants if plan.SAME_GRADS in v.budgets]
    same_epochs = [v for v in variants if plan.SAME_EPOCHS in v.budgets]
    # every method once per comparison
    assert sorted(v.method.label for v in matched) == sorted(m.label for m in METHODS)
    assert sorted(v.method.label for v in same_epochs) == sorted(m.label for m in METHODS)
    assert {v.passes_per_example for v in matched} == {2 * epochs}
    assert {v.epochs for v in same_epochs} == {epochs}
    assert by_name["sgd (2E)"].epochs == 2 * epochs
    assert by_name["nso k=2 (E/2)"].epochs == epochs // 2
    assert by_name["nso k=2"].passes_per_example == 4 * epochs


def test_budget_that_cannot_be_matched_is_an_error():
    with pytest.raises(FlatlabError, match="cannot match"):
        plan.plan_variants(METHODS, 3)  # NSO k=2 would need 1.5 epochs
    assert plan.matched_epochs(3, 1, 2) == 6
    assert plan.matched_epochs(6, 4, 2) == 3


# --------------------------------------------------------------------------- aggregation


def _rows(values: dict[tuple[str, str], list[tuple[float, float, float]]]) -> pd.DataFrame:
    """Final-run rows: (setting, variant) -> per seed (test_acc, trace, lambda_1)."""
    info = {"sgd": ("sgd", True, "same epochs"),
            "sam": ("sam", True, "same epochs;same gradient evaluations"),
            "rwp": ("rwp", True, "same epochs;same gradient evaluations"),
            "nso k=1": ("nso", False, "same epochs;same gradient evaluations")}
    rows = []
    for (setting, variant), seeds in values.items():
        optimizer, baseline, budgets = info[variant]
        for seed, (acc, tr, lam) in enumerate(seeds):
            rows.append({"key": f"{setting}{variant}{seed}", "phase": "final", "status": "ok",
                         "setting": setting, "variant": variant, "method": variant,
                         "optimizer": optimizer, "baseline": baseline, "budgets": budgets,
                         "hyperparameter": None, "hyper_value": None, "epochs": 4,
                         "passes_per_step": 1 if optimizer == "sgd" else 2, "seed": seed,
                         "grad_evals": 10, "test_acc": acc, "trace": tr, "lambda_1": lam,
                         "train_loss": 0.1, "analysis_loss": 0.1, "trace_stderr": 0.5,
                         "lambda_1_converged": True})
    return pd.DataFrame(rows)


def test_summary_mean_and_sample_std():
    rows = _rows({("a", "sgd"): [(0.80, 10.0, 2.0), (0.82, 14.0, 3.0), (0.84, 12.0, 4.0)],
                  ("a", "nso k=1"): [(0.90, 7.0, 1.0), (0.86, 9.0, 1.5)]})
    rows.loc[len(rows)] = dict(rows.iloc[0], key="x", status="diverged: nan", test_acc=0.0)
    summary = summarize(rows).set_index("variant")
    assert summary.loc["sgd", "n"] == 3 and summary.loc["nso k=1", "n"] == 2  # diverged left out
    assert summary.loc["sgd", "test_acc_mean"] == pytest.approx(0.82, abs=1e-12)
    assert summary.loc["sgd", "test_acc_std"] == pytest.approx(0.02, abs=1e-12)
    assert summary.loc["sgd", "trace_std"] == pytest.approx(2.0, abs=1e-12)
    assert summary.loc["nso k=1", "trace_mean"] == pytest.approx(8.0, abs=1e-12)
    assert summary.loc["nso k=1", "lambda_1_std"] == pytest.approx(np.std([1.0, 1.5], ddof=1))


def test_comparison_against_the_best_baseline_per_quantity():
    rows = _rows({
        # sam: best accuracy; rwp: lowest trace; sgd: lowest lambda_1 (same-epochs group only)
        ("a", "sgd"): [(0.70, 30.0, 1.0), (0.72, 34.0, 1.2)],
        ("a", "sam"): [(0.80, 20.0, 3.0), (0.84, 24.0, 3.4)],
        ("a", "rwp"): [(0.78, 10.0, 2.0), (0.76, 14.0, 2.4)],
        ("a", "nso k=1"): [(0.85, 9.0, 2.1), (0.83, 9.0, 1.9)],
        ("b", "sgd"): [(0.5, 4.0, 1.0), (0.5, 4.0, 1.0)],
        ("b", "sam"): [(0.6, 5.0, 2.0), (0.6, 5.0, 2.0)],
        ("b", "rwp"): [(0.6, 6.0, 2.0), (0.6, 6.0, 2.0)],
        ("b", "nso k=1"): [(0.7, 2.0, 3.0), (0.7, 2.0, 3.0)],
    })
    comparison = compare(summarize(rows), rows)
    key = ["setting", "budget", "nso", "quantity"]
    c = comparison.set_index(key)
    epochs = c.loc[("a", "same epochs", "nso k=1")]
    assert epochs.loc["test_acc", "best_baseline"] == "sam"
    assert epochs.loc["test_acc", "change"] == pytest.approx(100 * (0.84 - 0.82))  # points
    assert epochs.loc["trace", "best_baseline"] == "rwp"
    assert epochs.loc["trace", "change"] == pytest.approx((9.0 - 12.0) / 12.0)
    assert epochs.loc["lambda_1", "best_baseline"] == "sgd"
    assert epochs.loc["lambda_1", "change"] == pytest.approx((2.0 - 1.1) / 1.1)
    assert epochs.loc["trace", "change_vs_sam"] == pytest.approx((9.0 - 22.0) / 22.0)
    # paired by seed: d = (9 - 10, 9 - 14) = (-1, -5), mean -3, sd sqrt(8), se 2: t = -1.5 with
    # 1 degree of freedom (Student t with 1 df is Cauchy: p = 1 - 2 atan(1.5) / pi)
    trace = epochs.loc["trace"]
    assert trace["test"] == "paired" and trace["df"] == 1
    assert trace["t"] == pytest.approx(-3.0 / math.sqrt(8.0 / 2), rel=1e-12)
    assert trace["p"] == pytest.approx(1 - 2 * math.atan(1.5) / math.pi, rel=1e-9)
    assert trace["ci_high"] - trace["diff"] == pytest.approx(12.706204736 * 2.0, rel=1e-8)
    # sgd is not in the same-gradient-evaluations group: sam now has the lowest lambda_1
    grads = c.loc[("a", "same gradient evaluations", "nso k=1")]
    assert grads.loc["lambda_1", "best_baseline"] == "rwp"
    assert grads.loc["lambda_1", "change"] == pytest.approx((2.0 - 2.2) / 2.2)
    # zero spread on both sides: no t
    assert math.isnan(c.loc[("b", "same epochs", "nso k=1", "trace"), "t"])
    # mean over settings of the per-setting changes
    mean = c.loc[("mean over 2 settings", "same epochs", "nso k=1", "trace")]
    assert mean["change"] == pytest.approx(((9 - 12) / 12 + (2 - 4) / 4) / 2)
    assert mean["change_vs_sam"] == pytest.approx(((9 - 22) / 22 + (2 - 5) / 5) / 2)

    card = scorecard(comparison).set_index(["budget", "NSO", "quantity"])
    epochs = card.loc[("same epochs", "nso k=1")]
    # lower mean trace in both settings, but significant in neither (p = 0.37 in a, no spread
    # of the differences in b): the scorecard counts only significant differences
    assert epochs.loc["trace", "better than best baseline"] == "0 of 2"
    assert epochs.loc["trace", "worse than best baseline"] == "0 of 2"
    assert epochs.loc["λ1", "better than best baseline"] == "0 of 2"
    # vs SAM in a: d = (-0.9, -1.5), t = -4 with 1 df, p = 1 - 2 atan(4) / pi = 0.16
    assert c.loc[("a", "same epochs", "nso k=1", "lambda_1"), "vs_sam_t"] == pytest.approx(-4.0)
    assert epochs.loc["λ1", "better than SAM"] == "0 of 2"
    assert epochs.loc["test acc", "better than SAM"] == "0 of 2"


def test_sweep_selection_takes_best_validation_accuracy_then_lower_loss():
    rows = pd.DataFrame([
        {"phase": "sweep", "status": "ok", "setting": "s", "optimizer": "sam",
         "hyperparameter": "rho", "hyper_value": v, "epochs": 2, "test_acc": a, "test_loss": l}
        for v, a, l in [(0.02, 0.7, 0.9), (0.05, 0.8, 0.6), (0.1, 0.8, 0.5)]]
        + [{"phase": "sweep", "status": "diverged: nan", "setting": "s", "optimizer": "nso",
            "hyperparameter": "sigma", "hyper_value": 0.5, "epochs": 2, "test_acc": 0.99,
            "test_loss": 0.0},
           {"phase": "sweep", "status": "ok", "setting": "s", "optimizer": "nso",
            "hyperparameter": "sigma", "hyper_value": 0.01, "epochs": 2, "test_acc": 0.5,
            "test_loss": 1.0}])
    chosen, table = select_hyperparameters(rows)
    assert chosen == {("s", "sam"): {"rho": 0.1}, ("s", "nso"): {"sigma": 0.01}}
    assert table["chosen"].sum() == 2


# --------------------------------------------------------------------------- end to end


def _hessian_available() -> bool:
    try:
        from flatlab import hessian
    except ImportError:
        return False
    return all(hasattr(hessian, n) for n in ("HessianOperator", "trace", "top_eigenvalues"))


def tiny_study():
    methods = tuple(m for m in METHODS if m.label in ("sgd", "sam", "nso k=1", "nso k=2"))
    setting = plan.Setting("synthetic-mlp", "synthetic", "mlp", epochs=2,
                            dataset_kwargs={"train_size": 80, "test_size": 40,
                                            "input_shape": [6], "num_classes": 3},
                            model_kwargs={"hidden": [8]})
    return plan.StudyConfig(settings=(setting,), seeds=(0, 1), methods=methods,
                             sweep={"sam": ("rho", (0.05,)), "nso": ("sigma", (0.01, 0.05))},
                             batch_size=32, samples=24, trace_matvecs=6, landscape=())


@pytest.mark.skipif(not _hessian_available(), reason="flatlab.hessian not available yet")
def test_tiny_study_end_to_end_and_resume(tmp_path):
    from flatlab.checkpoint import read_checkpoint

    config = tiny_study()
    out, runs_dir = tmp_path / "report", tmp_path / "runs"
    messages: list[str] = []
    result = run_study(config, out, runs_dir, title="TEST", command="TEST-COMMAND",
                       say=messages.append)
    rows = pd.read_csv(out / RESULTS_CSV)
    assert (rows["status"] == "ok").all()

    sweep = rows[rows["phase"] == "sweep"]
    assert sorted(zip(sweep["optimizer"], sweep["hyper_value"], strict=True)) == [
        ("nso", 0.01), ("nso", 0.05), ("sam", 0.05)]
    assert (sweep["eval_split"] == "validation").all()
    for run_name in sweep["run_name"]:  # trained and scored on the split held out of train
        meta = read_checkpoint(runs_dir / run_name / "model.safetensors")[1]
        assert meta["dataset"]["kwargs"]["validation_fraction"] == 0.2
    best_nso = sweep[sweep["optimizer"] == "nso"].sort_values(
        ["test_acc", "test_loss"], ascending=[False, True]).iloc[0]["hyper_value"]

    final = rows[rows["phase"] == "final"]
    assert len(final) == 6 * 2  # sgd, sgd (2E), sam, nso k=1, nso k=2, nso k=2 (E/2); 2 seeds
    assert set(final.loc[final["optimizer"] == "nso", "hyper_value"]) == {best_nso}
    steps_per_epoch = math.ceil(80 / 32)
    evals = final.groupby("variant")["grad_evals"].agg(["min", "max"])
    assert (evals["min"] == evals["max"]).all()  # same across seeds
    matched = final[final["budgets"].str.contains(plan.SAME_GRADS)]
    assert set(matched["grad_evals"]) == {2 * 2 * steps_per_epoch}  # measured, not planned
    assert evals.loc["sgd", "min"] == 2 * steps_per_epoch
    assert evals.loc["nso k=2", "min"] == 4 * 2 * steps_per_epoch
    assert final["trace"].notna().all() and final["lambda_1"].notna().all()

    # summary.csv is the aggregate of results.csv
    summary = pd.read_csv(out / SUMMARY_CSV).set_index("variant")
    for variant, group in final.groupby("variant"):
        for q in ("test_acc", "trace", "lambda_1"):
            assert summary.loc[variant, f"{q}_mean"] == pytest.approx(group[q].mean(), rel=1e-6)
            assert summary.loc[variant, f"{q}_std"] == pytest.approx(group[q].std(ddof=1),
                                                                     rel=1e-6, abs=1e-9)
    assert len(result.comparison) == 3 * 4  # 2 NSO variants per group x 2 groups x 3 quantities

    report = (out / "report.md").read_text()
    assert report.splitlines()[0].startswith("# ") and "TEST-COMMAND" in report[:300]
    assert "TEST-COMMAND" in (out / "index.html").read_text()
    assert (out / "figures" / "synthetic-mlp.png").stat().st_size > 0
    assert (out / "synthetic-mlp" / "index.html").is_file()
    record = json.loads(next((out / "analysis").glob("*.json")).read_text())
    assert record["entry"]["trace"] is not None and record["metrics"]

    # resumable: a second invocation trains nothing and keeps every row
    before = (out / RESULTS_CSV).read_text()
    messages.clear()
    run_study(config, out, runs_dir, title="TEST", command="TEST-COMMAND",
                       say=messages.append)
    assert not any(m.startswith("[") for m in messages), messages
    assert (out / RESULTS_CSV).read_text() == before


def test_run_keys_ignore_later_fields_at_their_neutral_values(monkeypatch):
    full = scratch.full_config()
    run = plan.sweep_runs(full)[0]
    assert run.config["precision"] == "fp32" and run.config["independent_noise"] is False
    older = dict(run.config)
    del older["precision"], older["independent_noise"]  # a config from before those fields
    key = plan.RunSpec(**{**run.__dict__, "config": older}).key
    assert key == run.key
    bf16 = plan.RunSpec(**{**run.__dict__, "config": dict(run.config, precision="bf16")})
    assert bf16.key != run.key  # a value that changes the numbers changes the key
    # a new noise stream for the same seed (NOISE_STREAM_VERSION bumped) re-keys the noise runs
    nso = next(r for r in plan.sweep_runs(full) if r.variant.method.optimizer == "nso")
    before = nso.key
    monkeypatch.setattr(plan, "NOISE_STREAM_VERSION", plan.NOISE_STREAM_VERSION + 1)
    assert nso.key != before and run.key == key


def test_scratch_plan_keys_are_the_committed_results():
    """Every run of the scratch plan is in the committed results, key for key: regenerating
    the report reuses every one of them (nothing is re-run). Rows of runs the plan no longer
    has (NSO/RWP before the noise seed was salted, NOISE_STREAM_VERSION 1; the old σ grid) stay
    in results.csv but are left out of the report."""
    repo = Path(__file__).resolve().parents[1]
    rows = pd.read_csv(repo / scratch.DEFAULT_OUT / RESULTS_CSV, dtype={"key": str})
    study = scratch.full_config()
    sweep = plan.sweep_runs(study)
    assert {r.key for r in sweep} <= set(rows.loc[rows["phase"] == "sweep", "key"])
    chosen, _ = select_hyperparameters(planned_rows(rows, sweep))
    final = plan.final_runs(study, chosen)
    assert {r.key for r in final} <= set(rows.loc[rows["phase"] == "final", "key"])
    noisy = [r for r in (*sweep, *final) if r.config["optimizer"] in ("nso", "rwp")]
    assert noisy and all(plan.key_config(r.config)["noise_stream"] == 2 for r in noisy)


def test_planned_rows_follow_the_plan_and_drop_stale_runs():
    from types import SimpleNamespace

    rows = pd.DataFrame({"key": ["c", "stale", "a", "b"], "value": [3, 0, 1, 2]})
    runs = [SimpleNamespace(key=k) for k in ("a", "b", "c", "not-run-yet")]
    picked = planned_rows(rows, runs)
    assert picked["key"].tolist() == ["a", "b", "c"] and picked["value"].tolist() == [1, 2, 3]


def test_a_tie_for_best_baseline_goes_to_the_first_however_the_mean_was_summed():
    # the same accuracies in another order: (0.1 + 0.2) + 0.3 != (0.3 + 0.2) + 0.1 in floats
    rows = _rows({("c", "sgd"): [(0.0, 5.0, 1.0)] * 3,
                  ("c", "sam"): [(0.3, 5.0, 1.0), (0.2, 5.0, 1.0), (0.1, 5.0, 1.0)],
                  ("c", "rwp"): [(0.1, 5.0, 1.0), (0.2, 5.0, 1.0), (0.3, 5.0, 1.0)],
                  ("c", "nso k=1"): [(0.2, 4.0, 1.0)] * 3})
    summary = summarize(rows).set_index("variant")
    assert summary.loc["rwp", "test_acc_mean"] > summary.loc["sam", "test_acc_mean"]
    comparison = compare(summarize(rows), rows).set_index(["budget", "quantity"])
    assert comparison.loc[("same epochs", "test_acc"), "best_baseline"] == "sam"
