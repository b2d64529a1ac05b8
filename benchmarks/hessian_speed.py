"""Cost of Hessian-vector products relative to one full-data gradient, side by side.

Models: (a) MLP 40-512-512-10 (289k parameters) over 4096 MNIST-1D-sized random samples in
batches of 512; (b) flatlab's small CNN (``build_model("cnn", (1, 8, 8), 10)``, 21k parameters)
over 4096 digit-sized random images in batches of 512. For each: one full-data gradient, one
product, and a block of 8 products (reported per vector), for flatlab (its default: cached
gradient graphs; and both streamed backends without the cache), PyHessian
(``hessian.dataloader_hv_product``, its full-data path) and hessian-eigenthings where
importable (``HessianOperator.matvec``, 1.x API, or ``HVPOperator.apply``, 0.x).

Every method is timed in interleaved rounds (so load from other processes hits all of them
alike); the table shows the fastest round in process CPU time (robust on a shared machine;
with one thread it is the compute time) and in wall-clock time, each per vector as a ratio to
the gradient. Ratios are reported, never asserted.

    python benchmarks/hessian_speed.py [--rounds 5] [--threads 1] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import csv
import io
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from flatlab.hessian import HessianOperator
from flatlab.io import atomic_write_text
from flatlab.models import build_model

SAMPLES, BATCH = 4096, 512


def problems() -> dict[str, tuple[nn.Module, list]]:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(40, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                        nn.Linear(512, 10))
    x1, y1 = torch.randn(SAMPLES, 40), torch.randint(0, 10, (SAMPLES,))
    cnn = build_model("cnn", (1, 8, 8), 10)
    x2, y2 = torch.randn(SAMPLES, 1, 8, 8), torch.randint(0, 10, (SAMPLES,))
    batches = lambda x, y: list(zip(x.split(BATCH), y.split(BATCH), strict=True))  # noqa: E731
    return {"mlp-289k": (mlp.eval(), batches(x1, y1)), "cnn-21k": (cnn.eval(), batches(x2, y2))}


def gradient_fn(model: nn.Module, batches: list, loss_fn: nn.Module) -> Callable[[], object]:
    params = [p for p in model.parameters() if p.requires_grad]

    def run() -> object:
        total = [torch.zeros_like(p) for p in params]
        for x, y in batches:
            grads = torch.autograd.grad(loss_fn(model(x), y), params)
            for t, g in zip(total, grads, strict=True):
                t.add_(g, alpha=len(y) / SAMPLES)
        return total

    return run


FLATLAB = {  # label -> HessianOperator options
    "flatlab (default)": {},
    "flatlab forward, no cache": {"backend": "forward", "cache": False},
    "flatlab double-bw, no cache": {"backend": "double_backward", "cache": False},
}


def flatlab_fns(model, batches, loss_fn, options: dict) -> dict[str, Callable[[], object]]:
    op = HessianOperator(model, loss_fn, batches, **options)
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(op.size, generator=gen)
    block = torch.randn(op.size, 8, generator=gen)
    return {"one product": lambda: op.matvec(v), "block of 8": lambda: op.matvec(block)}


def pyhessian_fns(model, batches, loss_fn) -> dict[str, Callable[[], object]]:
    try:
        from pyhessian import hessian
    except ImportError:
        return {}
    engine = hessian(model, loss_fn, dataloader=batches, cuda=False)
    v = [torch.randn_like(p) for p in engine.params]
    return {"one product": lambda: engine.dataloader_hv_product(v)}


def eigenthings_fns(model, batches, loss_fn) -> dict[str, Callable[[], object]]:
    try:  # 1.x API
        from hessian_eigenthings import HessianOperator as EigenthingsHessian
        from hessian_eigenthings import supervised_loss
    except ImportError:
        try:  # 0.x API
            from hessian_eigenthings.hvp_operator import HVPOperator
        except ImportError:
            return {}
        legacy = HVPOperator(model, batches, loss_fn, use_gpu=False, full_dataset=True)
        v = torch.randn(legacy.size)
        return {"one product": lambda: legacy.apply(v)}
    operator = EigenthingsHessian(model, batches, supervised_loss(loss_fn))
    v = torch.randn(operator.size)
    return {"one product": lambda: operator.matvec(v)}


def measure(rounds: int) -> list[dict]:
    loss_fn = nn.CrossEntropyLoss()
    rows = []
    for name, (model, batches) in problems().items():
        methods: dict[tuple[str, str], tuple[Callable[[], object], int]] = {
            ("gradient", "full-data gradient"): (gradient_fn(model, batches, loss_fn), 1)}
        for label, options in FLATLAB.items():
            for what, fn in flatlab_fns(model, batches, loss_fn, options).items():
                methods[(label, what)] = (fn, 8 if "block" in what else 1)
        for what, fn in pyhessian_fns(model, batches, loss_fn).items():
            methods[("pyhessian", what)] = (fn, 1)
        for what, fn in eigenthings_fns(model, batches, loss_fn).items():
            methods[("hessian-eigenthings", what)] = (fn, 1)
        for fn, _ in methods.values():  # warm up (first-call costs, allocator)
            fn()
        wall = {key: float("inf") for key in methods}
        cpu = {key: float("inf") for key in methods}
        for _ in range(rounds):
            for key, (fn, _) in methods.items():
                start_wall, start_cpu = time.perf_counter(), time.process_time()
                fn()
                wall[key] = min(wall[key], time.perf_counter() - start_wall)
                cpu[key] = min(cpu[key], time.process_time() - start_cpu)
        gradient = ("gradient", "full-data gradient")
        params = sum(p.numel() for p in model.parameters())
        for (tool, what), (_, vectors) in methods.items():
            key = (tool, what)
            rows.append({"model": name, "params": params, "tool": tool, "what": what,
                         "vectors": vectors,
                         "cpu_seconds_per_vector": round(cpu[key] / vectors, 5),
                         "cpu_ratio_to_gradient": round(cpu[key] / vectors / cpu[gradient], 3),
                         "wall_seconds_per_vector": round(wall[key] / vectors, 5),
                         "wall_ratio_to_gradient": round(wall[key] / vectors / wall[gradient],
                                                         3)})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: stable on a shared machine)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = measure(args.rounds)
    header = (f"# torch {torch.__version__}, {args.threads} thread(s), {platform.machine()}, "
              f"fastest of {args.rounds} interleaved rounds; ratios per vector to one gradient")
    print(header)
    print(f"{'model':9} {'tool':28} {'what':19} {'CPU s/vec':>9} {'x grad':>7} "
          f"{'wall s/vec':>10} {'x grad':>7}")
    for r in rows:
        print(f"{r['model']:9} {r['tool']:28} {r['what']:19} "
              f"{r['cpu_seconds_per_vector']:>9.4f} {r['cpu_ratio_to_gradient']:>7.2f} "
              f"{r['wall_seconds_per_vector']:>10.4f} {r['wall_ratio_to_gradient']:>7.2f}")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    path = args.out / "hessian_speed.csv"
    atomic_write_text(path, buffer.getvalue())
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
