"""Training features of issue 11: --base-arg, --keep best, --augment, --init-from, fp16,
--trust-code. Small runs (synthetic data, tiny MLPs), exact comparisons where possible."""

from __future__ import annotations

import csv
import hashlib
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from flatlab.checkpoint import load_model, load_state, read_checkpoint
from flatlab.data import load_dataset
from flatlab.errors import FlatlabError, run_cli
from flatlab.training import METRICS_COLUMNS, TrainConfig, evaluate, train
from flatlab.training import trainer as trainer_module
from flatlab.training.build import build
from flatlab.training.cli import main, parse_command

TINY = dict(dataset="synthetic", model="mlp", model_kwargs={"hidden": [16]}, epochs=1)
IMAGES = dict(dataset="synthetic", dataset_kwargs={"input_shape": [2, 6, 6]}, model="mlp",
              model_kwargs={"hidden": [8]}, schedule="none", augment="crop-flip")
VALIDATED = dict(TINY, dataset_kwargs={"validation_fraction": 0.25}, schedule="none",
                 keep="best", lr=0.5)


def config(out, **values) -> TrainConfig:
    return TrainConfig(**{**TINY, **values, "out": str(out)})


def weights(path):
    return read_checkpoint(path)[0]


def same(a, b) -> bool:
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def cli(args, capsys):
    code = run_cli(main, [*args, "--no-progress"], prog="flatlab.train")
    return code, capsys.readouterr()


# --------------------------------------------------------------------------- --base-arg

def test_base_args_reach_the_base_optimizer_and_the_config_file(tmp_path, capsys):
    args = ["--dataset", "synthetic", "--model", "mlp", "--model-arg", "hidden=[4]", "--epochs",
            "1", "--optimizer", "sam", "--base-optimizer", "adam", "--base-arg", "amsgrad=true",
            "--base-arg", "betas=[0.8, 0.99]", "--lr", "0.01", "--out", str(tmp_path / "a")]
    command = parse_command(args)
    assert command.config.base_kwargs == {"amsgrad": True, "betas": [0.8, 0.99]}
    group = build(command.config).optimizer.base_optimizer.param_groups[0]
    assert group["amsgrad"] is True and tuple(group["betas"]) == (0.8, 0.99)
    assert cli(args, capsys)[0] == 0
    text = (tmp_path / "a" / "config.toml").read_text()
    assert "[base_kwargs]\namsgrad = true\nbetas = [0.8, 0.99]\n" in text
    meta = read_checkpoint(tmp_path / "a" / "model.safetensors")[1]
    assert meta["optimizer"]["kwargs"]["base_kwargs"] == {"amsgrad": True, "betas": [0.8, 0.99]}
    # the file re-runs to the same weights; without the options the run differs
    assert cli(["--config", str(tmp_path / "a" / "config.toml"), "--out",
                str(tmp_path / "b")], capsys)[0] == 0
    assert same(weights(tmp_path / "a" / "model.safetensors"),
                weights(tmp_path / "b" / "model.safetensors"))
    plain = [a for a in args if a not in ("--base-arg", "amsgrad=true", "betas=[0.8, 0.99]")]
    assert cli([*plain[:-1], str(tmp_path / "c")], capsys)[0] == 0
    assert not same(weights(tmp_path / "a" / "model.safetensors"),
                    weights(tmp_path / "c" / "model.safetensors"))


