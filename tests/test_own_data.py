"""Analysis of your own data and weights: image folders (uint8, normalised per batch), plain state
dicts with ``--model``/``--dataset``, factories named by a checkpoint (``--trust-code``)."""

from __future__ import annotations

import copy
import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from fabricate_images import make_image_folder
from safetensors.torch import save_file
from test_hessian_operator import exact_hessian
from torch import nn

from flatlab.analysis import AnalyzeOptions, analyze, load_checkpoints
from flatlab.analysis.cli import main as analyze_main
from flatlab.checkpoint import load_model
from flatlab.data import load_dataset
from flatlab.errors import run_cli
from flatlab.training.cli import main as train_main

CE = nn.CrossEntropyLoss()
MLP = ["--model", "mlp", "--model-arg", "hidden=[6]"]


def train_cli(args, capsys):
    code = run_cli(train_main, [*args, "--no-progress"], prog="flatlab.train")
    return code, capsys.readouterr()


def analyze_cli(args, capsys):
    code = run_cli(analyze_main, [*args, "--no-progress"], prog="flatlab.analyze")
    return code, capsys.readouterr()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """3 classes of 6x6 RGB PNGs: 8 train, 2 val, 3 test each."""
    return make_image_folder(tmp_path_factory.mktemp("own") / "imgs", classes=3, size=6,
                             train=8, val=2, test=3)


@pytest.fixture(scope="module")
def run(images, tmp_path_factory) -> Path:
    """An MLP trained 2 epochs on the image folder (stored as uint8)."""
    out = tmp_path_factory.mktemp("runs") / "folder"
    code = run_cli(train_main, ["--dataset", "folder", "--data-dir", str(images), *MLP,
                                "--epochs", "2", "--batch-size", "8", "--lr", "0.3",
                                "--schedule", "none", "--out", str(out), "--no-progress"],
                   prog="flatlab.train")
    assert code == 0
    return out


def direct_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        logits = model.eval()(x)
    return float(CE(logits, y)), float((logits.argmax(1) == y).double().mean())


# --------------------------------------------------------------------------- normalised batches

def test_folder_analysis_sees_normalised_images(run, images):
    options = AnalyzeOptions(trace=False, eigenvalues=3, density=False, landscape=("1d",),
                             grid_points=3, samples=None, batch_size=7, progress=False)
    [result] = analyze([run], options).checkpoints
    data = load_dataset("folder", data_dir=images)
    assert data.x_train.dtype == torch.uint8
    model, _ = load_model(run / "model.safetensors")
    x = data.normalize(data.x_train)
    loss, acc = direct_loss(model, x, data.y_train)
    # batches of 7 weighted by n_b / N against one batch of 24: float32 rounding only
    assert result.loss == pytest.approx(loss, rel=1e-6)
    assert result.accuracy == acc
    assert result.landscape_1d.loss[1] == pytest.approx(loss, rel=1e-6)  # alpha = 0
    # the model on unnormalised pixels is somewhere else entirely: the check above can fail
    assert abs(direct_loss(model, data.x_train.float(), data.y_train)[0] - loss) > 0.1
    # Hessian products on normalised batches: the dense Hessian's top eigenvalues
    dense = exact_hessian(copy.deepcopy(model).double(), x.double(), data.y_train)
    top = torch.linalg.eigvalsh(dense).flip(0)[:3]
    torch.testing.assert_close(torch.tensor(result.eigenvalues, dtype=torch.float64), top,
                               rtol=1e-4, atol=0)


def test_builtin_float_data_is_not_touched(tmp_path):
    """normalize is the identity for float storage: the batches are the stored tensors."""
    data = load_dataset("synthetic", train_size=20, test_size=5, input_shape=[4],
                        num_classes=2)
    assert data.x_train.dtype == torch.float32
    assert data.normalize(data.x_train) is data.x_train


# --------------------------------------------------------------------------- plain state dicts

