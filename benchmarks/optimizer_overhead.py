"""Time per training step of SGD, SAM and NSO side by side (ratios to SGD).

    python benchmarks/optimizer_overhead.py [--repeats 30] [--batch-size 128] [--csv PATH]

Every optimizer trains its own copy of the same model (flatlab's default ``mlp`` on MNIST-1D)
on the same batches. Measurements are interleaved: each round times a block of steps for every
optimizer in turn (rotating the order), after warm-up rounds; the table reports the median
over rounds. "passes" is the number of forward/backward passes per step, so "ratio / passes"
shows the cost of everything besides them (1.00 = none). NSO with k perturbations needs 2k
passes; "nso k=1 +clean" adds the clean pass that the official implementation always runs.
"+scaler" rows run the fp16 recipe's bookkeeping in fp32 (``scaler.scale(loss).backward()``,
``step(closure, scaler=scaler)``, ``scaler.update()``; no autocast): the cost of the
unscale, the inf/NaN check and its device sync, separated from any fp16 speed-up.
"""

from __future__ import annotations

import copy
import csv
import io
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from flatlab.data import load_dataset
from flatlab.errors import ArgumentParser, run_cli
from flatlab.io import atomic_write_text
from flatlab.models import build_model
from flatlab.optim import NSO, SAM, gradient_evaluations_per_step
from flatlab.optim._noise import standard_normals
from flatlab.runtime import resolve_device

DEFAULT_CSV = Path(__file__).parent / "results" / "optimizer_overhead.csv"

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    "sam": lambda p: SAM(p, rho=0.05, lr=0.05, momentum=0.9),
    "nso k=1": lambda p: NSO(p, sigma=0.01, num_perturbs=1, seed=0, lr=0.05, momentum=0.9),
    "nso k=2": lambda p: NSO(p, sigma=0.01, num_perturbs=2, seed=0, lr=0.05, momentum=0.9),
    "nso k=1 +clean": lambda p: NSO(p, sigma=0.01, num_perturbs=1, clean_weight=0.5, seed=0,
                                    lr=0.05, momentum=0.9),
    "sam +scaler": lambda p: SAM(p, rho=0.05, lr=0.05, momentum=0.9),
    "nso k=1 +scaler": lambda p: NSO(p, sigma=0.01, num_perturbs=1, seed=0, lr=0.05,
                                     momentum=0.9),
}
WITH_SCALER = ("sam +scaler", "nso k=1 +scaler")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(model: nn.Module, optimizer: torch.optim.Optimizer,
               batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
               scaler: torch.amp.GradScaler | None = None) -> float:
    """Seconds per step over ``batches`` (one step each, LBFGS-style closure for all; with
    ``scaler``: the fp16 recipe's calls, without autocast)."""
    loss_fn = nn.CrossEntropyLoss()
    device = batches[0][0].device
    synchronize(device)
    start = time.perf_counter()
    for x, y in batches:
        def closure(x=x, y=y):
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            (loss if scaler is None else scaler.scale(loss)).backward()
            return loss
        if scaler is None:
            optimizer.step(closure)
        else:
            optimizer.step(closure, scaler=scaler)
            scaler.update()
    synchronize(device)
    return (time.perf_counter() - start) / len(batches)


def time_noise(params: list[torch.Tensor], generator: torch.Generator, draws: int) -> float:
    """Seconds per N(0, I) draw for all ``params`` (NSO makes one per perturbation)."""
    synchronize(params[0].device)
    start = time.perf_counter()
    for _ in range(draws):
        standard_normals(generator, params)
    synchronize(params[0].device)
    return (time.perf_counter() - start) / draws


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="optimizer_overhead", description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30, help="timed rounds (default 30)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds (default 3)")
    parser.add_argument("--steps", type=int, default=10, help="steps per block (default 10)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: steadier timings on a busy machine)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    parser.add_argument("--csv", type=Path, default=DEFAULT_CSV)
    args = parser.parse_args(argv)
    if min(args.repeats, args.steps, args.batch_size, args.threads) < 1 or args.warmup < 0:
        parser.error("--repeats, --steps, --batch-size and --threads must be >= 1, --warmup >= 0")
    torch.set_num_threads(args.threads)

    device = resolve_device(args.device)
    data = load_dataset("mnist1d")
    torch.manual_seed(0)
    template = build_model("mlp", data.input_shape, data.num_classes).to(device)
    models = {name: copy.deepcopy(template) for name in OPTIMIZERS}
    optimizers = {name: make(models[name].parameters()) for name, make in OPTIMIZERS.items()}
    scalers = {name: torch.amp.GradScaler(device.type) for name in WITH_SCALER}
    order = torch.randperm(len(data.x_train), generator=torch.Generator().manual_seed(0))
    starts = range(0, len(order) - args.batch_size + 1, args.batch_size)
    batches = [(data.x_train[order[i:i + args.batch_size]].to(device),
                data.y_train[order[i:i + args.batch_size]].to(device)) for i in starts]
    times: dict[str, list[float]] = {name: [] for name in OPTIMIZERS}
    noise_times: list[float] = []
    generator = torch.Generator(device=device).manual_seed(0)
    names = list(OPTIMIZERS)
    for round_ in range(args.warmup + args.repeats):
        block = [batches[(round_ * args.steps + i) % len(batches)] for i in range(args.steps)]
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            seconds = time_steps(models[name], optimizers[name], block, scalers.get(name))
            if round_ >= args.warmup:
                times[name].append(seconds)
        seconds = time_noise(list(template.parameters()), generator, args.steps)
        if round_ >= args.warmup:
            noise_times.append(seconds)

    times["gaussian draw"] = noise_times
    rows = []
    for name, seconds in times.items():
        median = statistics.median(seconds)
        q1, _, q3 = statistics.quantiles(seconds, n=4) if len(seconds) > 1 else [median] * 3
        # ratio: median over rounds of (time / SGD's time in the same round)
        ratio = statistics.median(t / s for t, s in zip(seconds, times["sgd"], strict=True))
        passes = gradient_evaluations_per_step(optimizers[name]) if name in optimizers else 0
        rows.append({"optimizer": name, "passes": passes, "ms_per_step": round(1e3 * median, 4),
                     "ms_q1": round(1e3 * q1, 4), "ms_q3": round(1e3 * q3, 4),
                     "ratio_to_sgd": round(ratio, 3),
                     "ratio_per_pass": round(ratio / passes, 3) if passes else ""})
    params = sum(p.numel() for p in template.parameters())
    where = f"{torch.get_num_threads()} CPU threads" if device.type == "cpu" else str(device)
    print(f"mlp on mnist1d ({params} parameters), batch {args.batch_size}, {where}, "
          f"median of {args.repeats} interleaved rounds x {args.steps} steps")
    print(f"{'optimizer':<16} {'passes':>6} {'ms/step':>9} {'[q1, q3]':>19} {'x SGD':>6} "
          f"{'x SGD/pass':>10}")
    for r in rows:
        spread = f"[{r['ms_q1']:.3f}, {r['ms_q3']:.3f}]"
        per_pass = f"{r['ratio_per_pass']:.2f}" if r["passes"] else "-"
        print(f"{r['optimizer']:<16} {r['passes']:>6} {r['ms_per_step']:>9.3f} {spread:>19} "
              f"{r['ratio_to_sgd']:>6.2f} {per_pass:>10}")
    print("gaussian draw: one N(0, I) sample for all parameters (NSO draws k per step)")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(args.csv, buffer.getvalue())
    print(f"wrote {args.csv}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main, prog="optimizer_overhead"))
