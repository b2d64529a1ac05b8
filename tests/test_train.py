"""Training loop and ``python -m flatlab.train``: files, config, errors, divergence, determinism."""

from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flatlab.checkpoint import load_model, load_state, read_checkpoint
from flatlab.errors import FlatlabError, run_cli
from flatlab.training import METRICS_COLUMNS, TrainConfig, epoch_order, lr_factor, train
from flatlab.training.cli import main, parse_args

# 512 synthetic examples, batch 128: 4 steps per epoch; a tiny MLP; well under a second
TINY = ["--dataset", "synthetic", "--model", "mlp", "--model-arg", "hidden=[16]",
        "--epochs", "1", "--no-progress"]


def tiny_config(out, **changes) -> TrainConfig:
    values = dict(dataset="synthetic", model="mlp", model_kwargs={"hidden": [16]}, epochs=1,
                  out=str(out))
    values.update(changes)
    return TrainConfig(**values)


def run_module(args, cwd, extra_path=None, timeout=120):
    env = dict(os.environ)
    paths = [str(Path(__file__).resolve().parents[1])]
    if extra_path:
        paths.insert(0, str(extra_path))
    env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "flatlab.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def read_metrics(run_dir):
    with open(Path(run_dir) / "metrics.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        return reader.fieldnames, list(reader)


def weights(run_dir):
    return read_checkpoint(Path(run_dir) / "model.safetensors")[0]


def assert_same_weights(a, b):
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


# --------------------------------------------------------------------------- end to end

def test_cli_one_epoch_run_writes_the_three_files(tmp_path):
    result = run_module([*TINY, "--optimizer", "sam", "--rho", "0.1", "--out", "runs/a"],
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run = tmp_path / "runs" / "a"
    assert "wrote runs/a/model.safetensors" in result.stdout
    assert {p.name for p in run.iterdir()} == {"model.safetensors", "metrics.csv",
                                               "config.toml", "train_state.safetensors",
                                               ".lock"}  # the writer's lock, released: empty
    assert (run / ".lock").read_text() == ""
    columns, rows = read_metrics(run)
    assert tuple(columns) == METRICS_COLUMNS and len(rows) == 1
    row = rows[0]
    assert row["epoch"] == "1" and row["skipped_steps"] == "0"
    assert int(row["grad_evals"]) == 4 * 2  # 4 steps, SAM: 2 passes each
    for key in ("train_acc", "test_acc"):
        assert 0.0 <= float(row[key]) <= 1.0
    assert math.isfinite(float(row["train_loss"])) and float(row["seconds"]) > 0
    # the checkpoint's metadata rebuilds model and data; its metrics match metrics.csv
    model, meta = load_model(run)
    assert meta["model"] == {"name": "mlp", "kwargs": {"hidden": [16]}, "input_shape": [20],
                             "num_classes": 4}
    assert meta["dataset"] == {"name": "synthetic", "seed": 0, "kwargs": {}}
    assert meta["optimizer"]["name"] == "sam" and meta["optimizer"]["kwargs"]["rho"] == 0.1
    assert (meta["epoch"], meta["step"], meta["grad_evals"], meta["seed"]) == (1, 4, 8, 0)
    assert meta["run_name"] == "a"
    assert meta["metrics"]["test_acc"] == float(row["test_acc"])
    from flatlab.checkpoint import load_dataset_for
    data = load_dataset_for(meta)
    with torch.no_grad():
        acc = (model(data.x_test).argmax(1) == data.y_test).float().mean().item()
    assert acc == pytest.approx(float(row["test_acc"]), abs=1e-9)
    # config.toml is the resolved config and re-runs to the same weights (in this process)
    config = TrainConfig.from_toml(run / "config.toml")
    assert config.optimizer == "sam" and config.rho == 0.1 and config.model_kwargs == {
        "hidden": [16]}
    assert main(["--config", str(run / "config.toml"), "--out", str(tmp_path / "again"),
                 "--no-progress"]) == 0
    assert_same_weights(weights(run), weights(tmp_path / "again"))


def test_seed_determinism_and_seed_matters(tmp_path):
    train(tiny_config(tmp_path / "a", seed=5), progress=False)
    train(tiny_config(tmp_path / "b", seed=5), progress=False)
    train(tiny_config(tmp_path / "c", seed=6), progress=False)
    assert_same_weights(weights(tmp_path / "a"), weights(tmp_path / "b"))
    w_a, w_c = weights(tmp_path / "a"), weights(tmp_path / "c")
    assert not torch.equal(w_a["1.weight"], w_c["1.weight"])


@pytest.mark.parametrize("optimizer, extra, per_step", [
    ("sgd", {}, 1), ("sam", {}, 2), ("nso", {"num_perturbs": 2}, 4),
    ("nso", {"num_perturbs": 1, "clean_weight": 0.5}, 3), ("rwp", {}, None),
])
def test_grad_evals_match_the_optimizer(tmp_path, optimizer, extra, per_step):
    from flatlab.optim import build_optimizer, gradient_evaluations_per_step

    result = train(tiny_config(tmp_path / "r", optimizer=optimizer, epochs=2, **extra),
                   progress=False)
    probe = build_optimizer(optimizer, torch.nn.Linear(2, 2).parameters(), lr=0.1, **extra)
    expected = gradient_evaluations_per_step(probe)
    if per_step is not None:
        assert expected == per_step
    assert [row["grad_evals"] for row in result.metrics] == [4 * expected, 8 * expected]


def test_batchnorm_trains_in_train_mode_and_evaluates_in_eval_mode(tmp_path):
    config = tiny_config(tmp_path / "bn", model="resnet", model_kwargs={"depth": 8, "width": 2},
                         dataset_kwargs={"input_shape": [1, 8, 8]}, epochs=2, batch_size=100)
    train(config, progress=False)
    state = weights(tmp_path / "bn")
    # 512 examples, batch 100: 6 steps per epoch (the last of 12 examples); evaluation adds none
    assert int(state["stem.1.num_batches_tracked"]) == 12
    assert not torch.equal(state["stem.1.running_var"], torch.ones(2))


def test_schedule_reaches_the_logged_learning_rates(tmp_path):
    result = train(tiny_config(tmp_path / "s", epochs=3, lr=0.2, schedule="cosine"),
                   progress=False)
    # the lr column is the one used by each epoch's last step (step 4e - 1 of 12)
    assert [row["lr"] for row in result.metrics] == pytest.approx(
        [0.2 * lr_factor("cosine", 4 * e - 1, 12) for e in (1, 2, 3)], rel=1e-12)
    assert lr_factor("cosine", 0, 12) == 1.0 and lr_factor("cosine", 12, 12) == 0.0
    assert [lr_factor("step", s, 8) for s in (0, 3, 4, 5, 6, 7)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.01])
    assert lr_factor("none", 7, 8) == 1.0


def test_epoch_order_matches_distributed_sampler():
    from torch.utils.data import DistributedSampler

    for world_size in (1, 2, 3):
        for rank in range(world_size):
            sampler = DistributedSampler(range(10), num_replicas=world_size, rank=rank,
                                         shuffle=True, seed=7)
            sampler.set_epoch(4)
            assert epoch_order(10, 7, 4, rank=rank, world_size=world_size).tolist() == list(
                sampler)


# --------------------------------------------------------------------------- refusing

def test_existing_run_is_not_overwritten(tmp_path):
    train(tiny_config(tmp_path / "run"), progress=False)
    def files():  # the run's files (the refused process takes and releases DIR/.lock)
        return {p.name: (p.read_bytes(), p.stat().st_mtime_ns)
                for p in (tmp_path / "run").iterdir() if p.name != ".lock"}

    before = files()
    code = run_cli(main, [*TINY, "--out", str(tmp_path / "run"), "--lr", "0.5"],
                   prog="flatlab.train")
    assert code == 2
    assert files() == before and len(before) == 4


def test_default_out_dir_is_numbered_not_overwritten(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(TINY) == 0
    assert main(TINY) == 0
    assert (tmp_path / "runs/synthetic-mlp-sgd/model.safetensors").is_file()
    assert (tmp_path / "runs/synthetic-mlp-sgd-2/model.safetensors").is_file()
    assert "runs/synthetic-mlp-sgd-2/metrics.csv" in capsys.readouterr().out


@pytest.mark.parametrize("args", [
    ["--sigma", "-1", "--optimizer", "nso"],
    ["--optimizer", "lbfgs"],
    ["--epochs", "many"],
])
def test_bad_flags_exit_2_with_one_line_subprocess(tmp_path, args):
    result = run_module([*TINY, *args, "--out", "r"], cwd=tmp_path)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith("flatlab.train: ") and "Traceback" not in result.stderr
    assert not (tmp_path / "r").exists()


BAD_ARGS = [
    (["--sigma", "-0.5", "--optimizer", "nso"], "--sigma must be >= 0.0, got -0.5"),
    (["--num-perturbs", "0", "--optimizer", "nso"], "--num-perturbs must be >= 1, got 0"),
    (["--rho", "0", "--optimizer", "sam"], "--rho must be > 0.0, got 0.0"),
    (["--clean-weight", "1.5", "--optimizer", "nso"], r"--clean-weight must be in \[0.0, 1.0\]"),
    (["--lr", "nan"], "--lr must be >= 0.0, got nan"),
    (["--momentum", "1"], r"--momentum must be in \[0.0, 1.0\), got 1.0"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--schedule", "linear"], "--schedule: invalid choice 'linear'; choose one of none, step"),
    (["--device", "tpu"], "--device: unknown device 'tpu'"),
    (["--noise", "pink", "--optimizer", "nso"], "--noise: invalid choice 'pink'"),
    (["--on-nan", "ignore"], "--on-nan: invalid choice 'ignore'"),
    (["--dataset", "imagenet"], "--dataset: invalid choice 'imagenet'; choose one of mnist1d"),
    (["--model", "vit"], "--model: unknown model 'vit'"),
    (["--sigma", "0.1", "--optimizer", "sam"], "sigma does not apply to optimizer 'sam'"),
    (["--base-optimizer", "lion", "--optimizer", "sam"], "unknown base optimizer 'lion'"),
    (["--model-arg", "widht=3"], "unknown argument.*widht"),
    (["--model-arg", "=3"], "--model-arg expects KEY=VALUE"),
    (["--dataset-arg", "train_size=-4"], "synthetic sizes must be positive"),
    (["--wibble"], "unrecognized arguments: --wibble"),
    (["--epochs"], "expected one argument"),
    (["--config", "missing.toml"], "config file 'missing.toml' does not exist"),
    (["--resume"], "--resume needs --out"),
    (["--resume", "--out", "nowhere"], "run directory 'nowhere' does not exist"),
]


@pytest.mark.parametrize("args, message", BAD_ARGS)
def test_bad_input_is_one_line_exit_2(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    out = [] if "--out" in args or args == ["--resume"] else ["--out", "r"]
    code = run_cli(main, [*TINY, *args, *out], prog="flatlab.train")
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("flatlab.train: ")
    assert __import__("re").search(message, err), err
    assert not (tmp_path / "r").exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("text, message", [
    ('lr = "fast"\n', "'lr' must be float, got str 'fast'"),
    ("epochs = 2.5\n", "'epochs' must be int, got float"),
    ("epochs = true\n", "'epochs' must be int, got bool"),
    ("learning_rate = 0.1\n", "unknown key 'learning_rate'; known keys: dataset"),
    ("sigma = 0.1\nsigma = 0.2\n", "invalid TOML"),
    ("[model_kwargs]\nwhen = 1979-05-27\n", "only numbers, strings, booleans, lists and tables"),
    ("data_dir = 3\n", "'data_dir' must be str or none, got int"),
])
def test_bad_config_files(tmp_path, capsys, text, message):
    path = tmp_path / "c.toml"
    path.write_text(text)
    code = run_cli(main, [*TINY, "--config", str(path), "--out", str(tmp_path / "r")],
                   prog="flatlab.train")
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert __import__("re").search(message, err), err
    assert not (tmp_path / "r").exists()


def test_flags_override_the_config_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('optimizer = "nso"\nsigma = 0.02\nepochs = 7\n[model_kwargs]\nhidden = [4]\n')
    config, resume, progress = parse_args(["--config", str(path), "--epochs", "3",
                                           "--model-arg", "hidden=[5, 6]", "--no-progress"])
    assert (config.optimizer, config.sigma, config.epochs) == ("nso", 0.02, 3)
    assert config.model_kwargs == {"hidden": [5, 6]} and not resume and not progress


# --------------------------------------------------------------------------- TOML and fuzzing

def test_toml_round_trip_with_awkward_values():
    config = TrainConfig(dataset="digits", dataset_kwargs={"test_size": 100},
                         model="pkg.mod:factory", data_dir='C:\\data\\"cifar"\n\u00e9\x7f',
                         model_kwargs={"hidden": [3, 4], "name": "a\tb", "flag": True,
                                       "nested": {"x": 1.5e-7, "y": [1, 2]}},
                         optimizer="nso", sigma=1e-300, num_perturbs=3, clean_weight=0.25,
                         lr=0.1 + 0.2, seed=2**32 - 1, out="ignored")
    text = config.to_toml(comment="two\nlines")
    back = TrainConfig.from_toml_text(text)
    assert back.to_dict() == {**config.to_dict(), "out": None}


plain = st.one_of(st.booleans(), st.integers(-2**63, 2**63 - 1), st.text(max_size=8),
                  st.floats(allow_nan=False))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kwargs=st.dictionaries(st.text(min_size=1, max_size=6), st.one_of(
    plain, st.lists(plain, max_size=3)), max_size=4), lr=st.floats(0, 10), seed=st.integers(
    0, 2**32 - 1))
def test_toml_round_trip_property(kwargs, lr, seed):
    config = TrainConfig(model_kwargs=kwargs, lr=lr, seed=seed)
    assert TrainConfig.from_toml_text(config.to_toml()).to_dict() == {**config.to_dict(),
                                                                        "out": None}


flag_names = ["--dataset", "--model", "--optimizer", "--sigma", "--num-perturbs", "--rho",
              "--noise", "--clean-weight", "--epochs", "--batch-size", "--lr", "--momentum",
              "--weight-decay", "--label-smoothing", "--schedule", "--seed", "--device",
              "--save-every-steps", "--on-nan", "--model-arg", "--dataset-arg", "--threads",
              "--data-seed", "--base-optimizer", "--resume", "--no-progress", "--bogus", "-x"]
values = st.one_of(st.sampled_from(["nan", "-1", "0", "1e400", "sgd", "nso", "[1,", "k=v",
                                    "hidden=[2]", "", "cuda:7", "inf", "3"]), st.text(max_size=6))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(argv=st.lists(st.one_of(st.sampled_from(flag_names), values), max_size=8))
def test_parsing_random_flags_never_tracebacks(argv):
    parsed = []
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = run_cli(lambda args: parsed.append(parse_args(args)), argv, prog="flatlab.train")
    if code == 0:
        assert parsed[0][0].validate() is parsed[0][0] and not stderr.getvalue()
    else:
        assert code == 2 and len(stderr.getvalue().splitlines()) == 1


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.one_of(st.text(max_size=60), st.builds(
    lambda key, value: f"{key} = {value}\n", st.sampled_from(
        ["lr", "epochs", "sigma", "dataset", "model_kwargs", "seed", "out", "x"]),
    st.sampled_from(["1", "-1", "1.5", '"s"', "true", "[1, 2]", "{a = 1}", "nan", "inf",
                     "1979-05-27", "[[1], [2]]", '"\\u0000"']))))
def test_parsing_random_config_files_never_tracebacks(text):
    try:
        TrainConfig.from_toml_text(text).validate()
    except FlatlabError as err:
        assert "\n" not in str(err).strip()


# --------------------------------------------------------------------------- divergence

NAN_MODEL = textwrap.dedent("""
    import math
    import torch
    from torch import nn

    class Flaky(nn.Module):
        '''Linear model whose training forward pass number k (1-based) is NaN or raises.'''

        def __init__(self, input_shape, num_classes, nan_calls, raise_calls):
            super().__init__()
            self.linear = nn.Linear(math.prod(input_shape), num_classes)
            self.calls = 0
            self.nan_calls, self.raise_calls = set(nan_calls), set(raise_calls)

        def forward(self, x):
            out = self.linear(x.flatten(1))
            if self.training:
                self.calls += 1
                if self.calls in self.raise_calls:
                    raise RuntimeError("planned crash")
                if self.calls in self.nan_calls:
                    out = out * float("nan")
            return out

    def flaky(input_shape, num_classes, nan_calls=(), raise_calls=()):
        return Flaky(input_shape, num_classes, nan_calls, raise_calls)
""")


@pytest.fixture
def flaky(tmp_path, monkeypatch):
    folder = tmp_path / "mods"
    folder.mkdir()
    (folder / "flaky_models.py").write_text(NAN_MODEL)
    monkeypatch.syspath_prepend(str(folder))
    yield folder
    sys.modules.pop("flaky_models", None)


def test_nan_loss_stops_with_exit_3_and_keeps_the_last_good_files(tmp_path, flaky):
    result = run_module(["--dataset", "synthetic", "--model", "flaky_models:flaky",
                         "--model-arg", "nan_calls=[7]", "--epochs", "3", "--out", "r",
                         "--no-progress", "--lr", "0.05"], cwd=tmp_path, extra_path=flaky)
    assert result.returncode == 3, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert "loss is nan at step 7 (epoch 2, batch 3)" in lines[0]
    assert "Last good state kept" in lines[0] and "(epoch 1, step 4)" in lines[0]
    _, rows = read_metrics(tmp_path / "r")
    assert [row["epoch"] for row in rows] == ["1"]
    tensors, meta = read_checkpoint(tmp_path / "r" / "model.safetensors")
    assert meta["epoch"] == 1 and all(torch.isfinite(t).all() for t in tensors.values())
    state = load_state(tmp_path / "r" / "train_state.safetensors")
    assert (state["epoch"], state["step"]) == (1, 4)


@pytest.mark.parametrize("optimizer, calls_per_step", [("sgd", 1), ("sam", 2)])
def test_on_nan_skip_undoes_exactly_that_step(tmp_path, flaky, optimizer, calls_per_step):
    # run A: the 4th (last) step of epoch 1 is NaN (its last pass) and skipped
    nan_call = 4 * calls_per_step
    common = dict(model="flaky_models:flaky", optimizer=optimizer, schedule="none")
    result = train(tiny_config(tmp_path / "a", on_nan="skip", model_kwargs={
        "nan_calls": [nan_call]}, **common), progress=False, trust_code=True)
    assert result.metrics[0]["skipped_steps"] == 1
    assert result.metrics[0]["grad_evals"] == 4 * calls_per_step
    # run B crashes in step 4 right after saving the state of step 3: the weights to expect
    with pytest.raises(RuntimeError, match="planned crash"):
        train(tiny_config(tmp_path / "b", save_every_steps=3, model_kwargs={
            "raise_calls": [3 * calls_per_step + 1]}, **common), progress=False, trust_code=True)
    after_three = load_state(tmp_path / "b" / "train_state.safetensors")
    assert after_three["step"] == 3
    assert_same_weights(weights(tmp_path / "a"), after_three["model"])


def test_on_nan_skip_gives_up_when_every_step_is_nan(tmp_path, flaky):
    with pytest.raises(FlatlabError, match="every step of epoch 1 had a non-finite loss") as err:
        train(tiny_config(tmp_path / "a", on_nan="skip", model="flaky_models:flaky",
                          model_kwargs={"nan_calls": [1, 2, 3, 4]}), progress=False,
              trust_code=True)
    assert err.value.exit_code == 3


def test_infinite_loss_from_a_huge_learning_rate(tmp_path):
    with pytest.raises(FlatlabError, match=r"loss is (nan|inf) at step \d+") as err:
        train(tiny_config(tmp_path / "a", lr=1e30, epochs=3, momentum=0.0, weight_decay=0.0),
              progress=False)
    assert err.value.exit_code == 3


# --------------------------------------------------------------------------- generated CLI

def _other_value(f):
    """A valid value of field ``f`` other than its default (and its command-line text)."""
    if f.value_type is bool:
        return True, None
    if f.value_type is dict:
        return {"k": [1, 2]}, "k=[1, 2]"
    if f.rule.choices:
        value = next(c for c in f.rule.choices if c != f.default)
        return value, value
    if f.value_type is str:
        return "some/where", "some/where"
    low = f.rule.low if f.rule.low is not None else 0
    value = f.value_type(low + 1 if f.rule.high is None or low + 1 < f.rule.high else
                         (low + f.rule.high) / 2)
    if value == f.default:
        value = f.value_type(low + 2) if f.rule.high is None else f.value_type(f.rule.high * 0.75)
    return value, repr(value)


def test_every_config_field_has_a_flag_help_and_a_toml_round_trip():
    from flatlab.training.cli import build_parser

    parser = build_parser()
    help_text = " ".join(parser.format_help().split())
    flags = {s: a for a in parser._actions for s in a.option_strings}
    declared = TrainConfig.declared()
    assert [f.name for f in declared] == list(TrainConfig.__dataclass_fields__)
    for f in declared:
        assert f.flag in flags and flags[f.flag].dest == f.name, f.name
        assert f.rule.help and " ".join(f.rule.help.split()) in help_text, f.name
        value, text = _other_value(f)
        assert value != f.default, f.name
        # the flag sets the field
        argv = [f.flag] if text is None else [f.flag, text]
        parsed = vars(parser.parse_args(argv))[f.name]
        assert parsed == ([text] if f.value_type is dict else value), f.name
        # the file keeps it (``out`` is the one field never written: it names the file's run)
        config = TrainConfig(**{f.name: value})
        back = TrainConfig.from_toml_text(config.to_toml())
        assert getattr(back, f.name) == (f.default if not f.rule.in_file else value), f.name
    assert [f.name for f in declared if not f.rule.in_file] == ["out"]


@pytest.mark.parametrize("args", [["--epoch", "3"], ["--batch", "8"], ["--model-a", "x=1"]])
def test_abbreviated_flags_are_refused(tmp_path, capsys, args):
    code = run_cli(main, [*TINY, *args, "--out", str(tmp_path / "r")], prog="flatlab.train")
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("flatlab.train: unrecognized arguments: " + args[0]), err
    assert not (tmp_path / "r").exists()


def test_version_flag(tmp_path):
    import flatlab

    result = run_module(["--version"], cwd=tmp_path)
    assert result.returncode == 0 and result.stdout == f"flatlab {flatlab.__version__}\n"


def test_step_schedule_with_step_every_and_gamma_is_steplr(tmp_path):
    result = train(tiny_config(tmp_path / "s", epochs=3, lr=0.2, schedule="step", step_every=1,
                               gamma=0.3), progress=False)
    # StepLR(step_size=1 epoch, gamma=0.3) stepped after each epoch: the lr of each epoch
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.2)
    steplr = torch.optim.lr_scheduler.StepLR(probe, step_size=1, gamma=0.3)
    expected = []
    for _ in range(3):
        expected.append(probe.param_groups[0]["lr"])
        probe.step()
        steplr.step()
    assert [row["lr"] for row in result.metrics] == pytest.approx(expected, rel=1e-14)
    assert [lr_factor("step", s, 12, gamma=0.5, drop_every=8) for s in (0, 7, 8, 11)] == [
        1, 1, 0.5, 0.5]
    config = (tmp_path / "s" / "config.toml").read_text()
    assert "step_every = 1\ngamma = 0.3\n" in config
    meta = read_checkpoint(tmp_path / "s" / "model.safetensors")[1]
    assert (meta["optimizer"]["kwargs"]["step_every"], meta["optimizer"]["kwargs"]["gamma"]) == (
        1, 0.3)
    # defaults are neither written nor recorded: older configs and checkpoints read the same
    train(tiny_config(tmp_path / "d", schedule="step"), progress=False)
    assert "gamma" not in (tmp_path / "d" / "config.toml").read_text()
    assert "gamma" not in read_checkpoint(tmp_path / "d" / "model.safetensors")[1]["optimizer"][
        "kwargs"]


@pytest.mark.parametrize("args, message", [
    (["--gamma", "0.5"], "--gamma applies to step only, not --schedule 'cosine'"),
    (["--schedule", "step", "--step-every", "-1"], "--step-every must be >= 0, got -1"),
    (["--schedule", "step", "--gamma", "0"], r"--gamma must be in \(0.0, 1.0\], got 0.0"),
])
def test_bad_step_schedule_flags(tmp_path, capsys, args, message):
    code = run_cli(main, [*TINY, *args, "--out", str(tmp_path / "r")], prog="flatlab.train")
    err = capsys.readouterr().err
    assert code == 2 and __import__("re").search(message, err), err


def test_the_old_module_still_exports_what_scripts_import():
    import flatlab.train as legacy
    import flatlab.training as training

    for name in ("TrainConfig", "train", "STATE_NAME", "CONFIG_NAME", "METRICS_NAME",
                 "CHECKPOINT_NAME", "METRICS_COLUMNS", "epoch_order", "lr_factor"):
        assert getattr(legacy, name) is getattr(training, name), name
    assert legacy.main is main and legacy.parse_args is parse_args
