"""Cross-check against PyHessian 0.1 (the ``compare`` extra; skipped where it is absent).

PyHessian reports no standard error, so its trace is run for a fixed number of probes and its
spread is computed here from the values it returns. Its ``density()`` needs ``torch.eig``
(removed in torch 2) and is not used.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from flatlab.hessian import HessianOperator, top_eigenvalues, trace

pyhessian = pytest.importorskip("pyhessian")


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4)).eval()
    x, y = torch.randn(64, 6), torch.randint(0, 4, (64,))
    return model, (x, y)


def test_trace_and_top_eigenvalue_agree_with_pyhessian(problem):
    model, (x, y) = problem
    loss_fn = nn.CrossEntropyLoss()
    op = HessianOperator(model, loss_fn, (x, y))
    ours = trace(op, num_matvecs=3 * op.size, method="hutch++", seed=0)  # sketch spans: exact
    assert ours.stderr == 0
    ours_top = top_eigenvalues(op, k=1, tol=1e-6)

    torch.manual_seed(1)  # PyHessian draws its probes from the global generator
    theirs = pyhessian.hessian(model, loss_fn, data=(x, y), cuda=False)
    samples = torch.tensor(theirs.trace(maxIter=300, tol=0.0), dtype=torch.float64)
    their_mean = float(samples.mean())
    their_stderr = float(samples.std() / math.sqrt(len(samples)))
    assert len(samples) == 300 and their_stderr > 0
    assert abs(ours.estimate - their_mean) <= 3 * math.sqrt(ours.stderr**2 + their_stderr**2)

    eigenvalues, _ = theirs.eigenvalues(maxIter=1000, tol=1e-7, top_n=1)
    assert eigenvalues[0] == pytest.approx(float(ours_top.eigenvalues[0]), rel=0.01)
