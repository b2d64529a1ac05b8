r"""What the transfer study measures on a fine-tuned run, and the pretrained backbone it starts
from (:func:`pretrain`: one source run per setting, :data:`SOURCES`, :data:`PRETRAIN`).

A fine-tuning run starts from a *backbone*: the pretrained model's ``state_dict`` without its
head (the last ``nn.Linear``), written as a plain ``.safetensors`` state dict
(:func:`write_backbone`). ``--init-from BACKBONE --init-partial`` then loads every other tensor
(BatchNorm buffers included) and leaves the head with the fresh initialisation of the run's
seed: a **new head**, as the paper's fine-tuning, even though source and target both have five
classes (the head's shape would match).

:func:`measure` evaluates the run's best-validation checkpoint ``W`` (model in eval mode, so
BatchNorm uses its running statistics) on the target's training split (the examples the run
trained on, at most ``samples``), loss = mean cross-entropy:

* ``train_loss_at_w``: the clean loss :math:`f(W)`;
* ``trace``, ``trace_se``: :math:`\operatorname{tr} H` of the full Hessian (every parameter),
  Hutch++ with ``trace_matvecs`` products, and its standard error;
* ``lambda1``: the top eigenvalue of the full Hessian (restarted Lanczos, Ritz residual
  ``eigen_tol``);
* ``trace_paper``: the paper's trace, over conv and head weights only
  (:func:`~flatlab.hessian.paper_parameters`), by :func:`~flatlab.hessian.paper_trace`
  (Hutchinson, stop at 1e-3 relative change, at most 100 probes);
* ``lambda_paper``: :func:`~flatlab.hessian.paper_top_eigenvalue` on each minibatch of
  ``paper_batch`` examples (in order; the last may be smaller) over those weights, averaged by
  :func:`~flatlab.hessian.batch_mean`, as the official script;
* ``norm_trace``: :math:`\sum_l \lVert W_l\rVert^2 \operatorname{tr}(H_{ll}) / n_l` from the
  paper trace's per-layer breakdown;
* ``dist_from_init``: :math:`\lVert W - W_{\text{pretrained}}\rVert_2` over the tensors loaded
  from the backbone that are parameters (the new head has no pretrained value);
* ``weight_norm``: :math:`\lVert W\rVert_2` over all parameters;
* ``sigma_rel``: the noise scale relative to the weights,
  :math:`\sqrt{\mathbb E\lVert U\rVert^2} / \lVert W\rVert` at ``W`` (NSO/RWP only): absolute
  noise :math:`\sigma \sqrt P`; filter noise :math:`\sigma \sqrt{\sum_t \lVert W_t\rVert^2
  m_t}` with :math:`m_t` the entries per output filter of tensor :math:`t` (the whole tensor
  for a bias);
* ``test_acc_best``, ``test_acc_last``: accuracy on the real test split (the target classes)
  of the best-validation checkpoint and of the last epoch.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from flatlab.checkpoint import load_model
from flatlab.checkpoint.files import read_weights, write_safetensors
from flatlab.data import Dataset
from flatlab.hessian import (
    HessianOperator,
    batch_mean,
    norm_trace,
    paper_parameters,
    paper_top_eigenvalue,
    paper_trace,
    top_eigenvalues,
    trace,
)
from flatlab.study.plan import Setting, digest, key_config
from flatlab.study.runner import train_or_resume
from flatlab.train import TrainConfig

MEASURE_COLUMNS = (
    "test_acc_best", "test_acc_last", "train_loss_at_w", "trace", "trace_se", "trace_paper",
    "trace_paper_se", "lambda1", "lambda1_residual", "lambda_paper", "lambda_paper_se",
    "norm_trace", "dist_from_init", "weight_norm", "sigma_rel", "best_epoch", "val_acc_best")


def head_names(model: nn.Module) -> list[str]:
    """Parameter names of the head: the last ``nn.Linear`` in module order."""
    heads = [prefix for prefix, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not heads:
        raise ValueError(f"{type(model).__name__} has no nn.Linear head")
    return [f"{heads[-1]}.{name}" for name, _ in
            dict(model.named_modules())[heads[-1]].named_parameters()]


def backbone_state(model: nn.Module) -> dict[str, Tensor]:
    """``model.state_dict()`` without the head's tensors (buffers kept), contiguous copies."""
    head = set(head_names(model))
    return {name: tensor.detach().clone().contiguous()
            for name, tensor in model.state_dict().items() if name not in head}


