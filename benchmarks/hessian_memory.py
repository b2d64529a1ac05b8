"""Peak extra memory, wall time and products of every curvature estimator, side by side.

Model: an MLP ``--widths`` (default 64-2048-2048-10: 4.35M parameters) on ``--samples`` random
inputs in ``--batches`` batches, eval mode, float32. Each estimator runs once, in a fresh
subprocess, after the operator is built and has made one product (so its cached gradient
graphs, reported separately as "op cache", are part of the baseline):

* flatlab ``top_eigenvalues(k)``; scipy ``eigsh(k, which="LA")`` (ARPACK, same ``tol``) on
  flatlab's operator, both as ``to_scipy()`` gives it (float64 vectors) and as a float32
  ``LinearOperator`` (ARPACK in single precision: its smallest memory); PyHessian's
  ``eigenvalues(top_n=k)`` (defaults: power iteration, maxIter=100, tol=1e-3);
* flatlab ``trace`` (Hutch++ and Hutchinson, ``--trace-matvecs`` products); PyHessian's
  ``trace`` with the same number of products;
* flatlab ``spectral_density`` (``--density-runs`` x ``--density-steps``) with its defaults
  (local reorthogonalisation, 4 runs in flight) and with full reorthogonalisation, one run in
  flight.

Peak extra memory: on CPU the peak resident set (``VmHWM``, reset through
``/proc/self/clear_refs`` just before the call) minus the resident set before it, after
``malloc_trim``; on CUDA ``torch.cuda.max_memory_allocated`` minus the allocation before.
"outside" is the wall time not spent inside the operator's products. Eigenvalue rows also give
the largest relative difference of their ``k`` values to scipy's (float64) ones.

    python benchmarks/hessian_memory.py [--device cpu|cuda] [--threads 2] [--only NAME,...]
        [--widths 64,2048,2048,10] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import ctypes
import io
import json
import math
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse.linalg
import torch
from torch import Tensor, nn

from flatlab import hessian
from flatlab.io import atomic_write_text

CASES = ("flatlab top-k", "flatlab top-k, basis on cpu", "eigsh float64 (to_scipy)",
         "eigsh float32", "pyhessian top-k", "flatlab trace hutch++", "flatlab trace hutchinson",
         "pyhessian trace", "flatlab density", "flatlab density full, 1 run in flight")
CUDA_ONLY = ("flatlab top-k, basis on cpu",)


# --------------------------------------------------------------------------- the problem
def problem(args) -> tuple[nn.Module, list[tuple[Tensor, Tensor]], nn.Module]:
    widths = [int(w) for w in args.widths.split(",")]
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(widths) - 2 else [])
    model = nn.Sequential(*layers).to(args.device).eval()
    x = torch.randn(args.samples, widths[0], device=args.device)
    y = torch.randint(0, widths[-1], (args.samples,), device=args.device)
    size = -(-args.samples // args.batches)
    return model, list(zip(x.split(size), y.split(size), strict=True)), nn.CrossEntropyLoss()


class Timed:
    """Passes products through to ``op``, counting vectors and the seconds spent inside."""

    def __init__(self, op: Any) -> None:
        self.op, self.products, self.seconds = op, 0, 0.0
        self.size, self.dtype, self.device = op.size, op.dtype, op.device
        self.param_names = getattr(op, "param_names", None)
        self.param_shapes = getattr(op, "param_shapes", None)

    def matvec(self, v: Tensor) -> Tensor:
        sync(self.device)
        start = time.perf_counter()
        out = self.op.matvec(v)
        sync(self.device)
        self.seconds += time.perf_counter() - start
        self.products += 1 if v.ndim == 1 else v.shape[1]
        return out


def sync(device: Any) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def scipy_operator(op: Timed, dtype: torch.dtype) -> scipy.sparse.linalg.LinearOperator:
    """``op`` for scipy: ``flatlab.hessian.as_scipy`` (what ``to_scipy()`` returns) for
    float64, else a local wrapper in ``dtype``."""
    if dtype == torch.float64 and hasattr(hessian, "as_scipy"):
        return hessian.as_scipy(op)

    def apply(v: np.ndarray) -> np.ndarray:
        tensor = torch.from_numpy(np.ascontiguousarray(v)).to(op.device, dtype)
        return op.matvec(tensor).to("cpu", dtype).numpy()

    return scipy.sparse.linalg.LinearOperator((op.size, op.size), matvec=apply, rmatvec=apply,
                                              dtype=torch.empty(0, dtype=dtype).numpy().dtype)


# --------------------------------------------------------------------------- one estimator
def run_case(case: str, args, op: Timed, model: nn.Module, batches: list,
             loss_fn: nn.Module) -> dict[str, Any]:
    """Run one estimator; returns its products, product seconds and results."""
    if case.startswith("flatlab top-k"):
        basis = "cpu" if "basis on cpu" in case else None
        res = hessian.top_eigenvalues(op, k=args.k, tol=args.tol, basis_device=basis)
        return {"values": res.eigenvalues.tolist(), "converged": bool(res.converged.all())}
    if case.startswith("eigsh"):
        dtype = torch.float64 if "float64" in case else op.dtype
        values = scipy.sparse.linalg.eigsh(scipy_operator(op, dtype), k=args.k, which="LA",
                                           tol=args.tol, return_eigenvectors=False)
        return {"values": sorted(values.tolist(), reverse=True)}
    if case == "flatlab trace hutch++" or case == "flatlab trace hutchinson":
        res = hessian.trace(op, num_matvecs=args.trace_matvecs, method=case.split()[-1])
        return {"values": [res.estimate, res.stderr]}
    if case.startswith("flatlab density"):
        options = ({"reorthogonalize": "full", "block_size": 1} if "full" in case else {})
        res = hessian.spectral_density(op, num_runs=args.density_runs,
                                       num_steps=args.density_steps, **options)
        return {"values": [res.mean, float(res.nodes.max())]}
    if case.startswith("pyhessian"):
        return run_pyhessian(case, args, op, model, batches, loss_fn)
    raise ValueError(case)


def run_pyhessian(case: str, args, op: Timed, model: nn.Module, batches: list,
                  loss_fn: nn.Module) -> dict[str, Any]:
    engine = op.op  # built by the worker: a pyhessian.hessian over the same batches
    inner = engine.dataloader_hv_product

    def timed(v):
        sync(args.device)
        start = time.perf_counter()
        out = inner(v)
        sync(args.device)
        op.seconds += time.perf_counter() - start
        op.products += 1
        return out

    engine.dataloader_hv_product = timed
    torch.manual_seed(0)
    if case == "pyhessian top-k":
        values, _ = engine.eigenvalues(top_n=args.k)
        return {"values": sorted(values, reverse=True)}
    # tol=-inf: exactly maxIter probes (PyHessian stops when |change| / running mean < tol,
    # which tol=0 meets as soon as the running mean is negative)
    samples = engine.trace(maxIter=args.trace_matvecs, tol=-math.inf)
    return {"values": [float(np.mean(samples)),
                       float(np.std(samples, ddof=1) / math.sqrt(len(samples)))]}


def resident() -> tuple[int, int]:
    """(current, peak) resident set in bytes, from /proc/self/status."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["VmHWM"]


