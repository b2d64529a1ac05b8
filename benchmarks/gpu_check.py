"""GPU path check: train -> analyze -> report on a device, CUDA results against CPU, timings.

    python benchmarks/gpu_check.py [--device cuda|cpu|auto] [--out DIR] [--epochs 2]

One short script (a few minutes) for a CUDA machine; it runs on CPU too (``--device cpu``):

1. trains the default model on the default data (MNIST-1D, ``cnn1d``) with NSO for
   ``--epochs`` epochs on the device (``--precision bf16`` trains under bfloat16 autocast);
2. analyses the checkpoint on the device *and* on the CPU (loss, trace, top eigenvalues,
   spectral density, a 1-D slice; float32 with TF32 off, float64 accumulation) and checks that
   the numbers agree within ``--rtol`` (the same seeds give the same probe vectors, so the
   results differ only by rounding);
3. writes the analysis and its report (``DIR/analysis/index.html``);
4. prints and writes (``DIR/gpu_check.csv``) a timing table on the device: milliseconds per
   training step for each optimizer (fp32, and NSO under bf16 autocast), and one full-data
   gradient, one Hessian-vector product and a block of 8 products, as ratios to the gradient;
5. curvature at scale (``benchmarks/hessian_scale.py``): ResNet-18 and ResNet-50 at CIFAR and
   ImageNet input sizes, the product/gradient ratio and, per estimator (top-5 eigenvalues, also
   with the basis in host memory; Hutch++ trace; density), time and peak device memory.
   ``--scale tiny`` (the default on CPU) is a smoke run on a small ResNet; ``--scale-only``
   skips steps 1-4. Every model's memory is estimated first, and the run is refused up front
   (exit 2, one line) when one needs more than ``--max-memory-gb`` (default on CUDA: 90% of
   the device's memory).

Exit status 0 when every check passes, 1 when one fails (each failure printed). On a CPU
shared with other programs pass ``--threads 1``: spinning intra-op threads make these small
models many times slower and the timings meaningless.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import hessian_scale
import torch
from torch import nn

from flatlab.errors import ArgumentParser, run_cli
from flatlab.io import atomic_write_text
from flatlab.runtime import exact_float32, resolve_device

DEFAULT_OUT = Path(__file__).parent / "results" / "gpu_check"
OPTIMIZERS = ("sgd", "sam", "asam", "rwp", "nso")
COMPARED = ("loss", "accuracy", "trace", "eigenvalues", "landscape_1d", "density")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- 1. train


def train_checkpoint(device: torch.device, out: Path, epochs: int, precision: str) -> Path:
    from flatlab.train import TrainConfig, train

    fields = TrainConfig.__dataclass_fields__
    extra = {"precision": precision} if "precision" in fields else {}
    if precision != "fp32" and not extra:
        raise SystemExit("this flatlab.train has no precision option")
    config = TrainConfig(optimizer="nso", epochs=epochs, device=str(device),
                         out=str(out / "run"), **extra)
    result = train(config, progress=False)
    return result.checkpoint


# --------------------------------------------------------------------------- 2. analyse + compare


def analyse(checkpoint: Path, device: torch.device, args) -> dict:
    from flatlab.analysis import AnalyzeOptions, analyze

    options = AnalyzeOptions(trace=True, eigenvalues=args.eigenvalues, density=True,
                             landscape=("1d",), samples=args.samples,
                             trace_matvecs=args.trace_matvecs, device=str(device),
                             threads=torch.get_num_threads(), progress=False,
                             command=f"python benchmarks/gpu_check.py --device {device.type}")
    return analyze([checkpoint], options)


def _flatten(value) -> list[float]:
    if value is None:
        return []
    if isinstance(value, dict):
        return [x for key in sorted(value) for x in _flatten(value[key])]
    if isinstance(value, list | tuple):
        return [x for v in value for x in _flatten(v)]
    return [float(value)]


def compare(device_entry: dict, cpu_entry: dict, rtol: float) -> list[dict]:
    """One row per compared quantity: the largest relative difference (to the largest
    magnitude of the quantity, so values near 0 do not blow it up) and pass/fail."""
    rows = []
    for key in COMPARED:
        a = device_entry.get(key)
        b = cpu_entry.get(key)
        if key == "landscape_1d" and a is not None:
            a, b = a["loss"], b["loss"]
        if key == "density" and a is not None:
            a, b = a["density"], b["density"]
        fa, fb = _flatten(a), _flatten(b)
        if len(fa) != len(fb):
            rows.append({"quantity": key, "max_rel_diff": math.inf, "ok": False})
            continue
        if not fa:
            continue
        scale = max(max(abs(x) for x in fb), 1e-12)
        diff = max(abs(x - y) for x, y in zip(fa, fb, strict=True)) / scale
        rows.append({"quantity": key, "max_rel_diff": diff, "ok": diff <= rtol})
    return rows


# --------------------------------------------------------------------------- 4. timings


def step_timings(device: torch.device, args) -> list[dict]:
    """Milliseconds per training step on one fixed batch for every optimizer (each on its own
    copy of the same model), timed in interleaved rounds; the median round."""
    from flatlab.data import load_dataset
    from flatlab.models import build_model
    from flatlab.optim import build_optimizer, gradient_evaluations_per_step

    data = load_dataset("mnist1d")
    x = data.x_train[: args.batch_size].to(device)
    y = data.y_train[: args.batch_size].to(device)
    loss_fn = nn.CrossEntropyLoss()
    variants = [(name, "fp32") for name in OPTIMIZERS] + [("nso", "bf16")]
    steppers, passes = [], []
    for name, precision in variants:
        torch.manual_seed(0)
        model = build_model("cnn1d", data.input_shape, data.num_classes).to(device)
        optimizer = build_optimizer(name, model.parameters(), lr=0.01, model=model)

        def closure(model=model, optimizer=optimizer, precision=precision):
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16,
                                enabled=precision == "bf16"):
                out = model(x)
            loss = loss_fn(out.float(), y)
            loss.backward()
            return loss

        def steps(optimizer=optimizer, closure=closure):
            for _ in range(args.steps):
                optimizer.step(closure)

        steppers.append(steps)
        passes.append(gradient_evaluations_per_step(optimizer))
    seconds = interleaved_medians(steppers, device, args.repeats)
    rows = [{"what": f"step {name} {precision}", "passes": k, "ms": 1e3 * t / args.steps}
            for (name, precision), k, t in zip(variants, passes, seconds, strict=True)]
    for row in rows:
        row["ratio"] = row["ms"] / rows[0]["ms"]
    return rows


def interleaved_medians(fns: Sequence[Callable[[], object]], device: torch.device,
                        repeats: int) -> list[float]:
    """Median seconds of each ``fn`` over ``repeats`` rounds; each round runs every ``fn`` once
    (rotating the order, so load from other programs hits all alike), after one warm-up."""
    for fn in fns:
        fn()
    synchronize(device)
    times: list[list[float]] = [[] for _ in fns]
    for round_ in range(repeats):
        order = list(range(len(fns)))
        order = order[round_ % len(fns):] + order[:round_ % len(fns)]
        for i in order:
            start = time.perf_counter()
            fns[i]()
            synchronize(device)
            times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def hessian_timings(checkpoint: Path, device: torch.device, args) -> list[dict]:
    """One full-data gradient (plain autograd), one Hessian-vector product and a block of 8
    (per vector), with flatlab's default operator (cached gradient graphs where they fit) and
    without the cache (streamed)."""
    from flatlab.analysis import SubsetBatches, sample_indices
    from flatlab.checkpoint import load_dataset_for, load_model
    from flatlab.hessian import HessianOperator

    model, meta = load_model(checkpoint, device=device)
    data = load_dataset_for(meta)
    indices = sample_indices(len(data.y_train), args.samples, 0)
    batches = list(SubsetBatches(data.x_train, data.y_train, indices, 256, device))
    loss_fn = nn.CrossEntropyLoss()
    params = [p for p in model.parameters() if p.requires_grad]
    total = sum(len(y) for _, y in batches)

    def gradient() -> object:
        sums = [torch.zeros_like(p) for p in params]
        for xb, yb in batches:
            grads = torch.autograd.grad(loss_fn(model(xb), yb), params)
            for acc, g in zip(sums, grads, strict=True):
                acc.add_(g, alpha=len(yb) / total)
        return sums

    cached = HessianOperator(model, loss_fn, batches, mode="eval")
    streamed = HessianOperator(model, loss_fn, batches, mode="eval", cache=False)
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(cached.size, generator=gen, dtype=cached.dtype).to(device)
    block = torch.randn(cached.size, 8, generator=gen, dtype=cached.dtype).to(device)
    fns = [gradient, lambda: cached.matvec(v), lambda: cached.matvec(block),
           lambda: streamed.matvec(v), lambda: streamed.matvec(block)]
    g, c1, c8, s1, s8 = interleaved_medians(fns, device, args.repeats)
    rows = [("full-data gradient", 1, g), ("Hessian product (default)", 1, c1),
            ("block of 8, per vector (default)", 8, c8 / 8),
            ("Hessian product (no cache)", 1, s1), ("block of 8, per vector (no cache)", 8, s8 / 8)]
    return [{"what": what, "passes": k, "ms": 1e3 * t, "ratio": t / g} for what, k, t in rows]


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="cuda, cpu or auto (default auto)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                        help="training precision for step 1 (default fp32)")
    parser.add_argument("--samples", type=int, default=1000, help="analysis samples")
    parser.add_argument("--trace-matvecs", type=int, default=40)
    parser.add_argument("--eigenvalues", type=int, default=3)
    parser.add_argument("--rtol", type=float, default=1e-3,
                        help="largest relative CPU/device difference accepted (default 1e-3)")
    parser.add_argument("--batch-size", type=int, default=128, help="timed training batch")
    parser.add_argument("--steps", type=int, default=5, help="training steps per timing")
    parser.add_argument("--repeats", type=int, default=5, help="timings per median")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads for the analysis and timings (default: torch's)")
    parser.add_argument("--scale", default="auto", choices=("auto", "full", "tiny", "none"),
                        help="curvature at scale: ResNet-18/50 at CIFAR and ImageNet sizes "
                             "(auto: full on CUDA, tiny smoke run elsewhere)")
    parser.add_argument("--scale-only", action="store_true",
                        help="run only the curvature-at-scale part (step 5)")
    parser.add_argument("--max-memory-gb", type=float, default=None,
                        help="refuse up front when a scale model would need more device memory "
                             "(default on CUDA: 90%% of the device's)")
    args = parser.parse_args(argv)
    with exact_float32():  # full float32 (no TF32) throughout: timings and checks alike
        return check(args)


def check(args) -> int:
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    cpu = torch.device("cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    clock: dict[str, float] = {}

    def timed(label: str, fn: Callable[[], object]):
        start = time.perf_counter()
        value = fn()
        synchronize(device)
        clock[label] = time.perf_counter() - start
        print(f"{label}: {clock[label]:.1f} s", file=sys.stderr, flush=True)
        return value

    # refuse up front, before anything runs, when a scale model would not fit
    planned = hessian_scale.guard(hessian_scale.configs_for(args.scale, device), device,
                                  args.max_memory_gb)
    checks, timings = [], []
    checkpoint = None
    if not args.scale_only:
        run_dir = args.out / "run"
        if run_dir.exists():  # a fresh run each time
            for path in run_dir.iterdir():
                path.unlink()
        checkpoint = timed(f"train ({device.type})",
                           lambda: train_checkpoint(device, args.out, args.epochs,
                                                    args.precision))
        torch.set_num_threads(threads)  # train() picks its own thread count
        on_device = timed(f"analyze ({device.type})", lambda: analyse(checkpoint, device, args))
        on_cpu = (on_device if device == cpu
                  else timed("analyze (cpu)", lambda: analyse(checkpoint, cpu, args)))
        from flatlab.analysis import write_outputs

        timed("report", lambda: write_outputs(on_device, args.out / "analysis", report=True))
        checks = compare(on_device["checkpoints"][0], on_cpu["checkpoints"][0], args.rtol)
        timings = step_timings(device, args) + hessian_timings(checkpoint, device, args)
    scale = timed("curvature at scale", lambda: hessian_scale.run(planned, device))

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"\ngpu_check on {device} ({name}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads")
    if checkpoint is not None:
        print(f"\n{device.type} vs cpu on {checkpoint} (rtol {args.rtol:g})")
        print(f"{'quantity':<14}{'max rel diff':>14}  ok")
        for row in checks:
            print(f"{row['quantity']:<14}{row['max_rel_diff']:>14.2e}  "
                  f"{'yes' if row['ok'] else 'NO'}")
        print(f"\ntimings on {device} (median of {args.repeats} interleaved rounds)")
        print(f"{'what':<36}{'passes':>7}{'ms':>10}{'ratio':>8}")
        for row in timings:
            print(f"{row['what']:<36}{row['passes']:>7}{row['ms']:>10.3f}{row['ratio']:>8.2f}")
        print("(step ratios: to the SGD fp32 step; Hessian ratios: to one full-data gradient)")
    if scale:
        hessian_scale.print_table(scale, device)
    print("\nwall clock: " + ", ".join(f"{k} {v:.1f} s" for k, v in clock.items()))

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["section", "what", "passes", "ms", "ratio",
                                                "max_rel_diff", "ok", "model", "params",
                                                "products", "peak_gb"], lineterminator="\n")
    writer.writeheader()
    for row in checks:
        writer.writerow({"section": f"{device.type}_vs_cpu", "what": row["quantity"],
                         "max_rel_diff": f"{row['max_rel_diff']:.3e}", "ok": row["ok"]})
    for row in timings:
        writer.writerow({"section": f"timing_{device.type}", "what": row["what"],
                         "passes": row["passes"], "ms": f"{row['ms']:.4f}",
                         "ratio": f"{row['ratio']:.3f}"})
    for row in scale:
        writer.writerow({"section": f"scale_{device.type}", "what": row["what"],
                         "model": row["model"], "params": row["params"],
                         "products": row["products"], "ms": f"{1e3 * row['seconds']:.1f}",
                         "ratio": f"{row['ratio']:.3f}", "peak_gb": f"{row['peak_gb']:.3f}"})
    atomic_write_text(args.out / "gpu_check.csv", buffer.getvalue())
    print(f"wrote {args.out / 'gpu_check.csv'} and {args.out / 'analysis'}", file=sys.stderr)
    failed = [row["quantity"] for row in checks if not row["ok"]]
    if failed:
        print(f"FAILED: {', '.join(failed)} differ between {device.type} and cpu",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main, prog="gpu_check"))
