"""flatlab.study.transfer: class subsets (relabelled, sized), cnn1d with BatchNorm, the new
head, the measurement columns on a model small enough for a dense Hessian, seed-averaged
selection, the stretched step schedule, and the --quick study end to end (slow)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from flatlab.checkpoint import init_from
from flatlab.checkpoint.files import read_weights
from flatlab.data import load_dataset
from flatlab.data.builtin import class_subset
from flatlab.errors import FlatlabError
from flatlab.hessian import paper_parameters
from flatlab.models import build_model
from flatlab.study import plan, transfer
from flatlab.study.statistics import select_hyperparameters
from flatlab.study.transfer_measure import (
    MEASURE_COLUMNS,
    backbone_state,
    distance_from,
    head_names,
    measure,
    relative_noise,
    write_backbone,
)
from flatlab.train import TrainConfig, train

# --------------------------------------------------------------------------- data subsets


def test_class_subset_relabels_in_the_given_order_and_limits_the_training_split():
    x = np.arange(12, dtype=np.float32)[:, None]
    y = np.array([0, 1, 2, 3, 2, 1, 0, 3, 2, 2, 1, 0])
    xs, ys, xt, yt, k = class_subset(x, y, x[:4], y[:4], 4, [2, 0], train_size=4)
    assert k == 2
    assert xs[:, 0].tolist() == [0, 2, 4, 6] and ys.tolist() == [1, 0, 0, 1]  # 2 -> 0, 0 -> 1
    assert xt[:, 0].tolist() == [0, 2] and yt.tolist() == [1, 0]
    with pytest.raises(FlatlabError, match="classes"):
        class_subset(x, y, x, y, 4, [1, 1])
    with pytest.raises(FlatlabError, match="train_size"):
        class_subset(x, y, x, y, 4, [1], train_size=4)  # only 3 examples of class 1


def test_digits_target_classes_are_relabelled_and_counted():
    full = load_dataset("digits")
    target = load_dataset("digits", classes=[5, 6, 7, 8, 9])
    assert target.num_classes == 5
    for new, old in enumerate((5, 6, 7, 8, 9)):
        assert int((target.y_train == new).sum()) == int((full.y_train == old).sum())
        assert int((target.y_test == new).sum()) == int((full.y_test == old).sum())
    # the same examples, standardised with the subset's statistics: an affine map of the full
    mine = full.x_train[full.y_train == 7]
    theirs = target.x_train[target.y_train == 2]
    scale = (theirs[0] - theirs[1]).norm() / (mine[0] - mine[1]).norm()
    assert torch.allclose((theirs - theirs[0]), scale * (mine - mine[0]), atol=1e-5)


def test_mnist1d_target_split_sizes():
    data = load_dataset("mnist1d", **transfer.MNIST1D_TARGET,
                        validation_fraction=transfer.VALIDATION["mnist1d-cnn1d-bn"])
    assert (len(data.y_train), len(data.y_val)) == (500, 250)
    assert data.num_classes == 5 and int(data.y_train.max()) == 4
    test = load_dataset("mnist1d", **transfer.MNIST1D_TARGET).y_test
    standard = load_dataset("mnist1d").y_test
    assert len(test) == int((standard >= 5).sum())


# --------------------------------------------------------------------------- model and head


def test_cnn1d_batch_norm_keeps_the_plain_names_and_adds_norm_layers():
    plain = build_model("cnn1d", (40,), 10)
    assert [n for n, _ in plain.named_parameters()] == [
        "features.0.weight", "features.0.bias", "features.2.weight", "features.2.bias",
        "features.4.weight", "features.4.bias", "classifier.weight", "classifier.bias"]
    bn = build_model("cnn1d", (40,), 5, channels=8, norm="batch")
    assert sum(isinstance(m, nn.BatchNorm1d) for m in bn.modules()) == 3
    assert all(m.bias is None for m in bn.modules() if isinstance(m, nn.Conv1d))
    assert paper_parameters(bn) == ["features.0.weight", "features.3.weight",
                                    "features.6.weight", "classifier.weight"]
    with pytest.raises(FlatlabError, match="norm"):
        build_model("cnn1d", (40,), 5, norm="layer")


def test_backbone_leaves_a_fresh_seeded_head(tmp_path):
    torch.manual_seed(0)
    source = build_model("cnn1d", (40,), 5, channels=8, norm="batch")
    source.features[1].running_mean.add_(1.0)  # a buffer the backbone must carry
    assert head_names(source) == ["classifier.weight", "classifier.bias"]
    state = backbone_state(source)
    assert "classifier.weight" not in state and "features.1.running_mean" in state
    path = tmp_path / "backbone.safetensors"
    from flatlab.checkpoint.files import write_safetensors
    write_safetensors(path, state, {})
    torch.manual_seed(1)
    target = build_model("cnn1d", (40,), 5, channels=8, norm="batch")
    fresh_head = target.classifier.weight.detach().clone()
    report = init_from(target, path, partial=True)
    assert sorted(report.missing) == ["classifier.bias", "classifier.weight"]
    for name, tensor in source.state_dict().items():
        if name.startswith("classifier"):
            continue
        assert torch.equal(target.state_dict()[name], tensor), name
    assert torch.equal(target.classifier.weight, fresh_head)
    assert not torch.equal(target.classifier.weight, source.classifier.weight)


# --------------------------------------------------------------------------- measurements


def test_distance_and_relative_noise_exact():
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.copy_(torch.arange(p.numel(), dtype=torch.float32).reshape(p.shape) + i)
    reference = {"0.weight": torch.zeros(3, 2), "1.bias": torch.full((1,), 5.0)}
    expected = math.sqrt(sum(v * v for v in range(6)) + (0 + 3 - 5) ** 2)  # 1.bias = 0 + 3
    assert distance_from(model, reference) == pytest.approx(expected, rel=1e-12)
    params = [p.detach().double() for p in model.parameters()]
    norm = math.sqrt(sum(float(p.square().sum()) for p in params))
    assert relative_noise(model, 0.1, "absolute") == pytest.approx(0.1 * math.sqrt(13) / norm)
    # filter: E||U||² = σ² Σ_t ||W_t||² m_t (m = entries per output filter; a bias is one)
    m = [2, 3, 3, 1]
    filt = math.sqrt(sum(0.01 * float(p.square().sum()) * k for p, k in zip(params, m,
                                                                             strict=True)))
    assert relative_noise(model, 0.1, "filter") == pytest.approx(filt / norm, rel=1e-12)


def _tiny_run(tmp_path: Path) -> tuple[TrainConfig, Path]:
    """A 2-epoch fine-tuning run of a tiny BN cnn1d on synthetic data, from a backbone."""
    data = {"train_size": 96, "test_size": 40, "input_shape": [12], "num_classes": 3}
    source = TrainConfig(dataset="synthetic", dataset_kwargs=data, model="cnn1d",
                         model_kwargs={"channels": 3, "norm": "batch"}, epochs=1,
                         batch_size=32, lr=0.01, device="cpu", out=str(tmp_path / "src"))
    train(source, progress=False)
    backbone = tmp_path / "backbone.safetensors"
    write_backbone(tmp_path / "src" / "model.safetensors", backbone)
    config = TrainConfig(dataset="synthetic", model="cnn1d", seed=3,
                         dataset_kwargs=dict(data, validation_fraction=0.25),
                         model_kwargs={"channels": 3, "norm": "batch"}, epochs=2, batch_size=16,
                         optimizer="sgd", base_optimizer="adam", lr=0.01, weight_decay=0.0,
                         keep="best", init_from=str(backbone), init_partial=True,
                         device="cpu", out=str(tmp_path / "run"))
    train(config, progress=False)
    return config, backbone


def test_measure_columns_against_a_dense_hessian(tmp_path):
    config, backbone = _tiny_run(tmp_path)
    run = Path(config.out)
    trainset, testset = transfer.splits(config)
    row = measure(run / "best.safetensors", run / "model.safetensors", backbone, trainset,
                  testset, samples=1000, trace_matvecs=400, eigen_tol=1e-6, paper_batch=32,
                  paper_max_iter=500, paper_tol=1e-12, sigma=0.01, noise="absolute")
    assert set(MEASURE_COLUMNS) - {"val_acc_best"} <= set(row)
    from flatlab.checkpoint import load_model
    model, _ = load_model(run / "best.safetensors")
    x, y = trainset.x_train, trainset.y_train
    assert len(y) == 72 and len(testset.y_test) == 40
    params = dict(model.named_parameters())
    names = list(params)

    def loss(*flat):
        out = torch.func.functional_call(model, {**dict(zip(names, flat, strict=True))}, (x,))
        return nn.functional.cross_entropy(out, y)

    model.eval()
    blocks = torch.func.hessian(loss, argnums=tuple(range(len(names))))(*params.values())
    sizes = [p.numel() for p in params.values()]
    dense = torch.cat([torch.cat([blocks[i][j].reshape(sizes[i], sizes[j])
                                  for j in range(len(names))], 1)
                       for i in range(len(names))], 0).double()
    with torch.no_grad():
        assert row["train_loss_at_w"] == pytest.approx(float(loss(*params.values())), rel=1e-5)
    assert row["lambda1"] == pytest.approx(float(torch.linalg.eigvalsh(dense)[-1]), rel=1e-4)
    assert row["trace"] == pytest.approx(float(dense.trace()), rel=1e-3)  # Hutch++, P < 400
    reference, _ = read_weights(backbone)
    expected = math.sqrt(sum(float((params[n].double() - reference[n].double()).square().sum())
                             for n in names if n in reference))
    assert row["dist_from_init"] == pytest.approx(expected, rel=1e-12)
    last, _ = load_model(run / "model.safetensors")
    with torch.no_grad():
        acc = float((last(testset.x_test).argmax(1) == testset.y_test).float().mean())
    assert row["test_acc_last"] == pytest.approx(acc, abs=1e-12)


# --------------------------------------------------------------------------- plan


def test_selection_averages_the_sweep_seeds():
    rows = pd.DataFrame({
        "phase": "sweep", "status": "ok", "setting": "s", "sweep": "nso", "optimizer": "nso",
        "hyperparameter": "sigma", "epochs": 30,
        "hyper_value": [0.01, 0.01, 0.02, 0.02], "seed": [0, 1, 0, 1],
        "test_acc": [0.90, 0.70, 0.85, 0.84], "test_loss": [0.3, 0.9, 0.4, 0.4]})
    chosen, table = select_hyperparameters(rows)
    assert chosen == {("s", "nso"): {"sigma": 0.02}}  # seed 0 alone would pick 0.01
    assert table["val_acc"].tolist() == pytest.approx([0.80, 0.845])
    assert table["seeds"].tolist() == [2, 2]


def test_transfer_plan_protocol_and_stretched_step_schedule():
    settings = transfer.stage_settings(transfer.SETTINGS, {s.name: "b.safetensors"
                                                           for s in transfer.SETTINGS},
                                       {s.name: 1e-3 for s in transfer.SETTINGS})
    study = transfer.study_config(settings)
    final = transfer.planned(study, "final", {})
    epochs_and_period = {(r.variant.name, r.config["epochs"], r.config["step_every"])
                         for r in final}
    # NSO's pass at W (BatchNorm statistics at W) is counted: k=1 3 passes, k=2 5, so SAM's
    # budget (2 passes x 30 epochs) is 20 and 12 epochs; the step period rounds 10 x e / 30
    assert {("adam", 30, 10), ("adam (2E)", 60, 20), ("nso (20 epochs)", 20, 7),
            ("nso k=2 (12 epochs)", 12, 4), ("nso k=2", 30, 10)} <= epochs_and_period
    passes = {r.variant.name: r.variant.passes for r in final}
    assert passes["nso"] == passes["nso-filter"] == 3 and passes["nso k=2"] == 5
    assert all(bool(r.config.get("clean_pass")) == (r.variant.method.optimizer == "nso")
               for r in final)
    config = final[0].config
    assert (config["base_optimizer"], config["base_kwargs"], config["weight_decay"],
            config["batch_size"], config["keep"], config["init_partial"]) == (
        "adam", {"amsgrad": True}, 0.0, 32, "best", True)
    assert config["dataset_kwargs"]["validation_fraction"] in transfer.VALIDATION.values()
    assert len({r.seed for r in final}) == 5
    sweep = transfer.planned(study, "sweep")
    assert {r.seed for r in sweep} == {0, 1}
    for name, (_, values) in transfer.SWEEP.items():
        ratios = np.array(values[1:]) / np.array(values[:-1])
        assert ratios.max() <= 1.5 * 1.01  # values rounded to 3 significant digits
        assert values[-1] / values[0] > 30, name  # wide enough to fall off on both sides
    assert transfer.SWEEP["nso"][1][0] <= 0.002 and transfer.SWEEP["sam"][1][0] <= 0.005


def test_scratch_sweeps_are_geometric_with_ratio_at_most_1_5():
    from flatlab.study import scratch

    for name in ("nso", "nso-filter"):
        values = np.array(scratch.SWEEP[name][1])
        assert (values[1:] / values[:-1]).max() <= 1.5 * 1.01  # values rounded to 3 digits
    assert plan.NOISE_STREAM_VERSION == 2


@pytest.mark.slow
def test_quick_transfer_study_end_to_end(tmp_path):
    from flatlab.study.cli import main

    out = tmp_path / "quick"
    assert main(["transfer", "--quick", "--out", str(out)]) == 0
    assert "min wall clock" in (out / "report.md").read_text(encoding="utf-8")
    results = pd.read_csv(out / "results.csv")
    for column in ("test_acc_best", "test_acc_last", "train_loss_at_w", "trace", "trace_se",
                   "trace_paper", "lambda1", "lambda_paper", "dist_from_init", "norm_trace",
                   "sigma_rel"):
        assert column in results, column
    final = results[results["phase"] == "final"]
    assert len(final) == 11 * 2 and (final["status"] == "ok").all()  # 11 variants, 2 seeds
    expected = final["optimizer"].map({"sgd": 1, "sam": 2, "asam": 2, "rwp": 2})
    expected = expected.where(final["optimizer"] != "nso", 1 + 2 * final["num_perturbs"])
    assert (final["passes_per_step"] == expected).all()  # NSO: the pass at W counts
    assert final[["trace", "lambda1", "trace_paper", "lambda_paper"]].gt(0).all().all()
    assert (final["dist_from_init"] > 0).all()
    nso = final[final["optimizer"] == "nso"]
    assert nso["sigma_rel"].notna().all()
    for name in ("index.html", "report.md", "summary.csv", "sweep.csv", "comparison.csv"):
        assert (out / name).is_file(), name
    assert list((out / "figures").glob("pareto-*.png"))
    comparison = pd.read_csv(out / "comparison.csv")
    assert {"trace_paper", "lambda_paper", "trace", "lambda1", "test_acc_best"} <= set(
        comparison["quantity"])
    # a second invocation reuses every run
    before = results["key"].tolist()
    assert main(["transfer", "--quick", "--out", str(out)]) == 0
    assert pd.read_csv(out / "results.csv")["key"].tolist() == before
    # --report-only rewrites the report from results.csv, naming the command that made it
    (out / "report.md").unlink()
    assert main(["transfer", "--quick", "--out", str(out), "--report-only"]) == 0
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "Headline" in report and "--report-only" not in report
    assert "wall clock" not in report  # a re-render does not pass its own time off as the study's
    assert pd.read_csv(out / "results.csv")["key"].tolist() == before


def test_grid_falloff_needs_a_drop_of_more_than_one_validation_example_on_each_side():
    from flatlab.study.transfer_report import edge_choices, grid_falloff

    n_val = 250  # means of 2 seeds: steps of 1/500; one example = 1/250 = 0.4 points

    def sweep(name, accs, chosen):
        return pd.DataFrame({"setting": "s", "optimizer": name, "hyperparameter": "sigma",
                             "hyper_value": [0.002 * 1.5 ** i for i in range(len(accs))],
                             # equal accuracies differ by rounding (results.csv keeps 8 digits)
                             "val_acc": [a / (2 * n_val) + 3e-9 * i for i, a in enumerate(accs)],
                             "chosen": [i == chosen for i in range(len(accs))]})
    table = pd.concat([
        sweep("nso", [440, 460, 465, 450, 420], 2),   # both ends lower by >= 5 half-examples
        sweep("sam", [464, 464, 465, 466, 400], 3),   # low end exactly one example lower
        sweep("rwp", [470, 465, 460, 455, 454], 0),   # chosen at the low edge
        sweep("asam", [462, 462, 464, 463, 462], 2),  # ends 2 half-examples = 1 example lower
    ], ignore_index=True)
    falloff = grid_falloff(table).set_index("sweep")
    assert falloff.loc["nso", "falls off"] == "both sides"
    assert falloff.loc["sam", "falls off"] == "high side only"
    assert falloff.loc["rwp", "falls off"] == "high side only"
    assert falloff.loc["asam", "falls off"] == "neither"  # exactly one example is not "more"
    assert falloff.loc["nso", "lowest value: drop (pts)"] == f"{100 * 25 / 500:.2f}"
    assert edge_choices(table) == ["s rwp sigma=0.002 (lowest of 5)"]
