"""HessianOperator(distributed=True) on 2 gloo processes equals one process on all the data."""

from __future__ import annotations

import pytest
import torch
from test_hessian_operator import CE, make_case

from flatlab import distributed
from flatlab.hessian import HessianOperator, spectral_density, top_eigenvalues, trace

pytestmark = pytest.mark.distributed

SPAWN_TIMEOUT = 120.0


def _shards(rank: int) -> tuple[list, list]:
    """This rank's batches: unequal shards (13 + 7 samples), and a shard that is empty on
    rank 1."""
    _, x, y = make_case("cnn")
    unequal = [(x[:7], y[:7]), (x[7:13], y[7:13])] if rank == 0 else [(x[13:], y[13:])]
    lopsided = [(x[:10], y[:10]), (x[10:], y[10:])] if rank == 0 else []
    return unequal, lopsided


def _analyses(data) -> dict:
    model = make_case("cnn")[0]
    op = HessianOperator(model, CE, data, distributed=distributed.is_initialized())
    block = torch.randn(op.size, 3, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(0))
    loss, grad = op.loss_and_gradient()
    eig = top_eigenvalues(op, k=3, max_matvecs=40)
    return {
        "products": op.matvec(block),
        "loss": loss,
        "grad": grad,
        "trace": trace(op, num_matvecs=30, method="hutch++").estimate,
        "eigenvalues": eig.eigenvalues,
        "eigenvectors": eig.eigenvectors,
        "density": spectral_density(op, num_runs=2, num_steps=8).density,
    }


def _two_rank_analyses() -> dict:
    torch.set_num_threads(1)
    unequal, lopsided = _shards(distributed.rank())
    return {"unequal": _analyses(unequal), "lopsided": _analyses(lopsided)}


@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    return distributed.spawn(_two_rank_analyses, 2, timeout=SPAWN_TIMEOUT)


@pytest.fixture(scope="module")
def one_process() -> dict:
    _, x, y = make_case("cnn")
    return _analyses([(x, y)])


@pytest.mark.parametrize("sharding", ["unequal", "lopsided"])
@pytest.mark.parametrize("rank", [0, 1])
def test_distributed_results_equal_single_process(two_ranks, one_process, sharding, rank):
    got = two_ranks[rank][sharding]
    assert got["loss"] == pytest.approx(one_process["loss"], rel=1e-12)
    for key in ("products", "grad", "eigenvalues", "density"):
        assert torch.allclose(got[key], one_process[key], rtol=1e-9, atol=1e-12), key
    assert got["trace"] == pytest.approx(one_process["trace"], rel=1e-9)
    # eigenvectors up to sign
    signs = torch.sign((got["eigenvectors"] * one_process["eigenvectors"]).sum(dim=0))
    assert torch.allclose(got["eigenvectors"] * signs, one_process["eigenvectors"], atol=1e-7)
