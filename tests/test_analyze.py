"""python -m flatlab.analyze: end to end on tiny checkpoints, bad input, naming, outputs."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from flatlab import analyze as A
from flatlab import landscape
from flatlab.checkpoint import load_model, save_checkpoint
from flatlab.data import load_dataset
from flatlab.errors import run_cli
from flatlab.models import build_model

DATA_SPEC = dict(seed=0, train_size=120, test_size=40, input_shape=[6], num_classes=3)


def _hessian():
    hessian = pytest.importorskip("flatlab.hessian")
    if not all(hasattr(hessian, n) for n in ("HessianOperator", "trace", "top_eigenvalues",
                                              "spectral_density")):
        pytest.skip("flatlab.hessian not available yet")
    return hessian


def make_checkpoint(path: Path, *, seed: int, optimizer: str = "sgd",
                    hidden=(8,), data_kwargs=None) -> Path:
    """A tiny MLP checkpoint on synthetic data, with a metrics.csv beside it."""
    spec = dict(DATA_SPEC, **(data_kwargs or {}))
    dataset = load_dataset("synthetic", **spec)
    torch.manual_seed(seed)
    model = build_model("mlp", dataset.input_shape, dataset.num_classes, hidden=list(hidden))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, model, {
        "model": {"name": "mlp", "kwargs": {"hidden": list(hidden)},
                  "input_shape": list(dataset.input_shape),
                  "num_classes": dataset.num_classes},
        "dataset": dataset.spec, "optimizer": {"name": optimizer, "kwargs": {"lr": 0.1}},
        "epoch": 1, "step": 4, "grad_evals": 4 * (seed + 1), "seed": seed,
        "run_name": path.parent.name,
        "metrics": {"train_loss": 1.0 + seed, "train_acc": 0.5, "test_loss": 1.2,
                    "test_acc": 0.4 + 0.1 * seed}})
    (path.parent / "metrics.csv").write_text(
        "epoch,train_loss,train_acc,test_loss,test_acc,seconds,grad_evals,lr\n"
        "1,1.0,0.5,1.2,0.4,0.1,4,0.1\n")
    return path


@pytest.fixture()
def runs(tmp_path):
    sgd = make_checkpoint(tmp_path / "runs" / "sgd" / "model.safetensors", seed=0)
    nso = make_checkpoint(tmp_path / "runs" / "nso" / "model.safetensors", seed=1,
                          optimizer="nso")
    return sgd.parent, nso.parent


def _direct_loss(run_dir: Path, samples: int, seed: int = 0):
    """Cross-entropy and accuracy of the checkpoint on the analysis subset, computed plainly."""
    model, meta = load_model(run_dir)
    data = load_dataset("synthetic", **DATA_SPEC)
    idx = A.sample_indices(len(data.y_train), samples, seed)
    with torch.no_grad():
        out = model(data.x_train[idx])
    y = data.y_train[idx]
    return float(nn.functional.cross_entropy(out, y)), float((out.argmax(1) == y).double().mean())


def _cli(argv, capsys):
    code = run_cli(A.main, [str(a) for a in argv], prog="flatlab.analyze")
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --------------------------------------------------------------------------- end to end


def test_end_to_end_two_checkpoints_with_hessian(runs, tmp_path, capsys):
    hessian = _hessian()
    sgd, nso = runs
    out = tmp_path / "out"
    code, stdout, err = _cli([sgd, nso, "--trace", "--eigenvalues", "2", "--density",
                              "--landscape", "1d", "--samples", "50", "--batch-size", "16",
                              "--trace-matvecs", "12", "--grid-points", "5",
                              "--density-runs", "2", "--density-steps", "10",
                              "--interpolate", "sgd", "nso", "--out", out, "--no-progress"],
                             capsys)
    assert code == 0, err
    text = (out / "analysis.json").read_text()
    analysis = json.loads(text)
    assert A.dumps_json(analysis) + "\n" == text and text.count("\n") < 300  # compact lists
    for key in ("flatlab_version", "command", "samples", "seed", "mode", "checkpoints",
                "interpolation"):
        assert key in analysis
    assert analysis["samples"] == 50 and analysis["mode"] == "eval"
    assert analysis["command"].startswith("python -m flatlab.analyze ")
    assert [ck["name"] for ck in analysis["checkpoints"]] == ["sgd", "nso"]
    schema = ("name", "path", "run_dir", "model", "dataset", "optimizer", "epoch", "grad_evals",
              "seed", "metrics", "loss", "accuracy", "trace", "trace_stderr", "trace_matvecs",
              "trace_method", "trace_per_layer", "eigenvalues", "eigenvalue_residuals",
              "eigen_converged", "eigen_matvecs", "density", "landscape_1d", "landscape_2d")
    for ck, run in zip(analysis["checkpoints"], runs, strict=True):
        assert set(schema) <= set(ck)
        assert ck["run_dir"] == str(run)
        assert len(ck["eigenvalues"]) == 2 and ck["eigenvalues"][0] >= ck["eigenvalues"][1]
        assert set(ck["density"]) == {"grid", "density", "nodes", "weights"}
        assert ck["landscape_2d"] is None and len(ck["landscape_1d"]["loss"]) == 5
        loss, acc = _direct_loss(run, 50)
        assert ck["loss"] == pytest.approx(loss, rel=1e-6)
        assert ck["accuracy"] == pytest.approx(acc, abs=1e-12)
        assert ck["landscape_1d"]["loss"][2] == pytest.approx(ck["loss"], rel=1e-6)  # alpha = 0
        per_layer = sum(v["estimate"] for v in ck["trace_per_layer"].values())
        assert per_layer == pytest.approx(ck["trace"], rel=1e-6)
        for figure in ("density", "eigenvalues", "landscape_1d"):
            assert (out / "plots" / ck["name"] / f"{figure}.png").stat().st_size > 1000

        # the trace is flatlab.hessian.trace on the same subset, same seed
        model, _ = load_model(run)
        data = load_dataset("synthetic", **DATA_SPEC)
        batches = A.SubsetBatches(data.x_train, data.y_train,
                                  A.sample_indices(len(data.y_train), 50, 0), 16)
        op = hessian.HessianOperator(model, nn.CrossEntropyLoss(), batches, mode="eval")
        ref = hessian.trace(op, num_matvecs=12, method="hutch++", seed=0)
        assert op.loss_and_gradient()[0] == pytest.approx(ck["loss"], rel=1e-6)
        assert ck["trace"] == pytest.approx(float(ref.estimate), rel=1e-6)
        assert ck["trace_stderr"] == pytest.approx(float(ref.stderr), rel=1e-6)

    interp = analysis["interpolation"]
    assert interp["from"] == "sgd" and interp["to"] == "nso"
    assert interp["loss"][0] == pytest.approx(analysis["checkpoints"][0]["loss"], rel=1e-6)
    assert interp["loss"][-1] == pytest.approx(analysis["checkpoints"][1]["loss"], rel=1e-6)

    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [r["name"] for r in rows] == ["sgd", "nso"]
    assert {"optimizer", "epoch", "grad_evals", "test_acc", "train_loss", "loss", "accuracy",
            "trace", "trace_stderr", "lambda_1", "lambda_2"} <= set(rows[0])
    assert float(rows[1]["lambda_1"]) == analysis["checkpoints"][1]["eigenvalues"][0]
    assert (out / "index.html").is_file() and (out / "report.md").is_file()
    assert (out / "plots" / "interpolation.png").is_file()


def test_landscape_only_run_matches_direct_evaluation(runs, tmp_path, capsys):
    sgd, _ = runs
    out = tmp_path / "one"
    code, _, err = _cli([sgd, "--landscape", "1d", "--landscape", "2d", "--samples", "70",
                         "--batch-size", "32", "--grid-points", "3", "--out", out,
                         "--no-progress"], capsys)
    assert code == 0, err
    analysis = json.loads((out / "analysis.json").read_text())
    (ck,) = analysis["checkpoints"]
    loss, acc = _direct_loss(sgd, 70)
    assert ck["loss"] == pytest.approx(loss, rel=1e-6) and ck["accuracy"] == acc
    assert ck["trace"] is None and ck["eigenvalues"] is None and ck["density"] is None
    grid = ck["landscape_2d"]
    assert grid["alphas"] == [-1.0, 0.0, 1.0] and len(grid["loss"]) == 3
    assert grid["loss"][1][1] == pytest.approx(ck["loss"], rel=1e-6)
    # the 1-D slice is the seeded filter-normalised direction, evaluated exactly
    model, _ = load_model(sgd)
    data = load_dataset("synthetic", **DATA_SPEC)
    batches = A.SubsetBatches(data.x_train, data.y_train,
                              A.sample_indices(len(data.y_train), 70, 0), 32)
    d = landscape.random_direction(model, generator=torch.Generator().manual_seed(0))
    ref = landscape.slice_1d(model, nn.CrossEntropyLoss(), batches, d, [-1.0, 0.0, 1.0])
    assert ck["landscape_1d"]["loss"] == pytest.approx(ref["loss"].tolist(), rel=1e-12)
    assert (out / "plots" / "sgd" / "landscape_2d.png").is_file()
    assert not (out / "index.html").exists()  # one checkpoint, no --report
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert len(rows) == 1 and rows[0]["trace"] == ""


def test_same_seed_same_numbers(runs):
    sgd, _ = runs
    options = A.AnalyzeOptions(trace=False, eigenvalues=0, density=False, landscape=("1d",),
                               samples=30, grid_points=3, progress=False)
    first = A.analyze([sgd], options)
    second = A.analyze([sgd], options)
    assert first == second
    other = A.analyze([sgd], A.AnalyzeOptions(**{**options.__dict__, "seed": 1}))
    assert other.checkpoints[0].loss != first.checkpoints[0].loss


def test_hessian_stages_share_one_operator_and_threads_are_restored(runs, tmp_path,
                                                                    monkeypatch):
    hessian = _hessian()
    sgd, nso = runs
    built = []
    original = hessian.HessianOperator

    def counting(*args, **kwargs):
        built.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(hessian, "HessianOperator", counting)
    options = A.AnalyzeOptions(trace=True, eigenvalues=2, density=True, landscape=(),
                               samples=40, trace_matvecs=8, density_runs=1, density_steps=6,
                               progress=False)
    shared = A.analyze([sgd, nso], options)
    assert len(built) == 2 and built[0] is not built[1]  # one per checkpoint, not per stage
    monkeypatch.setattr(hessian, "HessianOperator", original)
    for stage in ("trace", "eigenvalues", "density"):  # each stage alone: the same numbers
        alone = A.analyze([sgd, nso], A.AnalyzeOptions(**{
            **options.__dict__, "trace": stage == "trace",
            "eigenvalues": 2 if stage == "eigenvalues" else 0, "density": stage == "density"}))
        for a, b in zip(shared.checkpoints, alone.checkpoints, strict=True):
            assert getattr(a, stage) == getattr(b, stage)

    torch.set_num_threads(2)
    try:
        A.analyze([sgd], A.AnalyzeOptions(trace=False, eigenvalues=0, density=False,
                                          landscape=(), samples=10, progress=False))
        assert torch.get_num_threads() == 2  # analyze ran on 1 thread and put 2 back
    finally:
        torch.set_num_threads(1)
    out = tmp_path / "no-figures"
    A.write_outputs(shared, out, figures=False)
    assert sorted(p.name for p in out.iterdir()) == ["analysis.json", "summary.csv"]


# --------------------------------------------------------------------------- bad input


def _bad_inputs(tmp_path, runs):
    sgd, nso = runs
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    truncated = tmp_path / "trunc" / "model.safetensors"
    truncated.parent.mkdir()
    truncated.write_bytes((sgd / "model.safetensors").read_bytes()[:-40])
    return {
        "missing file": [tmp_path / "nope.safetensors"],
        "corrupt checkpoint": [corrupt],
        "truncated checkpoint": [truncated.parent],
        "unknown flag": [sgd, "--frobnicate"],
        "samples 0": [sgd, "--samples", "0"],
        "samples word": [sgd, "--samples", "many"],
        "negative eigenvalues": [sgd, "--eigenvalues", "-1"],
        "given twice": [sgd, sgd / "model.safetensors"],
        "even grid": [sgd, "--grid-points", "4"],
        "hutch++ budget": [sgd, "--trace", "--trace-matvecs", "3"],
        "bad mode": [sgd, "--mode", "test"],
        "interpolate unknown": [sgd, nso, "--interpolate", "sgd", "adam"],
        "baseline unknown": [sgd, nso, "--baseline", "adam"],
        "second missing": [sgd, tmp_path / "gone"],
        "no checkpoint": [],
        "abbreviated flag": [sgd, "--eigen", "5"],
        "best missing": [sgd, "--checkpoint", "best"],
        "unknown checkpoint choice": [sgd, "--checkpoint", "last"],
    }


BAD_CASES = ("missing file", "corrupt checkpoint", "truncated checkpoint", "unknown flag",
             "samples 0", "samples word", "negative eigenvalues", "given twice", "even grid",
             "hutch++ budget", "bad mode", "interpolate unknown", "baseline unknown",
             "second missing", "no checkpoint", "abbreviated flag", "best missing",
             "unknown checkpoint choice")


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case, runs, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    before = b'{"previous": "analysis"}\n'
    (out / "analysis.json").write_bytes(before)
    cases = _bad_inputs(tmp_path, runs)
    assert set(cases) == set(BAD_CASES)
    argv = cases[case] + ["--out", out, "--no-progress"]
    code, stdout, err = _cli(argv, capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("flatlab.analyze") and "Traceback" not in err
    assert (out / "analysis.json").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["analysis.json"]


def test_bad_input_subprocess_has_no_traceback(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "analysis.json").write_text("{}")
    proc = subprocess.run([sys.executable, "-m", "flatlab.analyze", str(tmp_path / "missing"),
                           "--out", str(out)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "does not exist" in proc.stderr
    assert (out / "analysis.json").read_text() == "{}"


# --------------------------------------------------------------------------- pieces


def test_unique_names_disambiguate_by_parent(tmp_path):
    a = make_checkpoint(tmp_path / "x" / "nso" / "model.safetensors", seed=0)
    b = make_checkpoint(tmp_path / "y" / "nso" / "model.safetensors", seed=1)
    c = make_checkpoint(tmp_path / "y" / "sgd" / "model.safetensors", seed=2)
    loose = make_checkpoint(tmp_path / "loose" / "ckpt" / "final.safetensors", seed=3)
    (loose.parent / "metrics.csv").unlink()
    assert A.unique_names([a, b, c, loose]) == ["x/nso", "y/nso", "sgd", "final"]
    epoch = make_checkpoint(tmp_path / "y" / "sgd" / "epoch_3.safetensors", seed=4)
    assert A.unique_names([c, epoch]) == ["sgd", "sgd/epoch_3"]


def test_default_out_dir_and_overwrite_on_good_input(runs, capsys):
    sgd, nso = runs
    argv = [sgd, "--landscape", "1d", "--samples", "20", "--grid-points", "3", "--no-progress"]
    code, stdout, err = _cli(argv, capsys)
    assert code == 0, err
    target = sgd / "analysis" / "analysis.json"
    first = target.read_bytes()
    assert str(target) in stdout
    code, _, err = _cli(argv + ["--seed", "3"], capsys)  # good input replaces the old results
    assert code == 0, err
    assert target.read_bytes() != first
    loaded = A.load_checkpoints([sgd, nso], A.AnalyzeOptions())
    assert A.default_out_dir(loaded) == sgd.parent / "analysis"


def test_defaults_when_nothing_is_chosen(runs):
    sgd, _ = runs
    parser = A.build_parser()
    argv = [str(sgd)]
    opts = A.options_from_args(parser.parse_args(argv), argv)
    assert (opts.trace, opts.eigenvalues, opts.density, opts.landscape) == (True, 5, True,
                                                                             ("1d",))
    argv = [str(sgd), "--landscape", "2d", "--eigenvalues", "3"]
    opts = A.options_from_args(parser.parse_args(argv), argv)
    assert (opts.trace, opts.eigenvalues, opts.density, opts.landscape) == (False, 3, False,
                                                                             ("2d",))
    argv = [str(sgd), "--samples", "all"]
    assert A.options_from_args(parser.parse_args(argv), argv).samples is None


def test_trace_methods_match_the_hessian_module():
    hessian = _hessian()
    assert A.TRACE_METHODS == hessian.TRACE_METHODS


def test_sample_indices_are_seeded_distinct_and_clamped():
    a = A.sample_indices(100, 30, seed=0)
    assert torch.equal(a, A.sample_indices(100, 30, seed=0))
    assert not torch.equal(a, A.sample_indices(100, 30, seed=1))
    assert len(set(a.tolist())) == 30 and a.max() < 100
    assert torch.equal(A.sample_indices(100, None, seed=0), torch.arange(100))
    assert torch.equal(A.sample_indices(100, 500, seed=0), torch.arange(100))


def test_subset_batches_stream_one_batch_at_a_time():
    x, y = torch.arange(10.0)[:, None], torch.arange(10)
    batches = A.SubsetBatches(x, y, torch.tensor([1, 3, 4, 8, 9]), 2)
    got = list(batches)
    assert len(batches) == 3 and [len(b[1]) for b in got] == [2, 2, 1]
    assert torch.equal(torch.cat([b[1] for b in got]), torch.tensor([1, 3, 4, 8, 9]))
    assert list(batches)[0][1].tolist() == [1, 3]  # re-iterable


MEMORY_SCRIPT = r"""
import resource, sys
from pathlib import Path
from flatlab import analyze as A
run = Path(sys.argv[1])
def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
opts = dict(trace=False, eigenvalues=0, density=False, landscape=("1d",), grid_points=3,
            batch_size=32, progress=False)
