"""``torch.distributed`` helpers: torchrun set-up, collectives, rank-0 I/O, sharding.

flatlab runs the same commands on one process or under ``torchrun``::

    torchrun --nproc_per_node 4 -m flatlab.train --optimizer nso ...
    torchrun --nproc_per_node 4 -m flatlab.analyze runs/nso

:func:`init_from_env` reads torchrun's ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` and starts
the process group (gloo for CPU runs; ``cpu:gloo,cuda:nccl`` for CUDA runs, so collectives on
CPU tensors keep working); without torchrun it does nothing and every helper below degrades to
its single-process meaning: :func:`rank` is 0, :func:`world_size` is 1, the reductions return
their input, :func:`barrier` returns at once. Library code can therefore call these helpers
unconditionally.

What is synchronised where (see the README's "Scaling out"):

* training: :func:`wrap_model` puts the model in ``DistributedDataParallel``; flatlab's
  perturbation optimizers run every pass in ``no_sync()`` and all-reduce the accumulated
  gradient once per step; rank 0 alone writes files and prints;
* analysis: the samples are :func:`shard`-ed across ranks and every Hessian product, loss and
  gradient is summed with :func:`all_reduce_sum`; landscape grid points are split across ranks
  and the results summed.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import io
import math
import os
import pickle
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from flatlab.errors import FlatlabError
from flatlab.io import lock_directory

__all__ = [
    "all_gather_cat", "all_reduce_max", "all_reduce_mean", "all_reduce_sum", "all_ranks_true",
    "barrier", "broadcast", "cleanup", "device_for", "hold_directory", "init_from_env",
    "is_initialized", "is_main_process", "launched_by_torchrun", "local_rank",
    "main_process_only", "rank", "replicas_equal", "shard", "silence_other_ranks", "spawn",
    "unwrap_model", "world_size", "wrap_model",
]

F = TypeVar("F", bound=Callable[..., Any])
DEFAULT_TIMEOUT = datetime.timedelta(minutes=30)


# --------------------------------------------------------------------------- who am I


def is_initialized() -> bool:
    """True inside an initialised ``torch.distributed`` process group."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """Number of processes in the group (1 without a process group)."""
    return dist.get_world_size() if is_initialized() else 1


_this_rank, _this_world_size = rank, world_size  # for functions whose arguments shadow them


def local_rank() -> int:
    """This process's rank on its machine: torchrun's ``LOCAL_RANK`` (0 without torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    """True on rank 0 (and without a process group): the process that writes and prints."""
    return rank() == 0


def launched_by_torchrun() -> bool:
    """True when torchrun (or another launcher using its variables) started this process."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


# --------------------------------------------------------------------------- set-up


def init_from_env(device: str | torch.device = "auto", *,
                  timeout: datetime.timedelta = DEFAULT_TIMEOUT) -> bool:
    """Start the process group from torchrun's environment; returns whether one is running.

    A no-op (``False``) without torchrun or with ``WORLD_SIZE=1``; ``True`` if a group was
    already initialised. ``device``: ``"cpu"`` -> the gloo backend; ``"cuda"`` (or ``"auto"``
    on a machine with CUDA) -> ``torch.cuda.set_device(LOCAL_RANK)`` and the backend
    ``"cpu:gloo,cuda:nccl"`` (NCCL for CUDA tensors, gloo for CPU tensors).
    """
    if is_initialized():
        return True
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) <= 1:
        return False
    if not dist.is_available():
        raise FlatlabError("torchrun started several processes but this PyTorch build has no "
                           "torch.distributed")
    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    kind = torch.device(device).type
    if kind == "cuda":
        torch.cuda.set_device(local_rank())
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, timeout=timeout)
    return True


def cleanup() -> None:
    """Destroy the process group if there is one (safe to call always)."""
    if is_initialized():
        dist.destroy_process_group()


def device_for(device: str | torch.device) -> torch.device:
    """The device this rank computes on: a bare ``cuda`` becomes ``cuda:<current device>``
    (``LOCAL_RANK`` after :func:`init_from_env`); anything else is returned as is."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def wrap_model(model: nn.Module, **ddp_kwargs: Any) -> nn.Module:
    """``DistributedDataParallel(model)`` when more than one process runs, else ``model``.

    The model must already be on this rank's device (:func:`device_for`). DDP broadcasts
    rank 0's parameters and buffers at construction, so all replicas start equal.
    """
    if world_size() == 1:
        return model
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model
    device = next(model.parameters()).device
    if device.type == "cuda":
        ddp_kwargs.setdefault("device_ids", [device.index])
        ddp_kwargs.setdefault("output_device", device.index)
    return nn.parallel.DistributedDataParallel(model, **ddp_kwargs)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside a ``DistributedDataParallel`` wrapper (or ``model`` itself):
    save, load and evaluate this one (its ``state_dict`` keys have no ``module.`` prefix)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# --------------------------------------------------------------------------- collectives


def _collective_device(tensor: Tensor) -> torch.device:
    """Where a collective on ``tensor`` runs: on the tensor's device when the backend serves
    it, else staged (CUDA tensors through the CPU for gloo alone; CPU tensors through the
    current CUDA device for NCCL alone)."""
    backend = str(dist.get_backend())
    if tensor.device.type == "cuda" and "nccl" not in backend:
        return torch.device("cpu")
    if tensor.device.type == "cpu" and backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return tensor.device


def _reduce(tensor: Tensor, op: str) -> Tensor:
    if world_size() == 1:
        return tensor
    op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
    device = _collective_device(tensor)
    if device == tensor.device:
        dist.all_reduce(tensor, op=op)
        return tensor
    staged = tensor.to(device)
    dist.all_reduce(staged, op=op)
    return tensor.copy_(staged)


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over all ranks, in place; returns it (unchanged on one process)."""
    return _reduce(tensor, "sum")


def all_reduce_mean(tensor: Tensor) -> Tensor:
    """Mean of ``tensor`` over all ranks, in place (floating point); returns it."""
    all_reduce_sum(tensor)
    if world_size() > 1:
        tensor.div_(world_size())
    return tensor


def all_reduce_max(tensor: Tensor) -> Tensor:
    """Elementwise maximum over all ranks, in place; returns it."""
    return _reduce(tensor, "max")


def all_ranks_true(flag: bool, device: str | torch.device = "cpu") -> bool:
    """True only if ``flag`` is true on every rank (e.g. "my loss is finite"), so that all
    ranks take the same branch."""
    if world_size() == 1:
        return bool(flag)
    value = torch.tensor([0.0 if flag else 1.0], device=device)
    return float(all_reduce_max(value)) == 0.0


def broadcast(tensor: Tensor, src: int = 0) -> Tensor:
    """Overwrite ``tensor`` with rank ``src``'s value, in place; returns it."""
    if world_size() == 1:
        return tensor
    device = _collective_device(tensor)
    staged = tensor if device == tensor.device else tensor.to(device)
    dist.broadcast(staged, src=src)
    return tensor if staged is tensor else tensor.copy_(staged)


def all_gather_cat(tensor: Tensor, dim: int = 0) -> Tensor:
    """Concatenate every rank's ``tensor`` along ``dim`` in rank order (sizes along ``dim``
    may differ between ranks; the other dimensions, dtype and device must agree). Every rank
    gets the whole result. Uses tensor collectives only (no pickling)."""
    world = world_size()
    if world == 1:
        return tensor
    device = _collective_device(tensor)
    moved = tensor.movedim(dim, 0).contiguous().to(device)
    sizes = torch.zeros(world, dtype=torch.int64, device=device)
    sizes[rank()] = moved.shape[0]
    dist.all_reduce(sizes)
    longest = int(sizes.max())
    padded = moved.new_zeros((longest, *moved.shape[1:]))
    padded[: moved.shape[0]] = moved
    pieces = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(pieces, padded)
    out = torch.cat([piece[: int(n)] for piece, n in zip(pieces, sizes.tolist(), strict=True)])
    return out.to(tensor.device).movedim(0, dim)


def barrier() -> None:
    """Wait for every rank (no-op on one process)."""
    if world_size() > 1:
        dist.barrier()


def replicas_equal(module: nn.Module) -> bool:
    """True if every rank holds bit-identical parameters and buffers (compared with rank 0's);
    a debugging check that replicas have not drifted apart."""
    module = unwrap_model(module)
    tensors = [t.detach() for t in (*module.parameters(), *module.buffers())]
    if world_size() == 1 or not tensors:
        return True
    flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors])
    reference = broadcast(flat.clone(), src=0)
    return all_ranks_true(bool(torch.equal(flat, reference)), device=flat.device)


