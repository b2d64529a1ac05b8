"""Accuracy against the number of Hessian-vector products, on a model with an exact Hessian.

A 40-32-32-10 tanh MLP (2.7k parameters) is trained briefly on 512 MNIST-1D samples; its
exact Hessian (torch.func.hessian in float64) gives the true trace and top-5 eigenvalues.
Products run in float32, as on a real checkpoint.

* Trace: relative RMS error over 20 seeds at equal budgets for flatlab's Hutchinson and Hutch++
  and PyHessian's Hutchinson (``hessian.trace``), plus flatlab's mean reported standard error
  and how often the truth lies within 2 standard errors; also on a synthetic 2000 x 2000
  matrix whose Frobenius norm is dominated by 10 eigenvalues (where Hutch++ should win).
* Top-5 eigenvalues: flatlab's Lanczos for a range of budgets (``tol=0``: the whole budget)
  and at its default ``tol=1e-4``, against PyHessian's deflated power iteration
  (``hessian.eigenvalues(top_n=5)``) at its default and at tighter tolerances, counting every
  product it makes. Errors are max relative errors over the five values, both as returned
  (PyHessian may return them out of order) and sorted. flatlab's rows use the restarted
  Lanczos with its default basis of ``max(2k + 8, 20)`` vectors, plus one with ``tol=1e-6``
  and one unrestarted (``max_basis=P``) for comparison.
* Spectral density: SLQ with local (the default) and full reorthogonalisation, over 10 seeds
  at 4 runs x 64 steps and 16 x 64: the L1 distance of each smoothed density to the exact
  spectrum smoothed the same way (same grid, same Gaussian width), the L1 distance between
  the two modes for the same seed, and the error of the quadrature's mean, on the MLP and on
  the synthetic matrix.

    python benchmarks/hessian_accuracy.py [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import csv
import importlib
import io
import math
import sys
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call

from flatlab.data import load_dataset
from flatlab.hessian import (
    DenseOperator,
    HessianOperator,
    spectral_density,
    top_eigenvalues,
    trace,
)
from flatlab.io import atomic_write_text

SAMPLES, SEEDS = 512, 20
TRACE_BUDGETS = (12, 24, 48, 96, 192)
LANCZOS_BUDGETS = (10, 15, 20, 25, 30, 40, 60)


def trained_problem() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    data = load_dataset("mnist1d", seed=0)
    x, y = data.x_train[:SAMPLES], data.y_train[:SAMPLES]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                          nn.Linear(32, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.eval(), x, y


def exact_hessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    model64 = model.double()
    names = [n for n, _ in model64.named_parameters()]
    shapes = [p.shape for _, p in model64.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model64.parameters()])

    def loss(vector: torch.Tensor) -> torch.Tensor:
        pieces = torch.split(vector, [s.numel() for s in shapes])
        params = {n: t.reshape(s) for n, t, s in zip(names, pieces, shapes, strict=True)}
        return nn.functional.cross_entropy(functional_call(model64, params, (x.double(),)), y)

    hessian = torch.func.hessian(loss)(flat)
    model.float()
    return (hessian + hessian.T) / 2


def relative(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def dominated_operator(size: int = 2000) -> DenseOperator:
    """A synthetic PSD matrix whose Frobenius norm is dominated by 10 eigenvalues."""
    gen = torch.Generator().manual_seed(0)
    spectrum = torch.cat([100.0 * 0.7 ** torch.arange(10.0),
                          0.01 * torch.rand(size - 10, generator=gen)]).double()
    basis = torch.linalg.qr(torch.randn(size, size, generator=gen, dtype=torch.float64)).Q
    matrix = basis @ torch.diag(spectrum) @ basis.T
    return DenseOperator((matrix + matrix.T) / 2)


def trace_rows(problem: str, op, pyhessian_engine, exact_trace: float) -> list[dict]:
    rows = []
    for budget in TRACE_BUDGETS:
        for method in ("hutchinson", "hutch++"):
            results = [trace(op, num_matvecs=budget, method=method, seed=s) for s in range(SEEDS)]
            errors = [(r.estimate - exact_trace) / exact_trace for r in results]
            rows.append({"problem": problem, "tool": "flatlab", "method": method,
                         "products": budget,
                         "rel_rms_error": math.sqrt(sum(e * e for e in errors) / SEEDS),
                         "mean_rel_stderr": sum(r.stderr for r in results) / SEEDS / exact_trace,
                         "within_2_stderr": sum(abs(r.estimate - exact_trace) <= 2 * r.stderr
                                                for r in results) / SEEDS})
        if pyhessian_engine is not None:
            errors = []
            for s in range(SEEDS):
                torch.manual_seed(s)
                values = pyhessian_engine.trace(maxIter=budget, tol=0.0)
                errors.append((sum(values) / len(values) - exact_trace) / exact_trace)
            rows.append({"problem": problem, "tool": "pyhessian", "method": "hutchinson",
                         "products": budget,
                         "rel_rms_error": math.sqrt(sum(e * e for e in errors) / SEEDS),
                         "mean_rel_stderr": "", "within_2_stderr": ""})
    return rows


def eigen_errors(found: list[float], exact: list[float]) -> tuple[float, float]:
    as_returned = max(relative(f, e) for f, e in zip(found, exact, strict=True))
    in_order = max(relative(f, e) for f, e in zip(sorted(found, reverse=True), exact,
                                                  strict=True))
    return as_returned, in_order


def eigen_rows(op, pyhessian_module, model, x, y, exact_top: list[float]) -> list[dict]:
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unconverged budgets are the point here
        for budget in LANCZOS_BUDGETS:
            result = top_eigenvalues(op, k=5, tol=0.0, max_matvecs=budget)
            returned, ordered = eigen_errors(result.eigenvalues.tolist(), exact_top)
            rows.append({"tool": "flatlab", "method": "lanczos", "setting": f"budget {budget}",
                         "products": result.matvecs, "max_rel_error_as_returned": returned,
                         "max_rel_error_sorted": ordered,
                         "all_converged": bool(result.converged.all())})
    for setting, options in (("default tol=1e-4", {}), ("tol=1e-6", {"tol": 1e-6}),
                             ("tol=1e-4, unrestarted", {"max_basis": op.size})):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tol=1e-6 sits at float32's rounding floor
            result = top_eigenvalues(op, k=5, **options)
        returned, ordered = eigen_errors(result.eigenvalues.tolist(), exact_top)
        rows.append({"tool": "flatlab", "method": "lanczos", "setting": setting,
                     "products": result.matvecs, "max_rel_error_as_returned": returned,
                     "max_rel_error_sorted": ordered,
                     "all_converged": bool(result.converged.all())})
    if pyhessian_module is None:
        return rows
    counter = {"products": 0}
    original = pyhessian_module.hessian_vector_product

    def counted(*args, **kwargs):
        counter["products"] += 1
        return original(*args, **kwargs)

    pyhessian_module.hessian_vector_product = counted
    try:
        for max_iter, tol in ((100, 1e-3), (100, 1e-4), (1000, 1e-6)):
            torch.manual_seed(0)
            engine = pyhessian_module.hessian(model, nn.CrossEntropyLoss(), data=(x, y),
                                              cuda=False)
            counter["products"] = 0
            values, _ = engine.eigenvalues(maxIter=max_iter, tol=tol, top_n=5)
            returned, ordered = eigen_errors(list(values), exact_top)
            rows.append({"tool": "pyhessian", "method": "power iteration",
                         "setting": f"maxIter={max_iter} tol={tol:g}",
                         "products": counter["products"], "max_rel_error_as_returned": returned,
                         "max_rel_error_sorted": ordered, "all_converged": ""})
    finally:
        pyhessian_module.hessian_vector_product = original
    return rows


def smoothed(eigenvalues: torch.Tensor, grid: torch.Tensor, width: float) -> torch.Tensor:
    """The exact spectral density smoothed by a Gaussian of ``width``, normalised on ``grid``."""
    density = torch.exp(-0.5 * ((grid[:, None] - eigenvalues[None, :]) / width) ** 2).sum(1)
    return density / torch.trapezoid(density, grid)


def density_rows(problem: str, op, eigenvalues: torch.Tensor) -> list[dict]:
    """Local vs full reorthogonalisation against the exact spectrum, over seeds."""
    low, high = float(eigenvalues.min()), float(eigenvalues.max())
    spread = high - low
    grid = torch.linspace(low - 0.1 * spread, high + 0.1 * spread, 4000, dtype=torch.float64)
    rows = []
    for runs in (4, 16):
        errors: dict[str, list[float]] = {"local": [], "full": []}
        means: dict[str, list[float]] = {"local": [], "full": []}
        between = []
        for seed in range(10):
            results = {mode: spectral_density(op, num_runs=runs, num_steps=64, grid=grid,
                                              seed=seed, reorthogonalize=mode)
                       for mode in ("local", "full")}
            for mode, result in results.items():
                exact = smoothed(eigenvalues, grid, result.sigma)
                errors[mode].append(float(torch.trapezoid((result.density - exact).abs(), grid)))
                means[mode].append(abs(result.mean - float(eigenvalues.mean())) / spread)
            between.append(float(torch.trapezoid(
                (results["local"].density - results["full"].density).abs(), grid)))
        for mode in ("local", "full"):
            rows.append({"problem": problem, "reorthogonalize": mode, "runs": runs, "steps": 64,
                         "mean_l1_to_exact": sum(errors[mode]) / 10,
                         "max_l1_to_exact": max(errors[mode]),
                         "mean_l1_local_vs_full": sum(between) / 10,
                         "mean_abs_mean_error_over_spread": sum(means[mode]) / 10})
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())
    print(f"wrote {path}", file=sys.stderr)


def fmt(value) -> str:
    return f"{value:.2e}" if isinstance(value, float) else str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, x, y = trained_problem()
    hessian = exact_hessian(model, x, y)
    eigenvalues = torch.linalg.eigvalsh(hessian).flip(0)
    exact_trace = float(hessian.trace())
    exact_top = eigenvalues[:5].tolist()
    op = HessianOperator(model, nn.CrossEntropyLoss(), (x, y))
    try:
        # the package re-exports the class under the module's name: fetch the module itself
        pyhessian_module = importlib.import_module("pyhessian.hessian")
        engine = pyhessian_module.hessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=False)
    except ImportError:
        pyhessian_module = engine = None
    print(f"# {op.size} parameters, {SAMPLES} samples; exact trace {exact_trace:.6g}, top-5 "
          f"{', '.join(f'{v:.6g}' for v in exact_top)}; most negative {float(eigenvalues[-1]):.4g}")
    dominated = dominated_operator()
    trace_table = (trace_rows("mlp (exact)", op, engine, exact_trace)
                   + trace_rows("dense, 10 dominant", dominated, None,
                                float(dominated.matrix.trace())))
    print(f"\n{'problem':19} {'tool':10} {'method':11} {'products':>8} {'rel RMS err':>12} "
          f"{'rel stderr':>11} {'in 2 se':>8}")
    for r in trace_table:
        print(f"{r['problem']:19} {r['tool']:10} {r['method']:11} {r['products']:>8} "
              f"{fmt(r['rel_rms_error']):>12} {fmt(r['mean_rel_stderr']):>11} "
              f"{fmt(r['within_2_stderr']):>8}")
    eigen_table = eigen_rows(op, pyhessian_module, model, x, y, exact_top)
    print(f"\n{'tool':10} {'setting':24} {'products':>8} {'err returned':>13} {'err sorted':>11}"
          f" {'converged':>9}")
    for r in eigen_table:
        print(f"{r['tool']:10} {r['setting']:24} {r['products']:>8} "
              f"{fmt(r['max_rel_error_as_returned']):>13} {fmt(r['max_rel_error_sorted']):>11} "
              f"{fmt(r['all_converged']):>9}")
    density_table = (density_rows("mlp (exact)", op, eigenvalues)
                     + density_rows("dense, 10 dominant", dominated,
                                    torch.linalg.eigvalsh(dominated.matrix)))
    print(f"\n{'problem':19} {'reorth':7} {'runs':>4} {'L1 to exact':>11} {'max':>9} "
          f"{'L1 local-full':>13} {'|mean err|':>10}")
    for r in density_table:
        print(f"{r['problem']:19} {r['reorthogonalize']:7} {r['runs']:>4} "
              f"{fmt(r['mean_l1_to_exact']):>11} {fmt(r['max_l1_to_exact']):>9} "
              f"{fmt(r['mean_l1_local_vs_full']):>13} "
              f"{fmt(r['mean_abs_mean_error_over_spread']):>10}")
    write_csv(args.out / "hessian_accuracy_trace.csv", trace_table)
    write_csv(args.out / "hessian_accuracy_eigen.csv", eigen_table)
    write_csv(args.out / "hessian_accuracy_density.csv", density_table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