A.analyze([run], A.AnalyzeOptions(samples=64, **opts))
small = peak_mb()
A.analyze([run], A.AnalyzeOptions(samples=None, **opts))
print(small, peak_mb() - small)
"""


def test_memory_does_not_grow_with_samples(tmp_path):
    """4000 samples through a 2048-wide layer would hold 32 MiB of activations at once; streamed
    in batches of 32 the peak must not move by more than a few MiB over a 64-sample run."""
    run = make_checkpoint(tmp_path / "wide" / "model.safetensors", seed=0, hidden=(2048,),
                          data_kwargs={"train_size": 4000, "input_shape": [16]})
    proc = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(run.parent)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    _, growth = map(float, proc.stdout.split())
    assert growth < 12, f"peak RSS grew by {growth:.1f} MiB"


def _analyze_counting_points(paths, options):
    """``analyze`` plus the number of (point, pass over the data) evaluations this rank made."""
    evaluated = [0]
    sums = landscape._Evaluator.sums

    def counting(self, coords, stacked):
        evaluated[0] += coords.shape[0] if stacked else 1
        return sums(self, coords, stacked)

    landscape._Evaluator.sums = counting
    try:
        return A.analyze(paths, options), evaluated[0]
    finally:
        landscape._Evaluator.sums = sums


def _split_trace(analysis):
    """The analysis without its trace numbers, and those numbers as one flat list."""
    numbers, checkpoints = [], []
    for ck in analysis.checkpoints:
        numbers += [ck.trace, ck.trace_stderr]
        for layer in ck.trace_per_layer.values():
            numbers += [layer.estimate, layer.stderr]
        checkpoints.append(dataclasses.replace(ck, trace=None, trace_stderr=None,
                                               trace_per_layer=None))
    return dataclasses.replace(analysis, checkpoints=checkpoints), numbers


def test_two_processes_give_the_single_process_analysis(runs):
    """Under torchrun, loss, slice and interpolation points are split across ranks and gathered
    (every rank ends with the one-process numbers, exactly); the samples are sharded for the
    Hessian, whose products are all-reduced (equal up to float32 summation order)."""
    from flatlab.distributed import spawn

    _hessian()
    options = A.AnalyzeOptions(trace=True, trace_matvecs=8, eigenvalues=0, density=False,
                               landscape=("1d",), samples=40, grid_points=5,
                               interpolate=("sgd", "nso"), progress=False)
    paths = [str(r) for r in runs]
    (two_0, points_0), (two_1, points_1) = spawn(_analyze_counting_points, 2,
                                                 args=(paths, options), timeout=240)
    one, points = _analyze_counting_points(paths, options)
    one, one_trace = _split_trace(one)
    for two in (two_0, two_1):
        two, two_trace = _split_trace(two)
        assert two == one
        assert two_trace == pytest.approx(one_trace, rel=1e-5)  # float32 sums, another order
    # 2 checkpoints x (1 loss point + 5 slice points) + 5 interpolation points, split in two
    assert points == 17 and points_0 + points_1 == points and min(points_0, points_1) >= 6


FLAG_VOCABULARY = ["--trace", "--eigenvalues", "--density", "--landscape", "--samples", "--out",
                   "--report", "--baseline", "--interpolate", "--trace-matvecs",
                   "--trace-method", "--batch-size", "--seed", "--mode", "--device",
                   "--data-dir", "--trust-pickle", "--grid-points", "--landscape-range", "--bn",
                   "--no-progress", "--bogus", "-x", "--"]
VALUE_VOCABULARY = ["0", "-1", "1", "3", "4", "all", "1d", "2d", "3d", "eval", "train", "nan",
                    "inf", "1e9", "", "hutch++", "xtrace", "stored", "recompute", "cpu", "tpu",
                    "runs/x", "é", "--samples=0", "--eigenvalues=2.5"]


def test_random_flags_never_traceback():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from flatlab.errors import FlatlabError

    parser = A.build_parser()

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.sampled_from(FLAG_VOCABULARY + VALUE_VOCABULARY), max_size=8))
    def parse(argv):
        try:
            options = A.options_from_args(parser.parse_args(["ckpt"] + argv), argv)
        except FlatlabError as err:
            assert "\n" not in str(err)
            return
        options.validate()  # whatever parses is a valid set of options

    parse()


# --------------------------------------------------------------------------- schema, CLI extras

LEGACY = Path(__file__).parent / "data" / "analysis-0.1.0.json"  # a flatlab 0.1.0 file, trimmed


def test_a_0_1_0_analysis_json_loads_and_round_trips():
    from flatlab.analysis import SCHEMA_VERSION, read_analysis

    raw = json.loads(LEGACY.read_text())
    assert "schema_version" not in raw
    analysis = read_analysis(LEGACY)
    assert analysis.schema_version == SCHEMA_VERSION == 2
    sgd = analysis.checkpoint("sgd")
    assert sgd.trace == raw["checkpoints"][0]["trace"] and sgd.method == "sgd"
    assert sgd.eigenvalues == tuple(raw["checkpoints"][0]["eigenvalues"])
    assert sgd.landscape_2d.loss[1][2] == raw["checkpoints"][0]["landscape_2d"]["loss"][1][2]
    assert sgd.metric("test_acc") == raw["checkpoints"][0]["metrics"]["test_acc"]
    assert analysis.interpolation.start == "sgd" and analysis.interpolation.end == "nso"
    # written back: the same file with the version field first, byte for byte
    assert A.dumps_json(analysis) + "\n" == A.dumps_json(
        {"schema_version": SCHEMA_VERSION, **raw}) + "\n"
    # the 0.1.0 dict-style access still answers with the JSON values
    assert analysis["checkpoints"][1]["trace_per_layer"] == raw["checkpoints"][1][
        "trace_per_layer"]
    assert analysis.get("samples") == 1000 and "mode" in analysis


def test_newer_or_foreign_analysis_files_are_refused(tmp_path):
    from flatlab.analysis import read_analysis
    from flatlab.errors import FlatlabError

    raw = json.loads(LEGACY.read_text())
    cases = {"newer.json": json.dumps({**raw, "schema_version": 99}),
             "list.json": "[1, 2]", "bad.json": "{not json",
             "entry.json": json.dumps({"checkpoints": [{"trace": 1.0}]})}  # no name
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(FlatlabError, match="newer|not a flatlab analysis|JSON"):
            read_analysis(tmp_path / name)
    with pytest.raises(FlatlabError, match="does not exist|cannot read"):
        read_analysis(tmp_path / "missing.json")


def test_results_are_frozen_and_non_finite_values_are_none():
    from flatlab.analysis import Analysis, CheckpointResult

    ck = CheckpointResult.from_json({"name": "a", "trace": float("nan"),
                                     "eigenvalues": [3.0, float("inf")],
                                     "metrics": {"test_acc": 0.5}})
    assert ck.trace is None and ck.eigenvalues == (3.0, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ck.trace = 1.0
    text = A.dumps_json(Analysis(checkpoints=[ck]))
    assert json.loads(text)["checkpoints"][0]["eigenvalues"] == [3.0, None]
    assert "trace_paper" not in text  # schema-2 extras only when computed


def test_version_flag_and_abbreviations(capsys):
    import flatlab

    with pytest.raises(SystemExit) as exit_info:
        A.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"flatlab {flatlab.__version__}"
    code, _, err = _cli(["ckpt", "--eigen", "5"], capsys)
    assert code == 2 and "--eigen" in err and len(err.strip().splitlines()) == 1


def test_stages_are_a_registry_of_functions():
    from flatlab.analysis.runner import STAGES, planned_stages

    assert all(callable(stage) for stage in STAGES.values())
    every = A.AnalyzeOptions(landscape=("2d", "1d"))
    assert planned_stages(every) == ["loss", "trace", "eigenvalues", "density", "landscape 1d",
                                     "landscape 2d"]
    none = A.AnalyzeOptions(trace=False, eigenvalues=0, density=False, landscape=())
    assert planned_stages(none) == ["loss"]


def test_best_checkpoint_of_a_run_directory(runs, tmp_path, capsys):
    sgd, _ = runs
    best = make_checkpoint(sgd / "best.safetensors", seed=5)
    argv = [sgd, "--checkpoint", "best", "--landscape", "1d", "--samples", "30",
            "--grid-points", "3", "--no-progress"]
    code, stdout, err = _cli(argv, capsys)
    assert code == 0, err
    analysis = json.loads((sgd / "analysis-best" / "analysis.json").read_text())
    (ck,) = analysis["checkpoints"]
    assert ck["name"] == "sgd/best" and ck["path"] == str(best) and ck["seed"] == 5
    model, _ = load_model(best)
    data = load_dataset("synthetic", **DATA_SPEC)
    idx = A.sample_indices(len(data.y_train), 30, 0)
    with torch.no_grad():
        loss = float(nn.functional.cross_entropy(model(data.x_train[idx]), data.y_train[idx]))
    assert ck["loss"] == pytest.approx(loss, rel=1e-6)
    assert not (sgd / "analysis").exists()  # the final checkpoint's analysis is not touched
    # a file path works too, whatever --checkpoint says
    code, _, err = _cli([best, "--landscape", "1d", "--samples", "30", "--grid-points", "3",
                         "--out", tmp_path / "file", "--no-progress"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "file" / "analysis.json").read_text())["checkpoints"][0][
        "loss"] == ck["loss"]


def _subset(run_dir: Path, samples: int, batch_size: int):
    model, _ = load_model(run_dir)
    data = load_dataset("synthetic", **DATA_SPEC)
    indices = A.sample_indices(len(data.y_train), samples, 0)
    return model, data, A.SubsetBatches(data.x_train, data.y_train, indices, batch_size)


def test_paper_metrics_are_the_hessian_paper_estimators(runs, tmp_path, capsys):
    hessian = _hessian()
    if not hasattr(hessian, "paper_top_eigenvalue"):
        pytest.skip("flatlab.hessian.paper not available yet")
    sgd, nso = runs
    options = A.AnalyzeOptions(trace=False, eigenvalues=0, density=False, landscape=(),
                               samples=48, batch_size=16, paper_metrics=True, progress=False)
    (ck,) = A.analyze([sgd], options).checkpoints
    model, _, batches = _subset(sgd, 48, 16)
    head = [n for n, p in model.named_parameters() if p.dim() == 2][-1]
    assert hessian.paper_parameters(model) == [head]  # an MLP: the head's weight alone
    op = hessian.HessianOperator(model, nn.CrossEntropyLoss(), batches,
                                 params=hessian.paper_parameters(model))
    trace = hessian.paper_trace(op, seed=0)
    assert ck.trace_paper == pytest.approx(trace.estimate, rel=1e-9)
    assert ck.trace_paper_stderr == pytest.approx(trace.stderr, rel=1e-9)
    assert ck.lambda_paper == pytest.approx(hessian.paper_top_eigenvalue(op, seed=0).estimate,
                                            rel=1e-9)
    # per batch of 24 samples: the mean over the two batches' results (the official aggregate)
    per_batch = A.analyze([sgd], A.AnalyzeOptions(**{**options.__dict__,
                                                     "paper_batch_size": 24})).checkpoints[0]
    ops = [hessian.HessianOperator(model, nn.CrossEntropyLoss(),
                                   A.SubsetBatches(batches.x, batches.y, chunk, 16),
                                   params=[head]) for chunk in batches.indices.split(24)]
    lams = [hessian.paper_top_eigenvalue(o, seed=0) for o in ops]
    assert per_batch.lambda_paper == pytest.approx(hessian.batch_mean(lams).estimate, rel=1e-9)
    traces = [hessian.paper_trace(o, seed=0).estimate for o in ops]
    assert per_batch.trace_paper == pytest.approx(sum(traces) / 2, rel=1e-9)
    assert per_batch.lambda_paper != pytest.approx(ck.lambda_paper, rel=1e-6)
    # the command line: columns in summary.csv and the report, settings in analysis.json
    out = tmp_path / "paper"
    code, _, err = _cli([sgd, nso, "--paper-metrics", "--samples", "48", "--batch-size", "16",
                         "--out", out, "--no-progress"], capsys)
    assert code == 0, err
    analysis = json.loads((out / "analysis.json").read_text())
    assert analysis["paper_batch_size"] == "all" and analysis["checkpoints"][0]["trace"] is None
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert float(rows[0]["lambda_paper"]) == analysis["checkpoints"][0]["lambda_paper"]
    assert float(rows[0]["trace_paper"]) == pytest.approx(ck.trace_paper, rel=1e-9)
    assert "λ (paper)" in (out / "report.md").read_text(encoding="utf-8")
    code, _, err = _cli([sgd, "--paper-batch-size", "8", "--out", out, "--no-progress"], capsys)
    assert code == 2 and "--paper-metrics" in err


def test_forward_replaces_model_calls_everywhere(runs):
    hessian = _hessian()
    sgd, _ = runs

    def doubled(model, x):  # the logits of a model whose forward needs unpacking, say
        return 2 * model(x)

    options = A.AnalyzeOptions(trace=True, trace_matvecs=8, eigenvalues=2, density=False,
                               landscape=("1d",), grid_points=3, samples=40, batch_size=16,
                               progress=False)
    plain = A.analyze([sgd], options).checkpoints[0]
    (ck,) = A.analyze([sgd], options, forward=doubled).checkpoints
    model, data, batches = _subset(sgd, 40, 16)
    idx = batches.indices
    with torch.no_grad():
        loss = float(nn.functional.cross_entropy(2 * model(data.x_train[idx]), data.y_train[idx]))
    assert ck.loss == pytest.approx(loss, rel=1e-6) and ck.loss != pytest.approx(plain.loss)
    assert ck.landscape_1d.loss[1] == pytest.approx(loss, rel=1e-6)  # alpha = 0
    op = hessian.HessianOperator(model, nn.CrossEntropyLoss(), batches, forward=doubled)
    assert ck.trace == pytest.approx(hessian.trace(op, num_matvecs=8, seed=0).estimate,
                                     rel=1e-6)
    assert ck.eigenvalues[0] == pytest.approx(
        float(hessian.top_eigenvalues(op, k=2, seed=0).eigenvalues[0]), rel=1e-5)
