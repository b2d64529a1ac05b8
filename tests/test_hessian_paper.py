"""The paper's quantities (flatlab.hessian.paper) against dense matrices with known answers."""

from __future__ import annotations

import doctest
import math

import pytest
import torch
from torch import nn

from flatlab.errors import FlatlabError
from flatlab.hessian import DenseOperator, HessianOperator, TraceResult
from flatlab.hessian import paper as paper_module
from flatlab.hessian._common import gaussian, generator
from flatlab.hessian.paper import (
    batch_mean,
    norm_trace,
    paper_parameters,
    paper_top_eigenvalue,
    paper_trace,
)

SIZES = (4, 6, 5)
NAMES = ["conv1.weight", "conv2.weight", "head.weight"]


def spd_with_eigenvalues(eigenvalues, seed):
    g = torch.Generator().manual_seed(seed)
    n = len(eigenvalues)
    q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
    return q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T


def blocked(matrix, sizes=SIZES, names=NAMES):
    return DenseOperator(matrix, param_names=names, param_shapes=[(s,) for s in sizes])


def test_docstring_examples():
    failures, attempted = doctest.testmod(paper_module, optionflags=doctest.ELLIPSIS)
    assert failures == 0 and attempted >= 4


# ---------------------------------------------------------------------------------- parameters


