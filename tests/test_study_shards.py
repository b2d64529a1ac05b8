"""flatlab.study shards: ``--shard I/N`` partitions any plan by run key (disjoint, complete),
a shard runs only its runs, and a plain invocation aggregates the shards without re-running.
Training is replaced by a fake ``execute`` (no real runs)."""

from __future__ import annotations

import zlib

import pandas as pd
import pytest

from flatlab.errors import FlatlabError
from flatlab.study import pipeline, plan, runner, scratch
from flatlab.study.plan import Shard


def test_shard_parse():
    assert Shard.parse("2/4") == Shard(2, 4) and str(Shard.parse(" 1 / 1 ")) == "1/1"
    for bad in ("0/3", "4/3", "a/b", "3", "1/0", "-1/2"):
        with pytest.raises(FlatlabError, match="--shard"):
            Shard.parse(bad)


@pytest.mark.parametrize("count", [1, 2, 3, 7])
def test_shards_partition_the_plan(count):
    study = scratch.full_config()
    runs = plan.sweep_runs(study) + plan.final_runs(study, {})
    keys = [run.key for run in runs]
    assert len(set(keys)) == len(keys) == 108 + 81  # sweep + final runs of the plan
    parts = [{run.key for run in Shard(i, count).select(runs)} for i in range(1, count + 1)]
    assert sum(len(p) for p in parts) == len(keys)          # disjoint ...
    assert set().union(*parts) == set(keys)                  # ... and complete
    # a shard's part depends on the key alone, not on the order or subset of the plan
    assert {r.key for r in Shard(1, count).select(runs[::-1][:40])} <= parts[0]
    if count > 1:
        assert all(parts)  # 189 random keys leave no shard empty


def tiny_study() -> plan.StudyConfig:
    methods = tuple(m for m in scratch.METHODS if m.label in ("sgd", "sam", "nso k=1"))
    setting = plan.Setting("synthetic-mlp", "synthetic", "mlp", epochs=2,
                           dataset_kwargs={"train_size": 80, "test_size": 40,
                                           "input_shape": [6], "num_classes": 3})
    return plan.StudyConfig(settings=(setting,), seeds=(0, 1, 2), methods=methods,
                            sweep={"sam": ("rho", (0.05, 0.1)), "nso": ("sigma", (0.01, 0.05))},
                            batch_size=32, samples=24, trace_matvecs=6, landscape=())


@pytest.fixture
def fake_execute(monkeypatch):
    """Replace training and analysis by numbers derived from the run key; record the calls."""
    calls: list[str] = []

    def execute(run, runs_dir, out):
        calls.append(run.key)
        u = zlib.crc32(run.key.encode()) / 2**32
        row = runner.row_header(run)
        row.update(status="ok", steps=6, grad_evals=6 * run.variant.passes, train_loss=0.1,
                   train_acc=0.9, test_loss=1.0 - u, test_acc=0.5 + u / 2, train_seconds=0.0)
        if run.analysis is not None:
            row.update(trace=10 + u, trace_stderr=0.1, lambda_1=1 + u, analysis_loss=0.1,
                       lambda_1_converged=True, analysis_seconds=0.0)
        return row

    monkeypatch.setattr(runner, "execute", execute)
    return calls


def test_a_shard_runs_only_its_runs_and_a_plain_run_aggregates(tmp_path, fake_execute):
    study = tiny_study()
    runs = plan.sweep_runs(study)
    out, runs_dir = tmp_path / "out", tmp_path / "runs"
    one, two = Shard(1, 2), Shard(2, 2)
    runner.run_all(runs, out, runs_dir, shard=one, say=lambda _: None)
    assert sorted(fake_execute) == sorted(r.key for r in one.select(runs))
    assert not (out / runner.RESULTS_CSV).exists()          # shards write only their own file
    assert len(pd.read_csv(runner.shard_csv(out, one))) == len(one.select(runs))
    fake_execute.clear()
    runner.run_all(runs, out, runs_dir, shard=one, say=lambda _: None)
    assert fake_execute == []                               # resumable per shard
    rows = runner.run_all(runs, out, runs_dir, shard=two, say=lambda _: None)
    assert sorted(fake_execute) == sorted(r.key for r in two.select(runs))
    assert sorted(rows["key"]) == sorted(r.key for r in runs)  # every shard's rows
    fake_execute.clear()
    rows = runner.run_all(runs, out, runs_dir, say=lambda _: None)
    assert fake_execute == []                               # aggregated, nothing re-run
    saved = pd.read_csv(out / runner.RESULTS_CSV, dtype={"key": str})
    assert sorted(saved["key"]) == sorted(rows["key"]) == sorted(r.key for r in runs)


