"""Everything a run trains with, built from a :class:`TrainConfig`: data, model, optimizer.

Under torchrun the model is wrapped in ``DistributedDataParallel`` (``Parts.model``, what the
steps call) around the network itself (``Parts.module``, what is saved, loaded and evaluated);
the replicas start from rank 0's weights. ``--init-from`` weights are loaded before wrapping.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from flatlab import distributed
from flatlab.checkpoint import InitReport, init_from
from flatlab.data import Dataset, load_dataset
from flatlab.errors import FlatlabError
from flatlab.models import build_model
from flatlab.optim import build_optimizer, gradient_evaluations_per_step
from flatlab.runtime import resolve_device, seed_everything, set_threads
from flatlab.training.config import TrainConfig
from flatlab.training.schedule import batches_of, epoch_order, lr_factor

AUGMENT_SALT = 0x5EED_A06  # the augmentation stream differs from the init/data-order stream


@dataclass
class Parts:
    """The objects of one run (tensors already on ``device``, stored as the data set keeps
    them: pass batches through ``data.normalize``)."""

    data: Dataset
    module: nn.Module
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    criterion: nn.Module
    device: torch.device
    world: int
    threads: int
    grad_evals_per_step: int
    batches_per_epoch: int
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    x_val: Tensor | None = None
    y_val: Tensor | None = None
    augment: torch.Generator | None = None     # the crop-flip stream (--augment crop-flip)
    scaler: torch.amp.GradScaler | None = None  # --precision fp16
    init_report: InitReport | None = None      # --init-from, fresh runs only

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.module.parameters())


def build(config: TrainConfig, *, fresh: bool = True, trust_code: bool = False,
          trust_pickle: bool = False) -> Parts:
    """Seed, then build data, model, optimizer and scheduler as ``config`` says. A ``fresh``
    run loads ``config.init_from`` (a resumed one gets its weights from its state).
    ``trust_code`` allows importing a ``package.module:factory`` model or data set;
    ``trust_pickle`` reading a ``torch.save`` file for ``init_from``."""
    device = distributed.device_for(resolve_device(config.device))
    world = distributed.world_size()
    if config.batch_size % world:
        raise FlatlabError(f"--batch-size {config.batch_size} (the global batch) must be "
                           f"divisible by the number of processes, {world}")
    seed_everything(config.seed)
    data = load_dataset(config.dataset, seed=config.data_seed, data_dir=config.data_dir,
                        trust_code=trust_code, **config.dataset_kwargs)
    _check_data(config, data)
    module = build_model(config.model, data.input_shape, data.num_classes,
                         trust_code=trust_code, **config.model_kwargs)
    report = None
    if fresh and config.init_from is not None:
        report = init_from(module, config.init_from, prefix=config.init_prefix,
                           partial=config.init_partial, trust_pickle=trust_pickle)
    module = module.to(device)
    module.train()
    threads = set_threads(config.threads, sum(p.numel() for p in module.parameters()), device)
    model = distributed.wrap_model(module)
    optimizer = _optimizer(config, model)
    batches_per_epoch = len(batches_of(epoch_order(len(data.y_train), 0, 0, world_size=world),
                                       config.batch_size // world))
    total_steps = config.epochs * batches_per_epoch
    drop_every = config.step_every * batches_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(
        config.schedule, step, total_steps, gamma=config.gamma, drop_every=drop_every))
    x_test, y_test = data.x_test.to(device), data.y_test.to(device)
    return Parts(
        data=data, module=module, model=model, optimizer=optimizer, scheduler=scheduler,
        criterion=nn.CrossEntropyLoss(label_smoothing=config.label_smoothing), device=device,
        world=world, threads=threads, grad_evals_per_step=gradient_evaluations_per_step(optimizer),
        batches_per_epoch=batches_per_epoch,
        x_train=data.x_train.to(device), y_train=data.y_train.to(device),
        x_test=x_test, y_test=y_test, x_val=_on(data.x_val, device, data.x_test, x_test),
        y_val=_on(data.y_val, device, data.y_test, y_test),
        augment=_augment_stream(config), init_report=report,
        scaler=torch.amp.GradScaler(device.type) if config.precision == "fp16" else None)


def _check_data(config: TrainConfig, data: Dataset) -> None:
    if config.augment == "crop-flip" and len(data.input_shape) != 3:
        raise FlatlabError(f"--augment crop-flip needs images (C, H, W); {config.dataset} has "
                           f"input shape {tuple(data.input_shape)}")
    if config.keep == "best" and not data.has_validation:
        raise FlatlabError(f"--keep best needs a validation split: {config.dataset} has none; "
                           f"add --dataset-arg validation_fraction=0.1 (or a val/ folder)")


def _on(x: Tensor | None, device: torch.device, test: Tensor, test_on_device: Tensor
        ) -> Tensor | None:
    """A validation tensor on ``device``; the test tensor itself when they are one split
    (``validation_fraction``), so it is evaluated once."""
    if x is None:
        return None
    return test_on_device if x is test else x.to(device)


def _augment_stream(config: TrainConfig) -> torch.Generator | None:
    """The crop-flip generator: seeded from ``seed`` and the rank, nothing else draws from it."""
    if config.augment == "none":
        return None
    seed = (config.seed * 1_000_003 + AUGMENT_SALT + distributed.rank()) % 2**63
    return torch.Generator().manual_seed(seed)


def _optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    try:
        return build_optimizer(
            config.optimizer, model.parameters(), lr=config.lr, momentum=config.momentum,
            weight_decay=config.weight_decay, sigma=config.sigma,
            num_perturbs=config.num_perturbs, rho=config.rho, noise=config.noise,
            clean_weight=config.clean_weight, clean_pass=config.clean_pass or None,
            seed=config.seed, base=config.base_optimizer,
            model=model, independent_noise=config.independent_noise,
            base_kwargs=config.base_kwargs)
    except FlatlabError:
        raise
    except (TypeError, ValueError) as err:  # the arguments' fault, whatever the class says
        given = "".join(f" --base-arg {k}={v}" for k, v in config.base_kwargs.items())
        raise FlatlabError(f"--optimizer {config.optimizer}{given}: {err}") from None
