"""Speed-up of the analysis on 2 processes (torch.distributed, gloo, CPU) over 1 process.

    python benchmarks/distributed_speedup.py [CHECKPOINT] [--samples 4000] [--repeats 3]

Runs the same ``flatlab.analyze`` computation (Hessian trace, top eigenvalues and a 1-D loss
slice of one checkpoint) as

* 1 process x 1 thread (the reference),
* 1 process x P threads (what one process makes of the same cores),
* P processes x 1 thread each (``torchrun --nproc_per_node P``, launched here with
  :func:`flatlab.distributed.spawn`: samples sharded, every product all-reduced, slice points
  split),

interleaved ``--repeats`` times, and prints the median analysis time (process start-up and
checkpoint loading excluded: the clock runs between two barriers), the speed-up over the
reference, the busiest rank's process CPU time (on a machine shared with other programs the
wall clock measures the load; the CPU-time ratio is the speed-up to expect on idle cores) and
whether the numbers equal the single-process ones. Without CHECKPOINT a small
model is trained first (one epoch of SGD on MNIST-1D, ``mlp``). Writes
``benchmarks/results/distributed_speedup.csv``. Other programs using the cores make the
numbers noisy: compare the columns of one run, not runs.
"""

from __future__ import annotations

import csv
import io
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from flatlab import distributed
from flatlab.errors import ArgumentParser, run_cli
from flatlab.io import atomic_write_text

DEFAULT_CSV = Path(__file__).parent / "results" / "distributed_speedup.csv"
COMPARED = ("loss", "trace", "eigenvalues")


def timed_analysis(checkpoint: str, options_kwargs: dict) -> dict:
    """One rank's part: load, wait for all, analyse, wait for all; seconds between barriers."""
    from flatlab.analyze import AnalyzeOptions, analyze, load_checkpoints

    options = AnalyzeOptions(**options_kwargs)
    loaded = load_checkpoints([checkpoint], options)
    distributed.barrier()
    start, cpu_start = time.perf_counter(), time.process_time()
    result = analyze(loaded, options)
    cpu = time.process_time() - cpu_start
    distributed.barrier()
    seconds = time.perf_counter() - start
    entry = result["checkpoints"][0]
    return {"seconds": seconds, "cpu_seconds": cpu,
            **{key: entry[key] for key in (*COMPARED, "landscape_1d")}}


def _flat(entry: dict) -> list[float]:
    values = [entry["loss"], entry["trace"], *entry["eigenvalues"]]
    return values + list(entry["landscape_1d"]["loss"])


def make_checkpoint(directory: Path) -> Path:
    from flatlab.training import TrainConfig, train

    config = TrainConfig(model="mlp", optimizer="sgd", epochs=1, device="cpu",
                         out=str(directory / "run"))
    return train(config, progress=False).checkpoint


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="distributed_speedup", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?", default=None)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--trace-matvecs", type=int, default=100)
    parser.add_argument("--eigenvalues", type=int, default=5)
    parser.add_argument("--grid-points", type=int, default=21)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--csv", type=Path, default=DEFAULT_CSV)
    args = parser.parse_args(argv)
    p = args.processes
    with tempfile.TemporaryDirectory(prefix="flatlab-speedup-") as tmp:
        checkpoint = args.checkpoint or str(make_checkpoint(Path(tmp)))
        options = dict(trace=True, eigenvalues=args.eigenvalues, density=False,
                       landscape=("1d",), samples=args.samples, batch_size=args.batch_size,
                       trace_matvecs=args.trace_matvecs, grid_points=args.grid_points,
                       device="cpu", progress=False)
        configs = [("1 process x 1 thread", 1, 1), (f"1 process x {p} threads", 1, p),
                   (f"{p} processes x 1 thread", p, 1)]
        times: dict[str, list[float]] = {name: [] for name, _, _ in configs}
        cpu_times: dict[str, list[float]] = {name: [] for name, _, _ in configs}
        results: dict[str, list[dict]] = {}
        for repeat in range(args.repeats):
            for name, world, threads in configs[repeat % 3:] + configs[:repeat % 3]:
                ranks = distributed.spawn(timed_analysis, world,
                                          args=(checkpoint, dict(options, threads=threads)),
                                          threads=threads, timeout=1800)
                times[name].append(max(r["seconds"] for r in ranks))
                cpu_times[name].append(max(r["cpu_seconds"] for r in ranks))
                results[name] = ranks
                print(f"  {name}: {times[name][-1]:.2f} s (busiest rank's CPU time "
                      f"{cpu_times[name][-1]:.2f} s)", file=sys.stderr, flush=True)
    reference = _flat(results[configs[0][0]][0])
    base = statistics.median(times[configs[0][0]])
    cpu_base = statistics.median(cpu_times[configs[0][0]])
    rows = []
    for name, world, threads in configs:
        median = statistics.median(times[name])
        cpu = statistics.median(cpu_times[name])
        diffs = [max(abs(a - b) / max(abs(b), 1e-12) for a, b in
                     zip(_flat(r), reference, strict=True)) for r in results[name]]
        rows.append({"configuration": name, "processes": world, "threads_per_process": threads,
                     "seconds": round(median, 3), "speedup": round(base / median, 3),
                     "cpu_seconds_busiest_rank": round(cpu, 3),
                     "cpu_speedup": round(cpu_base / cpu, 3),
                     "max_rel_diff": f"{max(diffs):.1e}"})
    print(f"analysis of {checkpoint}: {args.samples} samples, trace ({args.trace_matvecs} "
          f"products), top-{args.eigenvalues} eigenvalues, 1-D slice ({args.grid_points} "
          f"points); median of {args.repeats}, {torch.get_num_threads()} cores visible")
    print(f"{'configuration':<28}{'wall s':>8}{'speed-up':>10}{'CPU s':>8}{'CPU speed-up':>14}"
          f"{'max rel diff':>14}")
    for row in rows:
        print(f"{row['configuration']:<28}{row['seconds']:>8.2f}{row['speedup']:>10.2f}"
              f"{row['cpu_seconds_busiest_rank']:>8.2f}{row['cpu_speedup']:>14.2f}"
              f"{row['max_rel_diff']:>14}")
    print("CPU s: process CPU time of the busiest rank; its speed-up is the wall-clock speed-up "
          "to expect on otherwise idle cores (1 thread per process)")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(args.csv, buffer.getvalue())
    print(f"wrote {args.csv}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main, prog="distributed_speedup"))