def write_backbone(checkpoint: str | Path, path: str | Path) -> list[str]:
    """Write the head-less weights of ``checkpoint`` to ``path``; return the head's names."""
    model, _ = load_model(checkpoint)
    write_safetensors(path, backbone_state(model), {})
    return head_names(model)


def distance_from(model: nn.Module, reference: Mapping[str, Tensor]) -> float:
    """:math:`\\lVert W - W_0\\rVert_2` over the parameters named in ``reference``."""
    total = 0.0
    for name, param in model.named_parameters():
        if name in reference:
            total += float((param.detach().double() - reference[name].double()).square().sum())
    return math.sqrt(total)


def weight_norm(model: nn.Module) -> float:
    return math.sqrt(sum(float(p.detach().double().square().sum())
                         for p in model.parameters()))


def relative_noise(model: nn.Module, sigma: float, noise: str) -> float:
    """:math:`\\sqrt{\\mathbb E\\lVert U\\rVert^2} / \\lVert W\\rVert` for NSO's noise at the
    model's weights (see the module docstring)."""
    params = [p.detach().double() for p in model.parameters()]
    norm2 = sum(float(p.square().sum()) for p in params)
    if noise == "absolute":
        expected = sigma ** 2 * sum(p.numel() for p in params)
    elif noise == "filter":
        expected = sigma ** 2 * sum(float(p.square().sum()) * (p.numel() if p.dim() < 2 else
                                                              p[0].numel()) for p in params)
    else:
        raise ValueError(f"noise must be 'absolute' or 'filter', got {noise!r}")
    return math.sqrt(expected / norm2)


@torch.no_grad()
def accuracy_and_loss(model: nn.Module, x: Tensor, y: Tensor, batch: int = 512
                      ) -> tuple[float, float]:
    """Accuracy and mean cross-entropy in eval mode."""
    model.eval()
    correct, loss = 0, 0.0
    for start in range(0, len(y), batch):
        out = model(x[start:start + batch])
        correct += int((out.argmax(1) == y[start:start + batch]).sum())
        loss += float(nn.functional.cross_entropy(out, y[start:start + batch], reduction="sum"))
    return correct / len(y), loss / len(y)