class Block(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.conv2(torch.relu(self.bn1(self.conv1(x))))
        return torch.relu(out + self.downsample(x))


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv1d(1, 2, 3)  # any convolution counts, not only Conv2d
        self.block = Block(2, 3)
        self.hidden = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        b = x.shape[0]
        x = self.stem(x.view(b, 1, -1)).view(b, 2, 4, 4)  # 18 samples -> 2 channels x 16
        x = self.block(x).mean(dim=(2, 3))
        return self.head(torch.tanh(self.hidden(x)))


def test_paper_parameters_are_conv_and_head_weights_only():
    model = TinyResNet()
    assert paper_parameters(model) == [
        "stem.weight", "block.conv1.weight", "block.conv2.weight",
        "block.downsample.0.weight", "head.weight"]
    assert paper_parameters(model, skip_shortcuts=True) == [
        "stem.weight", "block.conv1.weight", "block.conv2.weight", "head.weight"]
    mlp = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    assert paper_parameters(mlp) == ["2.weight"]
    with pytest.raises(FlatlabError, match="no convolution"):
        paper_parameters(nn.Sequential(nn.ReLU()))


def test_skip_shortcuts_reproduces_the_official_rule_on_a_torchvision_resnet():
    try:
        from torchvision import models
    except Exception as err:  # not installed, or built for another torch
        pytest.skip(f"torchvision unusable here: {err}")
    model = models.resnet18(num_classes=5)
    # get_layers: Conv2d whose name contains "conv", plus the head (their pred_head is fc here)
    official = [f"{name}.weight" for name, m in model.named_modules()
                if type(m) is nn.Conv2d and "conv" in name] + ["fc.weight"]
    assert paper_parameters(model, skip_shortcuts=True) == official
    assert len(paper_parameters(model)) == len(official) + 3  # the three 1x1 downsamples


# ---------------------------------------------------------------------------------- trace


def test_paper_trace_of_a_diagonal_matrix_is_exact_after_two_probes():
    d = torch.arange(1.0, 16.0, dtype=torch.float64)
    result = paper_trace(blocked(torch.diag(d)))
    assert result.estimate == d.sum().item() and result.stderr == 0.0
    assert len(result.samples) == 2  # t_1 = t_2 = tr D: the running mean does not move
    assert result.num_matvecs == 8  # one block of 8 probes computed
    for (name, (estimate, _)), sl in zip(result.per_param.items(), [(0, 4), (4, 10), (10, 15)],
                                         strict=True):
        assert estimate == d[sl[0]:sl[1]].sum().item(), name


def test_paper_trace_follows_the_official_stopping_rule_and_is_within_its_stderr():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(15, 15, generator=g, dtype=torch.float64)
    h = a @ a.T / 15 + torch.diag(torch.linspace(0.0, 3.0, 15, dtype=torch.float64))
    exact = torch.trace(h).item()
    for seed in range(5):
        result = paper_trace(blocked(h), seed=seed)
        values = result.samples.tolist()
        m = len(values)
        assert 2 <= m <= 100
        means = [sum(values[:i]) / i for i in range(1, m + 1)]
        previous = [0.0, *means[:-1]]
        stopped = [abs(mu - p) / (abs(p) + 1e-6) < 1e-3 for mu, p in zip(means, previous,
                                                                          strict=True)]
        assert not any(stopped[:-1]) and (stopped[-1] or m == 100)
        assert result.estimate == pytest.approx(means[-1], rel=1e-14)
        spread = torch.tensor(values, dtype=torch.float64).std().item() / math.sqrt(m)
        assert result.stderr == pytest.approx(spread, rel=1e-12)
        assert abs(result.estimate - exact) < 4 * result.stderr
        assert sum(e for e, _ in result.per_param.values()) == pytest.approx(result.estimate)
    # per layer, with all 100 probes (a tolerance that never stops early)
    result = paper_trace(blocked(h), tol=1e-15)
    assert len(result.samples) == 100
    blocks = [torch.trace(h[i:j, i:j]).item() for i, j in [(0, 4), (4, 10), (10, 15)]]
    for (estimate, se), block in zip(result.per_param.values(), blocks, strict=True):
        assert abs(estimate - block) < 4 * se
    one_at_a_time = paper_trace(blocked(h), seed=1, block_size=1)
    blocked_eight = paper_trace(blocked(h), seed=1, block_size=8)
    assert torch.allclose(one_at_a_time.samples, blocked_eight.samples, rtol=0, atol=1e-12)
    assert one_at_a_time.num_matvecs == len(one_at_a_time.samples)


def test_paper_trace_rejects_bad_arguments():
    with pytest.raises(FlatlabError, match="max_probes"):
        paper_trace(blocked(torch.eye(15, dtype=torch.float64)), max_probes=0)


# ---------------------------------------------------------------------------------- lambda_paper


def official_compute_eigenvalue(h, sizes, start, max_iter=100, tol=1e-8):
    """A line-by-line transcription of the official compute_eigenvalue (top_n=1) on a dense
    matrix: lists of per-layer tensors, normalization() with + 1e-6, the same stopping rule."""
    def normalization(vs):
        norms = [torch.sum(v * v) ** 0.5 for v in vs]
        return [v / (n.item() + 1e-6) for v, n in zip(vs, norms, strict=True)]

    def product(vs):
        return list(torch.split(h @ torch.cat(vs), list(sizes)))

    vs = normalization(list(torch.split(start, list(sizes))))
    eigenvalues = None
    for _ in range(max_iter):
        vs = normalization(vs)  # orthnormal(vs, []) with no earlier eigenvectors
        hvs = product(vs)
        tmp = [torch.sum(hv * v).item() for hv, v in zip(hvs, vs, strict=True)]
        vs = normalization(hvs)
        if eigenvalues is None:
            eigenvalues = tmp
        elif abs(sum(eigenvalues) - sum(tmp)) / (abs(sum(eigenvalues)) + 1e-6) < tol:
            break
        else:
            eigenvalues = tmp
    return eigenvalues


def block_diagonal_hessian():
    spectra = ([3.0, 1.0, 0.5, 0.2], [5.0, 2.0, 1.0, 0.4, 0.1, 0.0], [1.5, 0.3, 0.2, 0.1, 0.05])
    blocks = [spd_with_eigenvalues(s, seed=i) for i, s in enumerate(spectra)]
    return torch.block_diag(*blocks), [s[0] for s in spectra]


def test_lambda_paper_of_a_block_diagonal_hessian_is_the_sum_of_block_top_eigenvalues():
    h, tops = block_diagonal_hessian()
    result = paper_top_eigenvalue(blocked(h))
    assert result.converged and result.iterations < 100
    assert result.estimate == pytest.approx(sum(tops), rel=1e-5)  # 9.5, the 1e-6 guards aside
    for name, top in zip(NAMES, tops, strict=True):
        assert result.per_param[name] == pytest.approx(top, rel=1e-5)
    assert torch.linalg.eigvalsh(h).max().item() == pytest.approx(5.0)  # lambda_max is 5


def test_lambda_paper_of_a_rank_one_hessian_approaches_layers_times_lambda_max():
    lam = 2.0
    g = torch.Generator().manual_seed(42)  # not the start vector's seed 0
    pieces = [torch.randn(s, generator=g, dtype=torch.float64) for s in SIZES]
    for norms in [(0.5**0.5, 0.3**0.5, 0.2**0.5), ((1 / 3) ** 0.5,) * 3]:
        u = torch.cat([p / p.norm() * a for p, a in zip(pieces, norms, strict=True)])
        result = paper_top_eigenvalue(blocked(lam * torch.outer(u, u)))
        # aligned after one product; the 1e-6 guards settle within a few more
        assert result.converged and result.iterations <= 5
        expected = lam * sum(norms) ** 2  # q_l = lam ||u_l|| sum_m ||u_m||
        assert result.estimate == pytest.approx(expected, rel=1e-5)
        for name, a in zip(NAMES, norms, strict=True):
            assert result.per_param[name] == pytest.approx(lam * a * sum(norms), rel=1e-5)
    assert result.estimate == pytest.approx(3 * lam, rel=1e-5)  # equal split: L x lambda_max


@pytest.mark.parametrize("tol", [1e-8, 1e-3])
def test_lambda_paper_matches_a_transcription_of_the_official_code(tol):
    g = torch.Generator().manual_seed(5)
    a = torch.randn(15, 15, generator=g, dtype=torch.float64)
    h = a @ a.T / 15 - 0.3 * torch.eye(15, dtype=torch.float64)  # coupled blocks, indefinite
    for seed in range(3):
        start = gaussian(15, 1, generator(seed), torch.device("cpu"))[:, 0]
        official = official_compute_eigenvalue(h, SIZES, start, tol=tol)
        result = paper_top_eigenvalue(blocked(h), seed=seed, tol=tol)
        assert list(result.per_param.values()) == pytest.approx(official, rel=1e-12, abs=1e-14)
        assert result.estimate == pytest.approx(sum(official), rel=1e-12)


def test_lambda_paper_without_blocks_is_power_iteration():
    h, _ = block_diagonal_hessian()
    result = paper_top_eigenvalue(DenseOperator(h))
    assert list(result.per_param) == ["all"]
    assert result.estimate == pytest.approx(torch.linalg.eigvalsh(h).max().item(), rel=1e-5)


def test_batch_mean_averages_per_batch_results_with_their_stderr():
    h1, _ = block_diagonal_hessian()
    h2 = 2.0 * h1
    results = [paper_top_eigenvalue(blocked(h)) for h in (h1, h2)]
    mean = batch_mean(results)
    assert mean.estimate == (results[0].estimate + results[1].estimate) / 2
    assert results[1].estimate == pytest.approx(2 * results[0].estimate, rel=1e-5)
    assert mean.stderr == pytest.approx(0.5 * results[0].estimate, rel=1e-5)  # (x, 2x)
    assert mean.per_param[NAMES[1]] == pytest.approx(1.5 * results[0].per_param[NAMES[1]])
    assert mean.iterations == results[0].iterations + results[1].iterations


def test_lambda_paper_on_a_hessian_operator_equals_the_dense_computation():
    torch.manual_seed(0)
    model = TinyResNet().double().eval()
    x = torch.randn(6, 18, dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 0, 1, 0])
    names = paper_parameters(model)
    op = HessianOperator(model, nn.CrossEntropyLoss(), (x, y), params=names)
    assert op.param_names == names
    dense = op.matvec(torch.eye(op.size, dtype=torch.float64))
    dense = (dense + dense.T) / 2
    reference = DenseOperator(dense, param_names=op.param_names, param_shapes=op.param_shapes)
    got, want = paper_top_eigenvalue(op, max_iter=30), paper_top_eigenvalue(reference, max_iter=30)
    assert got.estimate == pytest.approx(want.estimate, rel=1e-8)
    traced, exact = paper_trace(op), paper_trace(reference)
    assert traced.estimate == pytest.approx(exact.estimate, rel=1e-8)