def test_plain_state_dict_with_model_and_dataset_on_the_command_line(run, images, tmp_path,
                                                                      capsys):
    model, _ = load_model(run / "model.safetensors")
    plain = tmp_path / "plain.safetensors"
    save_file({f"module.{k}": v for k, v in model.state_dict().items()}, plain)  # DDP names
    folder = ["--dataset", "folder", "--data-dir", str(images)]
    args = [str(plain), *MLP, *folder, "--landscape", "1d", "--grid-points", "3",
            "--samples", "all", "--out", str(tmp_path / "a")]
    code, out = analyze_cli(args, capsys)
    assert code == 0, out.err
    [entry] = json.loads((tmp_path / "a" / "analysis.json").read_text())["checkpoints"]
    data = load_dataset("folder", data_dir=images)
    loss, acc = direct_loss(model, data.normalize(data.x_train), data.y_train)
    assert entry["loss"] == pytest.approx(loss, rel=1e-6) and entry["accuracy"] == acc
    assert entry["model"]["name"] == "mlp" and entry["model"]["kwargs"] == {"hidden": [6]}
    assert entry["dataset"]["name"] == "folder" and entry["dataset"]["fingerprint"]

    # the same weights as a torch.save file: only with --trust-pickle
    pickled = tmp_path / "plain.pt"
    torch.save(model.state_dict(), pickled)
    pt_args = [str(pickled), *MLP, *folder, "--landscape", "1d", "--grid-points", "3",
               "--samples", "all", "--out", str(tmp_path / "p")]
    code, out = analyze_cli(pt_args, capsys)
    assert code == 2 and "--trust-pickle" in out.err and not (tmp_path / "p").exists()
    code, out = analyze_cli([*pt_args, "--trust-pickle"], capsys)
    assert code == 0, out.err
    [entry_pt] = json.loads((tmp_path / "p" / "analysis.json").read_text())["checkpoints"]
    assert entry_pt["loss"] == entry["loss"]

    # what is missing is named, exit 2, nothing written
    for drop, says in (((0, 1, 2, 3), "--model NAME"), ((4, 5, 6, 7), "--dataset NAME")):
        kept = [a for i, a in enumerate([*MLP, *folder]) if i not in drop]
        code, out = analyze_cli([str(plain), *kept, "--out", str(tmp_path / "x")], capsys)
        assert code == 2 and "plain state dict" in out.err and says in out.err
        assert len(out.err.strip().splitlines()) == 1 and not (tmp_path / "x").exists()
    code, out = analyze_cli([str(run), "--model-arg", "hidden=[6]", "--out",
                             str(tmp_path / "x")], capsys)
    assert code == 2 and "--model-arg" in out.err and "--model" in out.err
    code, out = analyze_cli([str(plain), "--model", "mlp", "--model-arg", "hidden", *folder],
                            capsys)
    assert code == 2 and "--model-arg expects KEY=VALUE" in out.err


def test_timm_state_dict_analysed_with_model_arg(images, tmp_path, capsys):
    """The issue's command line: a plain .safetensors from timm, named on the command line."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=3)
    save_file(model.state_dict(), tmp_path / "resnet10t.safetensors")
    args = [str(tmp_path / "resnet10t.safetensors"), "--model", "timm:create_model",
            "--model-arg", 'model_name="resnet10t"', "--dataset", "folder", "--data-dir",
            str(images), "--dataset-arg", "image_size=16", "--landscape", "1d",
            "--grid-points", "3", "--samples", "6", "--out", str(tmp_path / "a")]
    code, out = analyze_cli(args, capsys)
    assert code == 0, out.err
    [entry] = json.loads((tmp_path / "a" / "analysis.json").read_text())["checkpoints"]
    data = load_dataset("folder", data_dir=images, image_size=16)
    [ck] = load_checkpoints([tmp_path / "resnet10t.safetensors"], AnalyzeOptions(
        model="timm:create_model", model_kwargs={"model_name": "resnet10t"}, dataset="folder",
        dataset_kwargs={"image_size": 16}, data_dir=str(images)))
    indices = torch.randperm(24, generator=torch.Generator().manual_seed(0))[:6].sort().values
    loss, _ = direct_loss(ck.model, data.normalize(data.x_train[indices]), data.y_train[indices])
    assert entry["loss"] == pytest.approx(loss, rel=1e-5)
    assert entry["model"]["kwargs"] == {"model_name": "resnet10t"}
    assert entry["model"]["input_shape"] == [3, 16, 16]


# --------------------------------------------------------------------------- consent

def test_factory_named_by_a_checkpoint_needs_consent(images, tmp_path, monkeypatch, capsys):
    marker = tmp_path / "imported"
    (tmp_path / "own_models.py").write_text(textwrap.dedent(f"""
        import math
        from torch import nn
        open({str(marker)!r}, "a").write("x")

        def linear(num_classes, input_shape):
            return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    code, out = train_cli(["--dataset", "folder", "--data-dir", str(images), "--model",
                           "own_models:linear", "--epochs", "1", "--out",
                           str(tmp_path / "r")], capsys)
    assert code == 0, out.err
    sys.modules.pop("own_models")
    marker.unlink()
    base = [str(tmp_path / "r"), "--landscape", "1d", "--grid-points", "3", "--samples", "4"]
    code, out = analyze_cli([*base, "--out", str(tmp_path / "no")], capsys)
    assert code == 2 and "would import module 'own_models'" in out.err
    assert "--trust-code" in out.err and not marker.exists()
    assert not (tmp_path / "no").exists()
    assert analyze_cli([*base, "--trust-code", "--out", str(tmp_path / "yes")], capsys)[0] == 0
    assert marker.exists()
    # naming the factory on the command line is consent as well
    code, out = analyze_cli([*base, "--model", "own_models:linear", "--out",
                             str(tmp_path / "named")], capsys)
    assert code == 0, out.err
    one = json.loads((tmp_path / "yes" / "analysis.json").read_text())["checkpoints"][0]
    two = json.loads((tmp_path / "named" / "analysis.json").read_text())["checkpoints"][0]
    assert one["loss"] == two["loss"]
