"""Hypothesis at the command lines: generated config files given to ``train --config``,
generated ``analysis.json`` given to the report, generated checkpoint metadata given to
``analyze``. Wrong types, huge numbers, NaN, deep nesting, unicode, factory strings and paths
outside the run directory: the outcome is always success or one :class:`FlatlabError` line
(exit 0 or 2), never a traceback, and never an import (a marker module on ``sys.path`` writes
a file when imported)."""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from flatlab.analysis import analyze, read_analysis
from flatlab.analysis.cli import main as analyze_main
from flatlab.analysis.options import AnalyzeOptions
from flatlab.checkpoint import read_checkpoint
from flatlab.errors import FlatlabError, run_cli
from flatlab.reporting.report import write_report
from flatlab.training import TrainConfig, train
from flatlab.training import cli as train_cli
from flatlab.training.toml_writer import toml_key, toml_value

MARKER = "fuzz_cli_marker"
FACTORIES = [f"{MARKER}:make", f"{MARKER}.sub:make", "this:s", "os:system", "builtins:eval",
             ":", "a:", "timm:create_model"]
PATHS = ["../../etc/passwd", "/etc", "/", "~", "..", "../outside", "C:\\Windows", "a\x00b"]
FAST = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])

UNICODE = "\u00e9\u4e2d\U0001f600"
toml_leaves = (st.booleans() | st.integers() | st.integers(-2**80, 2**80)
          | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
          | st.sampled_from([*FACTORIES, *PATHS, "mlp", "synthetic", "nso", UNICODE]))


def _nested(leaf):
    return st.recursive(leaf, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=12)


values = _nested(toml_leaves | st.none())  # JSON
toml_values = _nested(toml_leaves)          # TOML has no null


@pytest.fixture(scope="module")
def marker(tmp_path_factory):
    """A package whose import writes ``imported``; every test asserts it never appears."""
    root = tmp_path_factory.mktemp("marker")
    (root / MARKER).mkdir()
    (root / MARKER / "__init__.py").write_text(
        f"open({str(root / 'imported')!r}, 'w').write('x')\ndef make(*a, **k):\n    return None\n")
    (root / MARKER / "sub.py").write_text("def make(*a, **k):\n    return None\n")
    sys.path.insert(0, str(root))
    yield root
    sys.path.remove(str(root))
    assert not (root / "imported").exists() and MARKER not in sys.modules


def _no_import(root) -> None:
    assert not (root / "imported").exists(), "the marker module was imported"
    assert MARKER not in sys.modules


def _exit_0_or_2(code: int, err: str) -> None:
    assert code in (0, 2), err
    if code == 2:
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


# --------------------------------------------------------------------------- train --config

FIELDS = [f.name for f in TrainConfig.declared()]
config_values = toml_values | st.sampled_from([0, -1, 2**64, 1e308, float("nan"), float("inf"), ""])
config_values_known = st.sampled_from(["mlp", "synthetic", "nso", "sam", "cpu", 1, 0.5, True])
# a third of the files are plausible configs, so that the accepted path is reached however the
# field list grows (the derandomized draws of the other two branches shift with it)
plausible = st.fixed_dictionaries({}, optional={
    "optimizer": st.sampled_from(["sgd", "sam", "nso"]), "epochs": st.integers(1, 3),
    "model": st.just("mlp"), "dataset": st.just("synthetic"), "batch_size": st.integers(1, 64),
    "lr": st.floats(0.0, 1.0), "seed": st.integers(0, 2**31)})
configs = plausible | st.dictionaries(st.sampled_from(FIELDS), config_values_known
                                     | config_values, max_size=6) | st.dictionaries(
    st.sampled_from(FIELDS) | st.text(max_size=8), config_values, max_size=6)


def _toml(table: dict) -> str:
    """A TOML file: one ``key = value`` line per entry (tables inline, as a user may write)."""
    return "".join(f"{toml_key(k)} = {toml_value(v)}\n" for k, v in table.items())


@settings(FAST, max_examples=150)
@given(table=configs, garbage=st.sampled_from(["", "[model_kwargs]\nx = [[[[[[1]]]]]]\n",
                                               "a = " + "[" * 5000 + "]" * 5000 + "\n",
                                               "\ufeffoptimizer = 'sam'\n", "x = 1979-05-27\n",
                                               "[[x]]\n", "\x00"]))
def test_generated_config_files_exit_0_or_2_and_import_nothing(marker, tmp_path, capsys,
                                                               monkeypatch, table, garbage):
    """Everything ``python -m flatlab.train --config FILE`` does before training (a factory in
    a file given with --config is the user's consent, and is imported when the run is built)."""
    started = []
    monkeypatch.setattr(train_cli, "train", lambda config, **kw: started.append(config))
    path = tmp_path / "c.toml"
    path.write_text(_toml(table) + garbage, encoding="utf-8", errors="surrogatepass")
    code = run_cli(train_cli.main, ["--config", str(path), "--out", str(tmp_path / "r"),
                                    "--no-progress"], prog="flatlab.train")
    _exit_0_or_2(code, capsys.readouterr().err)
    assert (code == 0) == bool(started)
    OUTCOMES.append(code)
    _no_import(marker)