# --------------------------------------------------------------------------- work split


def shard(items: Sequence[Any] | Tensor, rank: int | None = None,
          world_size: int | None = None) -> Any:
    """This rank's contiguous share of ``items``: shares differ in length by at most one, the
    first ``len % world`` ranks get the longer ones, and concatenating them in rank order gives
    ``items`` back. ``rank``/``world_size`` default to this process's."""
    r = _this_rank() if rank is None else rank
    w = _this_world_size() if world_size is None else world_size
    if w < 1 or not 0 <= r < w:
        raise ValueError(f"rank must be in [0, world_size), got rank={r}, world_size={w}")
    base, extra = divmod(len(items), w)
    start = r * base + min(r, extra)
    return items[start:start + base + (1 if r < extra else 0)]


# --------------------------------------------------------------------------- rank-0 I/O


def main_process_only(fn: F) -> F:
    """Decorator: run ``fn`` on rank 0 only; other ranks get ``None`` without calling it.
    Use it for functions that write files or print."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs) if is_main_process() else None

    return wrapper  # type: ignore[return-value]


@contextlib.contextmanager
def silence_other_ranks() -> Iterator[bool]:
    """Context manager: on ranks other than 0, ``stdout`` and ``stderr`` are discarded inside
    it (prints, progress bars); yields whether this is the main process."""
    if is_main_process():
        yield True
        return
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        yield False


@contextlib.contextmanager
def hold_directory(path: str | os.PathLike) -> Iterator[None]:
    """Hold :func:`flatlab.io.lock_directory` on ``path`` (rank 0, the writer) for the block.

    A collective: when rank 0 is refused (another process holds the directory), every rank
    raises a :class:`~flatlab.errors.FlatlabError` (rank 0's names the holder's pid), so no
    rank waits for the others in a collective that never comes.
    """
    with contextlib.ExitStack() as held:
        refused: FlatlabError | None = None
        if is_main_process():
            try:
                held.enter_context(lock_directory(path))
            except FlatlabError as err:
                refused = err
        if not all_ranks_true(refused is None):
            raise refused or FlatlabError(f"{path}: rank 0 could not lock it")
        yield


# --------------------------------------------------------------------------- local launcher


def spawn(fn: Callable[..., Any], world_size: int = 2, *, args: Sequence[Any] = (),
          timeout: float = 120.0, threads: int | None = 1) -> list[Any]:
    """Run ``fn(*args)`` in ``world_size`` fresh processes joined in a gloo process group (as
    torchrun would, on this machine) and return their results in rank order.

    For tests, notebooks and benchmarks; ``fn`` must be importable (a module-level function)
    and its result picklable. Each process sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and
    (with ``threads``) ``torch.set_num_threads``. A worker's exception is re-raised here as a
    ``RuntimeError`` carrying its traceback; after ``timeout`` seconds all workers are killed
    and ``TimeoutError`` is raised.
    """
    import multiprocessing as mp
    import queue as queue_module

    ctx = mp.get_context("spawn")
    results: list[Any] = [None] * world_size
    with tempfile.TemporaryDirectory(prefix="flatlab-spawn-") as tmp:
        store = os.path.join(tmp, "store")
        messages = ctx.Queue()
        processes = [ctx.Process(target=_spawn_worker, daemon=True,
                                 args=(fn, r, world_size, store, tuple(args), threads, timeout,
                                       messages))
                     for r in range(world_size)]
        for process in processes:
            process.start()
        deadline = time.monotonic() + timeout
        try:
            received = 0
            while received < world_size:
                try:
                    worker_rank, ok, value = messages.get(timeout=0.2)
                except queue_module.Empty:
                    dead = [r for r, p in enumerate(processes)
                            if p.exitcode not in (None, 0)]
                    if dead:  # died without reporting (killed, or failed to start)
                        raise RuntimeError(f"rank {dead[0]} exited with code "
                                           f"{processes[dead[0]].exitcode}") from None
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"spawned workers did not finish in {timeout:g} s") \
                            from None
                    continue
                if not ok:
                    raise RuntimeError(f"rank {worker_rank} failed:\n{value}")
                results[worker_rank] = pickle.loads(value)
                received += 1
            for process in processes:
                process.join(timeout=max(deadline - time.monotonic(), 1.0))
        finally:
            for process in processes:
                if process.is_alive():
                    process.kill()
                    process.join()
    return results


def _spawn_worker(fn: Callable[..., Any], worker_rank: int, size: int, store: str,
                  args: tuple, threads: int | None, timeout: float, messages: Any) -> None:
    os.environ.update(RANK=str(worker_rank), WORLD_SIZE=str(size), LOCAL_RANK=str(worker_rank),
                      LOCAL_WORLD_SIZE=str(size))
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=worker_rank,
                                world_size=size,
                                timeout=datetime.timedelta(seconds=max(math.ceil(timeout), 1)))
        try:
            value = fn(*args)
            # no rank tears the group down while another still talks to it (gloo can abort
            # a process at exit otherwise)
            dist.barrier()
        finally:
            dist.destroy_process_group()
    except BaseException:  # report everything, including SystemExit, to the parent
        messages.put((worker_rank, False, traceback.format_exc()))
        sys.stderr.flush()
        return
    # plain pickle bytes: the queue's own pickler would pass tensors through shared memory,
    # which is gone once this process exits
    messages.put((worker_rank, True, pickle.dumps(value)))
