"""Everything a run trains with, built from a :class:`TrainConfig`: data, model, optimizer.

Under torchrun the model is wrapped in ``DistributedDataParallel`` (``Parts.model``, what the
steps call) around the network itself (``Parts.module``, what is saved, loaded and evaluated);
the replicas start from rank 0's weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from flatlab import distributed
from flatlab.data import Dataset, load_dataset
from flatlab.errors import FlatlabError
from flatlab.models import build_model
from flatlab.optim import build_optimizer, gradient_evaluations_per_step
from flatlab.runtime import resolve_device, seed_everything, set_threads
from flatlab.training.config import TrainConfig
from flatlab.training.schedule import batches_of, epoch_order, lr_factor


@dataclass
class Parts:
    """The objects of one run (tensors already on ``device``)."""

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

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.module.parameters())


def build(config: TrainConfig) -> Parts:
    """Seed, then build data, model, optimizer and scheduler as ``config`` says."""
    device = distributed.device_for(resolve_device(config.device))
    world = distributed.world_size()
    if config.batch_size % world:
        raise FlatlabError(f"--batch-size {config.batch_size} (the global batch) must be "
                           f"divisible by the number of processes, {world}")
    seed_everything(config.seed)
    data = load_dataset(config.dataset, seed=config.data_seed, data_dir=config.data_dir,
                        **config.dataset_kwargs)
    module = build_model(config.model, data.input_shape, data.num_classes,
                         **config.model_kwargs).to(device)
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
    return Parts(
        data=data, module=module, model=model, optimizer=optimizer, scheduler=scheduler,
        criterion=nn.CrossEntropyLoss(label_smoothing=config.label_smoothing), device=device,
        world=world, threads=threads, grad_evals_per_step=gradient_evaluations_per_step(optimizer),
        batches_per_epoch=batches_per_epoch,
        x_train=data.x_train.to(device), y_train=data.y_train.to(device),
        x_test=data.x_test.to(device), y_test=data.y_test.to(device))


def _optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    try:
        return build_optimizer(
            config.optimizer, model.parameters(), lr=config.lr, momentum=config.momentum,
            weight_decay=config.weight_decay, sigma=config.sigma,
            num_perturbs=config.num_perturbs, rho=config.rho, noise=config.noise,
            clean_weight=config.clean_weight, seed=config.seed, base=config.base_optimizer,
            model=model, independent_noise=config.independent_noise)
    except FlatlabError:
        raise
    except ValueError as err:
        raise FlatlabError(f"--optimizer {config.optimizer}: {err}") from None