@contextlib.contextmanager
def peak_memory(device: str, record: dict[str, int]):
    """Record the peak extra bytes of the block in ``record["peak"]``."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        yield
        torch.cuda.synchronize()
        record["peak"] = torch.cuda.max_memory_allocated() - base
        return
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    base, _ = resident()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    yield
    record["peak"] = resident()[1] - base


def worker(case: str, args) -> dict[str, Any]:
    """Build the problem, warm the operator up, run ``case`` and measure it."""
    torch.set_num_threads(args.threads)
    model, batches, loss_fn = problem(args)
    params = sum(p.numel() for p in model.parameters())
    before, _ = resident()
    cache = 0
    if case.startswith("pyhessian"):
        import pyhessian  # the compare extra; absent -> the case is skipped

        target = pyhessian.hessian(model, loss_fn, dataloader=batches,
                                   cuda=args.device == "cuda")
        target.size, target.dtype, target.device = params, torch.float32, args.device
        op = Timed(target)
    else:
        inner = hessian.HessianOperator(model, loss_fn, batches)
        inner.matvec(torch.ones(inner.size, device=args.device))  # fills the graph cache
        sync(args.device)
        cache = resident()[0] - before if args.device == "cpu" else 0
        op = Timed(inner)
    record: dict[str, int] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start, cpu = time.perf_counter(), time.process_time()
        with peak_memory(args.device, record):
            out = run_case(case, args, op, model, batches, loss_fn)
            sync(args.device)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"case": case, "params": params, "peak_bytes": record["peak"],
            "bytes_per_param": record["peak"] / params, "op_cache_per_param": cache / params,
            "wall_s": wall, "cpu_s": cpu, "products": op.products, "product_s": op.seconds,
            "outside_s": wall - op.seconds, "outside_fraction": (wall - op.seconds) / wall,
            **out}


# --------------------------------------------------------------------------- driver
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--widths", default="64,2048,2048,10")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--trace-matvecs", type=int, default=100)
    parser.add_argument("--density-runs", type=int, default=4)
    parser.add_argument("--density-steps", type=int, default=64)
    parser.add_argument("--only", default="", help="comma-separated case names (default all)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(args.worker, args)))
        return 0
    chosen = [c.strip() for c in args.only.split(",") if c.strip()] or list(CASES)
    unknown = sorted(set(chosen) - set(CASES))
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {list(CASES)}")
    rows = []
    for case in chosen:
        if case in CUDA_ONLY and args.device != "cuda":
            continue
        command = [sys.executable, __file__, "--worker", case] + (argv or sys.argv[1:])
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(f"{case}: failed ({done.stderr.strip().splitlines()[-1:]})", file=sys.stderr)
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"{case}: {rows[-1]['wall_s']:.1f} s", file=sys.stderr, flush=True)
    compare_eigenvalues(rows)
    print_table(rows, args)
    write_csv(args.out / "hessian_memory.csv", rows)
    return 0


def compare_eigenvalues(rows: list[dict]) -> None:
    reference = next((r["values"] for r in rows if r["case"] == "eigsh float64 (to_scipy)"),
                     None)
    for row in rows:
        eigen = "top-k" in row["case"] or row["case"].startswith("eigsh")
        row["max_rel_diff_to_eigsh"] = (
            max(abs(a - b) / abs(b) for a, b in zip(row["values"], reference, strict=True))
            if eigen and reference is not None else "")


def print_table(rows: list[dict], args) -> None:
    params = rows[0]["params"] if rows else 0
    print(f"# MLP {args.widths} ({params / 1e6:.2f}M parameters), {args.samples} samples in "
          f"{args.batches} batches, {args.device}, {args.threads} threads, torch "
          f"{torch.__version__}, {platform.machine()}; k={args.k}, tol={args.tol:g}")
    print(f"{'estimator':37} {'B/param':>8} {'op cache':>8} {'wall s':>7} {'CPU s':>7} "
          f"{'products':>8} {'outside':>8} {'vs eigsh':>9}  values")
    for r in rows:
        diff = r["max_rel_diff_to_eigsh"]
        print(f"{r['case']:37} {r['bytes_per_param']:>8.0f} {r['op_cache_per_param']:>8.0f} "
              f"{r['wall_s']:>7.1f} {r['cpu_s']:>7.1f} {r['products']:>8} "
              f"{100 * r['outside_fraction']:>7.0f}% "
              f"{(f'{diff:.1e}' if diff != '' else ''):>9}  "
              f"{', '.join(f'{v:.6g}' for v in r['values'])}")


def write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    fields = ["case", "params", "bytes_per_param", "op_cache_per_param", "peak_bytes", "wall_s",
              "cpu_s", "products", "product_s", "outside_s", "outside_fraction",
              "max_rel_diff_to_eigsh", "values"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore",
                            lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({**r, "values": " ".join(f"{v:.9g}" for v in r["values"])})
    atomic_write_text(path, buffer.getvalue())
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