# ---------------------------------------------------------------------------------- norm_trace


def test_norm_trace_is_the_weighted_sum_of_per_layer_traces():
    weights = {"a.weight": torch.tensor([[1.0, 2.0], [2.0, 0.0]]),  # ||W||^2 = 9, n = 4
               "b.weight": torch.tensor([3.0, 4.0])}  # ||W||^2 = 25, n = 2
    result = TraceResult(estimate=7.0, stderr=0.5, num_matvecs=10, method="hutchinson",
                         per_param={"a.weight": (2.0, 0.1), "b.weight": (5.0, 0.4)})
    scaled = norm_trace(result, weights)
    assert scaled.per_param == {"a.weight": 9 / 4 * 2.0, "b.weight": 25 / 2 * 5.0}
    assert scaled.estimate == 9 / 4 * 2.0 + 25 / 2 * 5.0
    assert scaled.stderr == pytest.approx(9 / 4 * 0.1 + 25 / 2 * 0.4, rel=1e-15)
    with pytest.raises(FlatlabError, match="no weights given"):
        norm_trace(result, {"a.weight": weights["a.weight"]})
    with pytest.raises(FlatlabError, match="per-layer"):
        norm_trace(TraceResult(1.0, 0.0, 2, "hutchinson"), weights)


def test_norm_trace_is_invariant_to_the_scale_of_a_scale_invariant_layer():
    """A conv layer followed by BatchNorm (batch statistics, eps ~ 0): f(c W) = f(W), so
    tr H_ll scales as 1/c^2; the norm-aware term does not move, the raw trace does."""
    torch.manual_seed(1)
    conv, bn, head = nn.Conv1d(1, 3, 3, bias=False), nn.BatchNorm1d(3, eps=1e-12), nn.Linear(3, 2)
    model = nn.Sequential(conv, bn, nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten(), head)
    model = model.double().train()  # batch statistics: f is invariant to conv's scale
    x, y = torch.randn(16, 1, 10, dtype=torch.float64), torch.randint(0, 2, (16,))
    values = []
    for scale in (1.0, 4.0):
        with torch.no_grad():
            conv.weight.mul_(scale)
        op = HessianOperator(model, nn.CrossEntropyLoss(), (x, y), mode="train",
                             params=paper_parameters(model))
        dense = op.matvec(torch.eye(op.size, dtype=torch.float64))
        diag = torch.diagonal(dense)
        per_param = {"0.weight": (diag[:9].sum().item(), 0.0),
                     "5.weight": (diag[9:].sum().item(), 0.0)}
        values.append((per_param["0.weight"][0],
                       norm_trace(TraceResult(0.0, 0.0, 0, "exact", per_param), model)))
    (raw1, scaled1), (raw4, scaled4) = values
    assert raw4 == pytest.approx(raw1 / 16, rel=1e-6)
    assert scaled4.per_param["0.weight"] == pytest.approx(scaled1.per_param["0.weight"], rel=1e-6)