OUTCOMES: list[int] = []


def test_generated_config_files_also_succeed():
    """Runs after the generated configs (file order): some of them were accepted."""
    assert OUTCOMES.count(0) >= 5 and OUTCOMES.count(2) >= 5, OUTCOMES


# --------------------------------------------------------------------------- analysis.json


@pytest.fixture(scope="module")
def analysis_json(tmp_path_factory) -> dict:
    """A real analysis of a tiny run (trace, eigenvalues, density, a 1-D slice)."""
    out = tmp_path_factory.mktemp("analysis")
    run = train(TrainConfig(dataset="synthetic", model="mlp", model_kwargs={"hidden": [4]},
                            epochs=1, out=str(out / "run")), progress=False)
    options = AnalyzeOptions(samples=32, batch_size=32, trace_matvecs=4, eigenvalues=2,
                             density_runs=1, density_steps=4, landscape=("1d",),
                             grid_points=3, device="cpu", progress=False)
    return json.loads(json.dumps(analyze([run.checkpoint], options).to_json(), allow_nan=True))


def _paths(node, prefix=()):
    """Every (path, value) of a JSON tree."""
    yield prefix, node
    items = node.items() if isinstance(node, dict) else (
        enumerate(node) if isinstance(node, list) else ())
    for key, child in items:
        yield from _paths(child, (*prefix, key))


@settings(FAST, max_examples=12)
@given(data=st.data())
def test_generated_analysis_json_reports_or_refuses(marker, analysis_json, tmp_path, data):
    """``read_analysis`` + ``write_report`` on analysis.json with 1-3 of its values replaced
    (or deleted) by generated ones: a report or one FlatlabError."""
    document = copy.deepcopy(analysis_json)
    places = [path for path, _ in _paths(document)]
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(places))
        if not path:
            document = data.draw(values)
            break
        parent = document
        for key in path[:-1]:
            parent = parent[key]
        if data.draw(st.booleans()) or not isinstance(parent, dict):
            parent[path[-1]] = data.draw(values)
        else:
            del parent[path[-1]]
        places = [p for p, _ in _paths(document)]
    file = tmp_path / "analysis.json"
    file.write_text(json.dumps(document, allow_nan=True))
    try:
        write_report(read_analysis(file), tmp_path / "report")
    except FlatlabError as err:
        assert "\n" not in str(err).strip()
    _no_import(marker)


# --------------------------------------------------------------------------- analyze


SPEC = {"name": "mlp", "kwargs": {"hidden": [4]}, "input_shape": [20], "num_classes": 4}
DATA = {"name": "synthetic", "seed": 0, "kwargs": {"train_size": 64, "test_size": 16}}
specs = st.fixed_dictionaries({}, optional={
    "name": st.sampled_from(FACTORIES + ["mlp", "cnn1d"]) | values, "kwargs": values,
    "input_shape": values | st.just([20]), "num_classes": values | st.just(4)})
data_specs = st.fixed_dictionaries({}, optional={
    "name": st.sampled_from(FACTORIES + ["synthetic", "folder"]) | values, "seed": values,
    "kwargs": values, "data_dir": st.sampled_from(PATHS) | values})


@settings(FAST, max_examples=30)
@given(model=specs | st.just(SPEC) | values, dataset=data_specs | st.just(DATA) | values,
       extra=st.dictionaries(st.sampled_from(["epoch", "run_name", "metrics", "seed",
                                              "optimizer"]), values, max_size=3))
def test_generated_checkpoint_metadata_given_to_analyze_exits_0_or_2(
        marker, tmp_path, capsys, model, dataset, extra):
    torch.manual_seed(0)
    weights = {"net.0.weight": torch.randn(4, 20), "net.0.bias": torch.zeros(4),
               "net.2.weight": torch.randn(4, 4), "net.2.bias": torch.zeros(4)}
    path = tmp_path / "model.safetensors"
    meta = {"format_version": 1, "model": model, "dataset": dataset, **extra}
    save_file(weights, str(path), metadata={"flatlab": json.dumps(meta, allow_nan=True)})
    code = run_cli(analyze_main, [str(path), "--trace", "--trace-matvecs", "4", "--samples",
                                  "16", "--no-progress", "--out", str(tmp_path / "a")],
                   prog="flatlab.analyze")
    _exit_0_or_2(code, capsys.readouterr().err)
    _no_import(marker)


def test_the_generated_checkpoints_can_succeed(marker, tmp_path, capsys):
    """The fuzzed files carry real weights: with the plain spec, analyze succeeds."""
    torch.manual_seed(0)
    from flatlab.models import build_model

    weights = build_model("mlp", (20,), 4, hidden=[4]).state_dict()
    path = tmp_path / "model.safetensors"
    save_file(weights, str(path), metadata={"flatlab": json.dumps(
        {"format_version": 1, "model": SPEC, "dataset": DATA})})
    read_checkpoint(path)
    code = run_cli(analyze_main, [str(path), "--trace", "--trace-matvecs", "4", "--samples",
                                  "16", "--no-progress", "--out", str(tmp_path / "a")],
                   prog="flatlab.analyze")
    assert code == 0, capsys.readouterr().err