@pytest.mark.parametrize("args, message", [
    (["--base-arg", "amsgrd=true", "--base-optimizer", "adam"],
     "unknown option.*amsgrd for base optimizer 'adam'; accepted: .*amsgrad"),
    (["--base-arg", "lr=0.5"], "option.*lr have their own arguments"),
    (["--base-arg", "betas=[2, 3]", "--base-optimizer", "adam"], "--base-arg betas=.*beta"),
    (["--base-arg", "nesterov"], "--base-arg expects KEY=VALUE, got 'nesterov'"),
])
def test_bad_base_args_are_one_line_exit_2(tmp_path, capsys, args, message):
    code, out = cli(["--dataset", "synthetic", "--model", "mlp", "--epochs", "1", *args,
                     "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and len(out.err.strip().splitlines()) == 1, out.err
    assert __import__("re").search(message, out.err), out.err
    assert not (tmp_path / "r").exists()


# --------------------------------------------------------------------------- --keep best

def test_keep_best_writes_the_best_validation_epoch(tmp_path):
    result = train(config(tmp_path / "a", **{**VALIDATED, "epochs": 4}), progress=False)
    with open(tmp_path / "a" / "metrics.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames) == (*METRICS_COLUMNS, "val_loss", "val_acc")
    rows = result.metrics
    # validation_fraction: the held-out split is the validation and the test split
    assert all(r["val_loss"] == r["test_loss"] and r["val_acc"] == r["test_acc"] for r in rows)
    best = max(rows, key=lambda r: (r["val_acc"], -r["val_loss"]))
    tensors, meta = read_checkpoint(tmp_path / "a" / "best.safetensors")
    assert meta["epoch"] == best["epoch"] and meta["metrics"]["val_acc"] == best["val_acc"]
    # the same run stopped at the best epoch ends with exactly these weights
    train(config(tmp_path / "b", **{**VALIDATED, "epochs": best["epoch"]}), progress=False)
    assert same(tensors, weights(tmp_path / "b" / "model.safetensors"))
    # the model and the data it names give the recorded validation accuracy
    model, meta = load_model(tmp_path / "a" / "best.safetensors")
    data = load_dataset("synthetic", validation_fraction=0.25)
    assert evaluate(model, data.x_val, data.y_val)[1] == best["val_acc"]


def test_keep_best_survives_resume(tmp_path):
    train(config(tmp_path / "straight", **{**VALIDATED, "epochs": 4}), progress=False)
    train(config(tmp_path / "resumed", **{**VALIDATED, "epochs": 2}), progress=False)
    train(config(tmp_path / "resumed", **{**VALIDATED, "epochs": 4}), progress=False,
          resume=True)
    for name in ("best.safetensors", "model.safetensors"):
        assert same(weights(tmp_path / "straight" / name), weights(tmp_path / "resumed" / name))
    assert (load_state(tmp_path / "straight" / "train_state.safetensors")["best"]
            == load_state(tmp_path / "resumed" / "train_state.safetensors")["best"])


def test_keep_best_needs_a_validation_split(tmp_path):
    with pytest.raises(FlatlabError, match="--keep best needs a validation split"):
        train(config(tmp_path / "a", keep="best"), progress=False)
    assert not (tmp_path / "a").exists()


# --------------------------------------------------------------------------- --augment

def test_augmented_resume_is_bit_exact(tmp_path, monkeypatch):
    common = dict(IMAGES, epochs=2, save_every_steps=3)
    straight = train(config(tmp_path / "straight", **common), progress=False)
    plain = train(config(tmp_path / "plain", **{**common, "augment": "none"}), progress=False)
    assert not same(weights(straight.checkpoint), weights(plain.checkpoint))
    # interrupted in step 4 (the last of epoch 1), after the state of step 3 was saved
    real_step, calls = trainer_module.train_step, []

    def crashing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("planned crash")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "train_step", crashing)
    with pytest.raises(RuntimeError, match="planned crash"):
        train(config(tmp_path / "resumed", **common), progress=False)
    monkeypatch.setattr(trainer_module, "train_step", real_step)
    assert load_state(tmp_path / "resumed" / "train_state.safetensors")["step"] == 3
    resumed = train(config(tmp_path / "resumed", **common), progress=False, resume=True)
    assert same(weights(straight.checkpoint), weights(resumed.checkpoint))
    assert resumed.metrics == [dict(r, seconds=s["seconds"]) for r, s in
                               zip(straight.metrics, resumed.metrics, strict=True)]


def test_augmentation_touches_training_batches_only(tmp_path, monkeypatch):
    seen = []
    real = trainer_module.crop_flip

    def spy(x, generator, padding=4):
        seen.append(len(x))
        return real(x, generator, padding)

    monkeypatch.setattr(trainer_module, "crop_flip", spy)
    result = train(config(tmp_path / "a", **IMAGES), progress=False)
    assert seen == [128, 128, 128, 128]  # 512 training examples; the test set never
    model, meta = load_model(tmp_path / "a")
    data = load_dataset("synthetic", input_shape=[2, 6, 6])
    loss, acc = evaluate(model, data.x_test, data.y_test)
    assert (loss, acc) == (pytest.approx(result.metrics[0]["test_loss"], rel=1e-6),
                           result.metrics[0]["test_acc"])
    assert meta["optimizer"]["kwargs"]["augment"] == "crop-flip"


def test_crop_flip_needs_images(tmp_path):
    with pytest.raises(FlatlabError, match=r"--augment crop-flip needs images .* \(20,\)"):
        train(config(tmp_path / "a", augment="crop-flip"), progress=False)


# --------------------------------------------------------------------------- --init-from

def test_init_from_loads_matching_tensors_and_reinitialises_the_new_head(tmp_path, capsys):
    source = train(config(tmp_path / "src"), progress=False).checkpoint
    capsys.readouterr()
    three = dict(dataset_kwargs={"num_classes": 3})
    tuned = config(tmp_path / "ft", **three, init_from=str(source))
    parts = build(tuned)
    fresh = build(config(tmp_path / "x", **three)).module.state_dict()
    src = weights(source)
    got = parts.module.state_dict()
    assert parts.init_report.reinitialised == ["3.weight", "3.bias"]
    for name, tensor in got.items():
        assert torch.equal(tensor, fresh[name] if name.startswith("3.") else src[name]), name
    code, out = cli(["--config", _toml(tmp_path, tuned), "--out", str(tmp_path / "ft")], capsys)
    assert code == 0, out.err
    assert (f"init from {source}: 2 tensors loaded, 2 re-initialised: 3.weight, 3.bias"
            in out.out)
    meta = read_checkpoint(tmp_path / "ft" / "model.safetensors")[1]
    digest = hashlib.sha256(Path(source).read_bytes()).hexdigest()
    assert meta["init_from"]["path"] == str(source)
    assert meta["init_from"]["reinitialised"] == ["3.weight", "3.bias"]
    assert digest in meta["init_from"]["sha256"]
    # resuming does not read the file again, and keeps the record
    Path(source).unlink()
    train(TrainConfig(**{**tuned.to_dict(), "epochs": 2}), progress=False, resume=True)
    assert read_checkpoint(tmp_path / "ft" / "model.safetensors")[1]["init_from"] == meta[
        "init_from"]


def _toml(tmp_path, cfg) -> str:
    path = tmp_path / "cfg.toml"
    path.write_text(cfg.to_toml())
    return str(path)


def test_init_from_missing_tensors_partial_and_pickle(tmp_path, capsys):
    source = train(config(tmp_path / "src"), progress=False).checkpoint
    deeper = ["--dataset", "synthetic", "--model", "mlp", "--model-arg", "hidden=[16, 16]",
              "--epochs", "1", "--init-from", str(source)]
    code, out = cli([*deeper, "--out", str(tmp_path / "a")], capsys)
    assert code == 2 and "lacks 2 of the model's tensors" in out.err and "--init-partial" in (
        out.err)
    assert not (tmp_path / "a").exists()
    assert cli([*deeper, "--init-partial", "--out", str(tmp_path / "b")], capsys)[0] == 0
    pt = tmp_path / "state.pt"
    torch.save({"module." + k: v for k, v in weights(source).items()}, pt)
    flat = ["--dataset", "synthetic", "--model", "mlp", "--model-arg", "hidden=[16]",
            "--epochs", "1", "--init-from", str(pt)]
    code, out = cli([*flat, "--out", str(tmp_path / "c")], capsys)
    assert code == 2 and "--trust-pickle" in out.err
    code, out = cli([*flat, "--trust-pickle", "--out", str(tmp_path / "d")], capsys)
    assert code == 0 and "4 tensors loaded, 0 re-initialised" in out.out
    assert cli(["--init-partial", "--out", str(tmp_path / "e")], capsys)[1].err.endswith(
        "--init-partial applies only with --init-from\n")


# --------------------------------------------------------------------------- fp16

@pytest.mark.parametrize("optimizer", ["sgd", "nso"])
def test_fp16_trains_with_a_grad_scaler_and_resumes_exactly(tmp_path, optimizer):
    common = dict(optimizer=optimizer, epochs=2, schedule="none")
    fp32 = train(config(tmp_path / "fp32", **common), progress=False)
    fp16 = train(config(tmp_path / "fp16", **common, precision="fp16"), progress=False)
    a, b = weights(fp32.checkpoint), weights(fp16.checkpoint)
    assert all(t.dtype == torch.float32 for t in b.values())
    gap = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert 0 < gap < 0.05  # autocast was on (fp16 rounding), the run is the same run
    state = load_state(tmp_path / "fp16" / "train_state.safetensors")
    assert state["scaler"]["scale"] == 65536.0  # no overflow on this tiny model
    train(config(tmp_path / "r", **{**common, "epochs": 1}, precision="fp16"), progress=False)
    train(config(tmp_path / "r", **common, precision="fp16"), progress=False, resume=True)
    assert same(b, weights(tmp_path / "r" / "model.safetensors"))


# --------------------------------------------------------------------------- --trust-code

FACTORY = textwrap.dedent("""
    import math
    from torch import nn

    def linear(input_shape, num_classes):
        return nn.Linear(math.prod(input_shape), num_classes)
""")


def test_code_named_in_a_saved_state_needs_consent(tmp_path, monkeypatch, capsys):
    (tmp_path / "my_models.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_models", raising=False)
    run = ["--dataset", "synthetic", "--epochs", "1", "--out", str(tmp_path / "a")]
    with pytest.raises(FlatlabError, match="pass --trust-code"):
        train(config(tmp_path / "p", model="my_models:linear", model_kwargs={}))
    # named on the command line: consent
    assert cli([*run, "--model", "my_models:linear"], capsys)[0] == 0
    # resumed: the name comes from the run's state file
    resume = ["--out", str(tmp_path / "a"), "--resume", "--epochs", "2"]
    code, out = cli(resume, capsys)
    assert code == 2 and "model 'my_models:linear' would import module 'my_models'" in out.err
    assert "--trust-code" in out.err and "epoch   2/2" not in out.out
    assert cli([*resume, "--trust-code"], capsys)[0] == 0


def test_a_factory_in_your_own_config_file_is_consent(tmp_path, monkeypatch, capsys):
    """``--config FILE`` is the user's own words: a factory it names is imported, for a fresh
    run and for a resume that passes the same file; a resume without it needs --trust-code."""
    (tmp_path / "my_models.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_models", raising=False)
    own = tmp_path / "mine.toml"
    own.write_text('dataset = "synthetic"\nmodel = "my_models:linear"\nepochs = 1\n')
    run = ["--out", str(tmp_path / "a")]
    assert cli(["--config", str(own), *run], capsys)[0] == 0
    assert cli(["--config", str(own), *run, "--resume", "--epochs", "2"], capsys)[0] == 0
    code, out = cli([*run, "--resume", "--epochs", "3"], capsys)
    assert code == 2 and "would import module 'my_models'" in out.err


# --------------------------------------------------------------------------- an image folder

def _image_folder(root: Path, per_class: dict[str, int]) -> None:
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for split, count in per_class.items():
        for label, name in enumerate(("cat", "dog", "owl")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = torch.randint(0, 64, (8, 8, 3), generator=gen, dtype=torch.uint8)
                pixels[:, :, label] += 150  # the class is the brightest channel
                Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")


def test_image_folder_with_val_split_augmentation_and_keep_best(tmp_path, capsys):
    _image_folder(tmp_path / "imgs", {"train": 12, "val": 4, "test": 4})
    args = ["--dataset", "folder", "--data-dir", str(tmp_path / "imgs"), "--model", "mlp",
            "--model-arg", "hidden=[8]", "--epochs", "3", "--batch-size", "12", "--schedule",
            "none", "--augment", "crop-flip", "--keep", "best", "--out", str(tmp_path / "r")]
    code, out = cli(args, capsys)
    assert code == 0, out.err
    with open(tmp_path / "r" / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 3 and {"val_loss", "val_acc"} <= set(rows[0])
    # stored as uint8, normalised per batch: evaluating the best checkpoint on the val split
    # through Dataset.normalize gives the recorded numbers
    model, meta = load_model(tmp_path / "r" / "best.safetensors")
    data = load_dataset("folder", data_dir=tmp_path / "imgs")
    assert data.x_val.dtype == torch.uint8
    best = next(r for r in rows if int(r["epoch"]) == meta["epoch"])
    loss, acc = evaluate(model, data.x_val, data.y_val, transform=data.normalize)
    assert (loss, acc) == (pytest.approx(float(best["val_loss"]), rel=1e-6),
                           pytest.approx(float(best["val_acc"]), abs=1e-12))