def measure(best: Path, last: Path, backbone: Path, train: Dataset, test: Dataset, *,
            samples: int = 1000, trace_matvecs: int = 100, eigen_tol: float = 1e-4,
            paper_batch: int = 32, paper_max_iter: int = 100, paper_tol: float = 1e-3,
            seed: int = 0, paper: bool = True,
            sigma: float | None = None, noise: str | None = None) -> dict:
    """The measurement columns of one run (module docstring). ``train`` holds the training
    split the run used (validation held out), ``test`` the real test split; ``paper=False``
    skips λ1 and the paper's quantities (the cheap measurement of sweep runs)."""
    model, meta = load_model(best)
    model.eval()
    x, y = train.x_train[:samples], train.y_train[:samples]
    loss_fn = nn.CrossEntropyLoss()
    row: dict = {"best_epoch": meta.get("epoch")}
    row["test_acc_best"] = accuracy_and_loss(model, test.x_test, test.y_test)[0]
    last_model, _ = load_model(last)
    row["test_acc_last"] = accuracy_and_loss(last_model, test.x_test, test.y_test)[0]
    row["train_loss_at_w"] = accuracy_and_loss(model, x, y)[1]
    reference, _ = read_weights(backbone)
    row["dist_from_init"] = distance_from(model, reference)
    row["weight_norm"] = weight_norm(model)
    if sigma is not None and noise is not None:
        row["sigma_rel"] = relative_noise(model, sigma, noise)
    batches = [(x[i:i + 256], y[i:i + 256]) for i in range(0, len(y), 256)]
    op = HessianOperator(model, loss_fn, batches, mode="eval")
    full = trace(op, num_matvecs=trace_matvecs, method="hutch++", seed=seed)
    row.update(trace=full.estimate, trace_se=full.stderr)
    if not paper:
        return row
    eig = top_eigenvalues(op, k=1, tol=eigen_tol, seed=seed)
    row.update(lambda1=float(eig.eigenvalues[0]), lambda1_residual=float(eig.residuals[0]))
    names = paper_parameters(model)
    paper_op = HessianOperator(model, loss_fn, batches, params=names, mode="eval")
    tr = paper_trace(paper_op, seed=seed)
    row.update(trace_paper=tr.estimate, trace_paper_se=tr.stderr,
               norm_trace=norm_trace(tr, model).estimate)
    per_batch = [paper_top_eigenvalue(HessianOperator(model, loss_fn, (x[i:i + paper_batch],
                                                                       y[i:i + paper_batch]),
                                                      params=names, mode="eval"),
                                      max_iter=paper_max_iter, tol=paper_tol, seed=seed)
                 for i in range(0, len(y), paper_batch)]
    mean = batch_mean(per_batch)
    row.update(lambda_paper=mean.estimate, lambda_paper_se=mean.stderr)
    return row


# --------------------------------------------------------------------------- pretraining

# The source task of each setting: TrainConfig fields of its one pretraining run.
SOURCES: dict[str, dict] = {
    "mnist1d-cnn1d-bn": {"dataset_kwargs": {"classes": [0, 1, 2, 3, 4], "num_samples": 25000,
                                            "generation_seed": 7}, "epochs": 10},
    "digits-resnet8": {"dataset_kwargs": {"classes": [0, 1, 2, 3, 4]}, "epochs": 30},
}
PRETRAIN = {"optimizer": "sgd", "base_optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0,
            "batch_size": 64, "schedule": "cosine", "seed": 0, "device": "cpu"}


def pretrain_config(setting: Setting, runs_dir: Path, *, epochs: int | None = None
                    ) -> TrainConfig:
    """The source model's run: the setting's data set and model on the source classes."""
    source = SOURCES[setting.name]
    fields = dict(PRETRAIN, dataset=setting.dataset, dataset_kwargs=source["dataset_kwargs"],
                  model=setting.model, model_kwargs=dict(setting.model_kwargs),
                  epochs=epochs or source["epochs"])
    key = digest(key_config(fields))[:8]
    return TrainConfig(**fields, out=str(runs_dir / setting.name / f"pretrain-{key}")).validate()


def pretrain(config: TrainConfig) -> dict:
    """Train (or reuse) a source model, write its head-less ``backbone.safetensors`` beside
    it; return ``{"backbone", "test_acc", "seconds", "status"}``."""
    run_dir = Path(config.out)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(run_dir.with_name(run_dir.name + ".log"), "a", encoding="utf-8") as log, \
            contextlib.redirect_stdout(log):
        outcome = train_or_resume(config, progress=False)
    backbone = backbone_path(config)
    if not backbone.is_file():
        write_backbone(outcome.checkpoint, backbone)
    last = outcome.metrics[-1]
    return {"backbone": str(backbone), "test_acc": float(last["test_acc"]),
            "seconds": float(last["seconds"]), "status": outcome.status}


def backbone_path(config: TrainConfig) -> Path:
    """Where :func:`pretrain` writes the head-less weights of the source run ``config``."""
    run_dir = Path(config.out)
    return run_dir.with_name(run_dir.name + "-backbone.safetensors")
