"""The demo's SGD and SAM runs equal a plain PyTorch training loop, bit for bit.

The reference is flatlab 0.1.0's training loop (commit 9fc375e, which trained the committed
``reports/demo``) written out with torch primitives: MNIST-1D from the ``mnist1d`` package
(``generation_seed`` 42, 4000/1000 split), standardised once in float32 with the training set's
scalar mean and std; ``torch.manual_seed(seed)`` before ``Flatten, Linear(40, 256), ReLU,
Linear(256, 256), ReLU, Linear(256, 10)``; epoch ``e`` visits
``randperm(4000, Generator().manual_seed(seed + e))`` in batches of ``batch_size``; the
learning rate is ``lr * (1 + cos(pi * t / T)) / 2`` at step ``t`` of ``T``; cross-entropy; one
CPU thread. A change in the data (storage, normalisation, order), the initialisation, the
schedule or a default of :mod:`flatlab.training` changes the weights and fails here.

Both sides run on the same machine with the same kernels, so the comparison is exact
anywhere; a stored weight checksum would not be (the same code gives different bits -- and
MNIST-1D test accuracies from 64.4% to 64.8% after 40 epochs -- with AVX2 or AVX-512 kernels).
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from flatlab.data import load_dataset
from flatlab.optim import build_optimizer
from flatlab.study.demo import demo_configs
from flatlab.training import TrainConfig, train

EPOCHS = 2


@pytest.fixture(scope="module")
def mnist1d_arrays() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """MNIST-1D straight from the package, standardised the 0.1.0 way."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args(as_dict=True)
    args.update(num_samples=5000, train_split=0.8, shuffle_seq=False, seed=42)
    states = random.getstate(), np.random.get_state()
    try:  # make_dataset reseeds the global generators
        data = make_dataset(type("Args", (), args)())
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
    x = data["x"].astype(np.float32)
    mean, std = x.mean(), x.std()
    x_test = data["x_test"].astype(np.float32)
    return (torch.from_numpy(np.ascontiguousarray((x - mean) / std)),
            torch.from_numpy(data["y"].astype(np.int64)),
            torch.from_numpy(np.ascontiguousarray((x_test - mean) / std)),
            torch.from_numpy(data["y_test"].astype(np.int64)))


def reference_run(config: TrainConfig, arrays) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Train ``config`` (an mlp on mnist1d) with the plain loop; weights and per-epoch rows."""
    x, y, x_test, y_test = arrays
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(config.seed)
        model = nn.Sequential(nn.Flatten(), nn.Linear(40, 256), nn.ReLU(), nn.Linear(256, 256),
                              nn.ReLU(), nn.Linear(256, 10))
        if config.optimizer == "sgd":
            optimizer = torch.optim.SGD(model.parameters(), lr=config.lr,
                                        momentum=config.momentum,
                                        weight_decay=config.weight_decay)
        else:
            optimizer = build_optimizer(config.optimizer, model.parameters(), lr=config.lr,
                                        momentum=config.momentum,
                                        weight_decay=config.weight_decay, rho=config.rho,
                                        seed=config.seed)
        steps_per_epoch = math.ceil(len(y) / config.batch_size)
        total = config.epochs * steps_per_epoch
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda t: 0.5 * (1.0 + math.cos(math.pi * min(t, total) / total)))
        rows = []
        for epoch in range(config.epochs):
            order = torch.randperm(len(y), generator=torch.Generator().manual_seed(
                config.seed + epoch))
            loss_sum, count = 0.0, 0
            for index in order.split(config.batch_size):
                xb, yb = x[index], y[index]
                losses = []

                def closure(xb=xb, yb=yb, losses=losses) -> torch.Tensor:
                    optimizer.zero_grad(set_to_none=True)
                    loss = nn.functional.cross_entropy(model(xb), yb)
                    loss.backward()
                    losses.append(loss.detach())
                    return loss

                optimizer.step(closure)
                scheduler.step()
                loss_sum += float(losses[0]) * len(yb)
                count += len(yb)
            model.eval()
            with torch.no_grad():
                out = model(x_test)
            model.train()
            rows.append({"train_loss": loss_sum / count,
                         "test_loss": nn.functional.cross_entropy(
                             out, y_test, reduction="sum").item() / len(y_test),
                         "test_acc": int((out.argmax(dim=1) == y_test).sum()) / len(y_test)})
    finally:
        torch.set_num_threads(threads)
    return {name: p.detach() for name, p in model.state_dict().items()}, rows


def test_mnist1d_loads_as_the_reference_standardises_it(mnist1d_arrays):
    data = load_dataset("mnist1d")
    for got, want in zip((data.x_train, data.y_train, data.x_test, data.y_test),
                         mnist1d_arrays, strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)
    assert torch.equal(data.normalize(data.x_train[:128]), mnist1d_arrays[0][:128])


@pytest.mark.parametrize("method", ["sgd", "sam"])
def test_demo_run_equals_the_plain_loop(method, mnist1d_arrays, tmp_path):
    config = demo_configs(tmp_path, epochs=EPOCHS)[method]
    result = train(config, progress=False)
    weights, rows = reference_run(config, mnist1d_arrays)
    saved = load_file(result.checkpoint)
    assert sorted(saved) == sorted(weights)
    for name, tensor in weights.items():
        assert torch.equal(saved[name], tensor), name
    assert len(result.metrics) == EPOCHS
    for got, want in zip(result.metrics, rows, strict=True):
        assert got["train_loss"] == want["train_loss"]
        assert got["test_acc"] == want["test_acc"]
        assert got["test_loss"] == pytest.approx(want["test_loss"], rel=1e-12)