def test_sharded_study_waits_for_the_whole_sweep_then_aggregates(tmp_path, fake_execute):
    study = tiny_study()
    out, runs_dir = tmp_path / "out", tmp_path / "runs"
    messages: list[str] = []

    def run(shard):
        return pipeline.run_study(study, out, runs_dir, title="T", command="C", shard=shard,
                                  say=messages.append)

    sweep = plan.sweep_runs(study)
    assert run(Shard(1, 2)) is None
    assert sorted(fake_execute) == sorted(r.key for r in Shard(1, 2).select(sweep))
    assert "not finished yet" in messages[-1]               # no final runs before the sweep
    assert run(Shard(2, 2)) is None                          # completes the sweep: its finals
    assert run(Shard(1, 2)) is None                          # now shard 1's finals
    assert not (out / "index.html").exists()                 # shards write no report
    ran = len(fake_execute)
    fake_execute.clear()
    result = run(None)
    assert fake_execute == []                                # every run came from the shards
    rows = pd.read_csv(out / runner.RESULTS_CSV, dtype={"key": str})
    finals = rows[rows["phase"] == "final"]
    assert len(rows) == ran == len(sweep) + len(finals) and len(finals) == 4 * 3
    assert len(set(rows["key"])) == len(rows)                # no run twice
    assert (out / "index.html").is_file() and len(result.summary) == 4


def test_an_arm_with_its_own_sweep_takes_its_own_choice(tmp_path, fake_execute):
    """A filter-noise NSO arm: swept separately from NSO (absolute), its runs train with
    noise="filter", and its final runs use its own chosen sigma."""
    base = tiny_study()
    arm = plan.Method("nso-filter k=1", "nso", 1, baseline=False, sweep="nso-filter",
                      train_args={"noise": "filter"})
    study = plan.StudyConfig(**{**base.__dict__, "methods": base.methods + (arm,),
                                "sweep": {**base.sweep, "nso-filter": ("sigma", (0.02, 0.2))}})
    sweep = plan.sweep_runs(study)
    filtered = [r for r in sweep if r.variant.method is arm]
    assert [r.hyper for r in filtered] == [{"sigma": 0.02}, {"sigma": 0.2}]
    assert {r.config["noise"] for r in filtered} == {"filter"}
    assert {r.config["noise"] for r in sweep if r.variant.method.label == "nso k=1"} == {None}
    result = pipeline.run_study(study, tmp_path / "out", tmp_path / "runs", title="T",
                                command="C", say=lambda _: None)
    rows = pd.read_csv(tmp_path / "out" / runner.RESULTS_CSV)
    assert set(rows.loc[rows["method"] == arm.label, "noise"]) == {"filter"}
    assert set(rows.loc[rows["method"] == "nso k=1", "noise"]) == {"absolute"}
    chosen = result.summary.set_index("variant")["hyperparameter"]
    swept = rows[(rows["phase"] == "sweep") & (rows["sweep"] == "nso-filter")]
    best = swept.sort_values(["test_acc", "test_loss"], ascending=[False, True]).iloc[0]
    assert chosen[arm.label] == f"sigma={best['hyper_value']:g} (filter)"
    assert chosen["nso k=1"].endswith("(absolute)")


def test_runs_start_longest_first_and_rows_keep_the_plan(tmp_path, fake_execute):
    study = tiny_study()
    runs = plan.final_runs(study, {})  # sgd 1 pass, sam and nso 2, at E and matched epochs
    rows = runner.run_all(runs, tmp_path / "out", tmp_path / "runs", say=lambda _: None)
    cost = {run.key: run.variant.epochs * run.variant.passes for run in runs}
    started = [cost[key] for key in fake_execute]
    assert started == sorted(started, reverse=True) and len(set(started)) > 1
    # equal costs keep their plan order (a stable sort), and the report reads rows in plan order
    plan_order = [run.key for run in runs]
    for c in set(started):
        same = [key for key in fake_execute if cost[key] == c]
        assert same == [key for key in plan_order if cost[key] == c]
    assert runner.planned_rows(rows, runs)["key"].tolist() == plan_order
