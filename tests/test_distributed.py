"""flatlab.distributed and the torchrun paths: 2 gloo processes on CPU, compared with 1 process.

Every multi-process check runs inside one ``distributed.spawn`` per fixture (process start-up
and ``import torch`` dominate the cost), bounded in time; the tests then compare the returned
values.
"""

from __future__ import annotations

import contextlib
import io

import pytest
import torch
from torch import nn

from flatlab import distributed

pytestmark = pytest.mark.distributed

SPAWN_TIMEOUT = 90.0


# --------------------------------------------------------------------------- one process


def test_single_process_helpers_are_identities():
    assert not distributed.is_initialized()
    assert (distributed.rank(), distributed.world_size()) == (0, 1)
    assert distributed.is_main_process()
    t = torch.tensor([1.0, 2.0])
    assert distributed.all_reduce_sum(t) is t and t.tolist() == [1.0, 2.0]
    assert distributed.all_reduce_mean(t).tolist() == [1.0, 2.0]
    assert distributed.all_gather_cat(t) is t
    assert distributed.all_ranks_true(True) and not distributed.all_ranks_true(False)
    distributed.barrier()
    model = nn.Linear(2, 2)
    assert distributed.wrap_model(model) is model and distributed.unwrap_model(model) is model
    assert distributed.replicas_equal(model)
    assert distributed.main_process_only(lambda x: x + 1)(1) == 2
    assert distributed.init_from_env("cpu") is False  # no torchrun variables: nothing started


@pytest.mark.parametrize("length", [0, 1, 5, 7, 8])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_shard_splits_contiguously_into_near_equal_parts(length, world):
    items = list(range(length))
    parts = [distributed.shard(items, r, world) for r in range(world)]
    assert sum(parts, []) == items
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    tensor_parts = [distributed.shard(torch.arange(length), r, world) for r in range(world)]
    assert torch.cat(tensor_parts).tolist() == items


def test_shard_rejects_a_rank_outside_the_world():
    with pytest.raises(ValueError, match="rank must be in"):
        distributed.shard([1, 2], 2, 2)


def test_device_for_pins_bare_cuda_only():
    assert distributed.device_for("cpu") == torch.device("cpu")
    assert distributed.device_for(torch.device("cuda", 1)) == torch.device("cuda", 1)


# --------------------------------------------------------------------------- two processes


def _collectives() -> dict:
    r = distributed.rank()
    out: dict = {"rank": r, "world": distributed.world_size(),
                 "main": distributed.is_main_process()}
    out["sum"] = distributed.all_reduce_sum(torch.tensor([1.0, float(r)])).tolist()
    out["mean"] = distributed.all_reduce_mean(torch.tensor([2.0 * r + 1.0])).tolist()
    out["max"] = distributed.all_reduce_max(torch.tensor([float(-r), float(r)])).tolist()
    out["gather"] = distributed.all_gather_cat(torch.full((r + 1, 2), r)).tolist()
    out["gather_dim1"] = distributed.all_gather_cat(torch.full((1, 2 - r), r), dim=1).tolist()
    out["gather_empty"] = distributed.all_gather_cat(torch.arange(3 * r)).tolist()
    out["broadcast"] = distributed.broadcast(torch.tensor([r + 5.0])).tolist()
    out["all_true"] = [distributed.all_ranks_true(r == 0), distributed.all_ranks_true(True)]
    out["shard"] = distributed.shard(list(range(7)))
    out["main_only"] = distributed.main_process_only(lambda: "ran")()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        with distributed.silence_other_ranks() as is_main:
            print(f"hello from {r}")
    out["printed"], out["silence_yields"] = printed.getvalue(), is_main
    distributed.barrier()
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    out["replicas_equal"] = distributed.replicas_equal(model)
    if r == 1:
        with torch.no_grad():
            model.bias[0] += 1e-7
    out["replicas_after_drift"] = distributed.replicas_equal(model)
    torch.manual_seed(r)  # different initial weights: DDP must broadcast rank 0's
    wrapped = distributed.wrap_model(nn.Linear(3, 2))
    out["wrapped_is_ddp"] = isinstance(wrapped, nn.parallel.DistributedDataParallel)
    out["wrapped_equal"] = distributed.replicas_equal(wrapped)
    out["unwrapped"] = type(distributed.unwrap_model(wrapped)).__name__
    return out


COUNTED_METHODS = {  # name -> (build_optimizer arguments, expected all-reduces per step)
    "sgd": ({}, 0),  # plain DDP: the reducer's hook, once per bucket per step
    "nso": ({"sigma": 0.05, "num_perturbs": 2}, 1),  # 4 passes, one reduce
    "rwp": ({"sigma": 0.05}, 1),  # clean + perturbed pass, one reduce
    "sam": ({"rho": 0.05}, 2),  # g_0 must be averaged for the ascent step, then g
}
STEPS = 3


def _communication_counts() -> dict:
    """Per method: DDP comm-hook calls and explicit ``dist.all_reduce`` calls during STEPS
    optimizer steps (each pass of the perturbation optimizers must run in no_sync)."""
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    from flatlab.optim import build_optimizer, gradient_evaluations_per_step

    real_all_reduce = dist.all_reduce
    counts: dict = {}
    explicit: list[int] = []

    def counting_all_reduce(tensor, *args, **kwargs):
        explicit.append(tensor.numel())
        return real_all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = counting_all_reduce
    try:
        for method, (kwargs, _) in COUNTED_METHODS.items():
            torch.manual_seed(0)
            ddp = distributed.wrap_model(nn.Sequential(nn.Linear(6, 8), nn.Tanh(),
                                                       nn.Linear(8, 3)))
            hook_calls: list[int] = []

            def hook(state, bucket, hook_calls=hook_calls):
                hook_calls.append(bucket.buffer().numel())
                return allreduce_hook(None, bucket)

            ddp.register_comm_hook(None, hook)
            opt = build_optimizer(method, ddp.parameters(), lr=0.1, model=ddp, **kwargs)
            gen = torch.Generator().manual_seed(distributed.rank())
            x, y = torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)
            passes: list[int] = []

            def closure(opt=opt, ddp=ddp, x=x, y=y, passes=passes):
                opt.zero_grad()
                loss = nn.functional.cross_entropy(ddp(x), y)
                loss.backward()
                passes.append(1)
                return loss

            explicit.clear()
            for _ in range(STEPS):
                opt.step(closure)
            counts[method] = {"hook": list(hook_calls), "explicit": list(explicit),
                              "passes": len(passes),
                              "per_step": gradient_evaluations_per_step(opt),
                              "params": sum(p.numel() for p in ddp.parameters()),
                              "equal": distributed.replicas_equal(ddp)}
    finally:
        dist.all_reduce = real_all_reduce
    return counts


def _two_rank_checks(out: str, checkpoint: str) -> dict:
    return {"collectives": _collectives(), "comm": _communication_counts(),
            "operator": _operator_on_ranks(), "analysis": _analyze_on_ranks(checkpoint),
            "training": _train_on_ranks(out)}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    """One 2-process gloo run of every multi-process check (start-up dominates the cost)."""
    out = tmp_path_factory.mktemp("two-ranks")
    checkpoint = _analysed_checkpoint(out / "analysed")
    return distributed.spawn(_two_rank_checks, 2, args=(str(out), checkpoint),
                             timeout=SPAWN_TIMEOUT)


@pytest.fixture(scope="module")
def collectives(two_ranks) -> list[dict]:
    return [out["collectives"] for out in two_ranks]


def test_collectives_on_two_processes(collectives):
    for r, out in enumerate(collectives):
        assert (out["rank"], out["world"], out["main"]) == (r, 2, r == 0)
        assert out["sum"] == [2.0, 1.0]
        assert out["mean"] == [2.0]
        assert out["max"] == [0.0, 1.0]
        assert out["gather"] == [[0, 0], [1, 1], [1, 1]]
        assert out["gather_dim1"] == [[0, 0, 1]]
        assert out["gather_empty"] == [0, 1, 2]
        assert out["broadcast"] == [5.0]
        assert out["all_true"] == [False, True]
        assert out["shard"] == ([0, 1, 2, 3] if r == 0 else [4, 5, 6])


def test_rank_zero_alone_runs_io_and_prints(collectives):
    assert [out["main_only"] for out in collectives] == ["ran", None]
    assert [out["printed"] for out in collectives] == ["hello from 0\n", ""]
    assert [out["silence_yields"] for out in collectives] == [True, False]


def test_replica_check_and_wrapping(collectives):
    for out in collectives:
        assert out["replicas_equal"] is True
        assert out["replicas_after_drift"] is False  # a 1e-7 change on one rank is seen on both
        assert out["wrapped_is_ddp"] and out["wrapped_equal"] and out["unwrapped"] == "Linear"


def test_spawn_reports_a_worker_error():
    with pytest.raises(RuntimeError, match="(?s)rank 0 failed:.*ZeroDivisionError"):
        distributed.spawn(_fail, 1, timeout=SPAWN_TIMEOUT)


def _fail() -> None:
    1 / 0  # noqa: B018


@pytest.mark.parametrize("method", COUNTED_METHODS)
def test_perturbation_passes_run_without_ddp_reduces_and_reduce_once_per_step(two_ranks, method):
    expected = COUNTED_METHODS[method][1]
    for out in two_ranks:
        c = out["comm"][method]
        assert c["passes"] == STEPS * c["per_step"]
        assert c["equal"]  # replicas identical after the steps
        if method == "sgd":  # the reference: DDP's hook reduces every parameter once per step
            assert c["explicit"] == c["hook"]  # (the default hook calls dist.all_reduce)
            assert len(c["hook"]) % STEPS == 0 and sum(c["hook"]) == STEPS * c["params"]
            continue
        assert c["hook"] == []  # every forward/backward ran inside no_sync()
        # ``expected`` flat reduces per step, each of all gradients (+ one presence flag each)
        assert len(c["explicit"]) == STEPS * expected
        assert all(n == c["params"] + 4 for n in c["explicit"])


# --------------------------------------------------------------------------- training


TINY = {"dataset": "synthetic", "dataset_kwargs": {"train_size": 96, "test_size": 32},
        "model": "mlp", "model_kwargs": {"hidden": [16]}, "epochs": 2, "batch_size": 16,
        "lr": 0.1, "schedule": "cosine", "seed": 3, "device": "cpu"}
TRAIN_CASES = {
    "nso": {"optimizer": "nso", "sigma": 0.05, "num_perturbs": 2},
    "sam": {"optimizer": "sam", "rho": 0.05},
}


def _checkpoint_weights(run_dir) -> dict:
    from flatlab.checkpoint import read_checkpoint

    tensors, metadata = read_checkpoint(f"{run_dir}/model.safetensors")
    return {"weights": {k: v.tolist() for k, v in tensors.items()},
            "epoch": metadata["epoch"], "step": metadata["step"]}


def _train_on_ranks(out: str) -> dict:
    """Every TRAIN_CASES run on this rank: one epoch, then resumed to the second; the
    all-reduces each step makes are recorded by size."""
    import torch.distributed as dist

    from flatlab.errors import FlatlabError
    from flatlab.training import TrainConfig, train

    real_all_reduce = dist.all_reduce
    sizes: list[int] = []

    def counting_all_reduce(tensor, *args, **kwargs):
        sizes.append(tensor.numel())
        return real_all_reduce(tensor, *args, **kwargs)

    results: dict = {}
    dist.all_reduce = counting_all_reduce
    try:
        for name in TRAIN_CASES:
            results[name] = _train_then_resume(name, out, sizes)
        flat = {"independent_noise": True, "schedule": "none"}
        results["nso-independent"] = _train_then_resume("nso", out, **flat)
        for tag, independent in (("independent", True), ("shared", False)):
            config = dict(TINY, **TRAIN_CASES["nso"], schedule="none",
                          independent_noise=independent, out=f"{out}/straight-{tag}")
            result = train(TrainConfig(**config), progress=False)
            results[f"nso-{tag}-straight"] = _checkpoint_weights(result.out_dir)
    finally:
        dist.all_reduce = real_all_reduce
    try:
        train(TrainConfig(**dict(TINY, batch_size=15, out=f"{out}/odd")), progress=False)
    except FlatlabError as err:
        results["odd_batch_error"] = str(err)
    return results


def _train_then_resume(name: str, out, sizes: list | None = None, **changes) -> dict:
    """TINY with TRAIN_CASES[name] (and ``changes``): one epoch (``sizes`` then holds the
    all-reduce sizes), then ``--resume`` with ``epochs=2``; the final checkpoint, metrics."""
    from flatlab.training import TrainConfig, train

    tag = "-".join([name, *changes])
    config = dict(TINY, **TRAIN_CASES[name], **changes, out=f"{out}/{tag}")
    if sizes is not None:
        sizes.clear()
    train(TrainConfig(**dict(config, epochs=1)), progress=False)
    first_epoch = list(sizes) if sizes is not None else None
    result = train(TrainConfig(**config), progress=False, resume=True)
    return {"metrics": result.metrics, "reduce_sizes": first_epoch,
            **_checkpoint_weights(result.out_dir)}


@pytest.fixture(scope="module")
def two_process_training(two_ranks) -> list[dict]:
    return [out["training"] for out in two_ranks]


@pytest.mark.parametrize("name", TRAIN_CASES)
def test_two_process_training_equals_one_process_with_the_same_global_batch(
        two_process_training, tmp_path, name):
    reference = _train_then_resume(name, tmp_path)
    two = two_process_training[0][name]  # rank 0 wrote the files, every rank read them
    assert two_process_training[1][name]["weights"] == two["weights"]
    assert (two["epoch"], two["step"]) == (reference["epoch"], reference["step"]) == (2, 12)
    for key, value in reference["weights"].items():
        torch.testing.assert_close(torch.tensor(two["weights"][key]), torch.tensor(value),
                                   rtol=1e-5, atol=1e-6)
    for got, want in zip(two["metrics"], reference["metrics"], strict=True):
        assert got["grad_evals"] == want["grad_evals"]  # per process = the one-process count
        for key in ("train_loss", "train_acc", "test_loss", "test_acc"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize("name", TRAIN_CASES)
def test_two_process_training_reduces_gradients_once_per_step(two_process_training, name):
    params = 20 * 16 + 16 + 16 * 4 + 4
    tensors = 4
    gradient_reduces = {"nso": 1, "sam": 2}[name]  # SAM also averages g_0 for its ascent step
    steps = 96 // 16
    for rank in two_process_training:
        sizes = rank[name]["reduce_sizes"]
        # per step: the gradient reduce(s) of the perturbation optimizer and one 5-number
        # reduce of the step's statistics (loss sum, correct, count, non-finite, stop); nothing
        # else (no DDP bucket reduces). Per run, not per step: six 1-number agreements (the
        # directory lock: 2; one per write: state at step 0, config, epoch-end files, state)
        assert sorted(sizes) == sorted([params + tensors] * gradient_reduces * steps
                                       + [5] * steps + [1] * 6)


def test_the_global_batch_must_split_evenly_over_processes(two_process_training):
    for rank in two_process_training:
        assert rank["odd_batch_error"] == ("--batch-size 15 (the global batch) must be "
                                           "divisible by the number of processes, 2")


def test_independent_noise_per_process_changes_the_run_and_survives_resume(
        two_process_training):
    rank0 = two_process_training[0]
    independent, shared = rank0["nso-independent-straight"], rank0["nso-shared-straight"]
    gap = max(float((torch.tensor(independent["weights"][k]) - torch.tensor(v)).abs().max())
              for k, v in shared["weights"].items())
    assert 0 < gap < 0.1  # other noise draws, the same training otherwise
    # every rank's own noise stream was saved and restored: resuming changes nothing
    assert rank0["nso-independent"]["weights"] == independent["weights"]


def test_independent_noise_is_refused_for_optimizers_without_noise():
    from flatlab.errors import FlatlabError
    from flatlab.training import TrainConfig

    with pytest.raises(FlatlabError, match="--independent-noise applies to nso and rwp only"):
        TrainConfig(**dict(TINY, optimizer="sam", independent_noise=True)).validate()


def test_bf16_autocast_trains_with_float32_weights(tmp_path):
    from flatlab.checkpoint import read_checkpoint
    from flatlab.training import TrainConfig, train

    runs = {}
    for precision in ("fp32", "bf16"):
        config = TrainConfig(**dict(TINY, **TRAIN_CASES["nso"], epochs=1, precision=precision,
                                    out=str(tmp_path / precision)))
        runs[precision] = train(config, progress=False)
    fp32, _ = read_checkpoint(runs["fp32"].checkpoint)
    bf16, meta = read_checkpoint(runs["bf16"].checkpoint)
    assert meta["optimizer"]["kwargs"]["precision"] == "bf16"
    assert all(t.dtype == torch.float32 for t in bf16.values())
    gaps = [float((bf16[k] - fp32[k]).abs().max()) for k in fp32]
    assert 0 < max(gaps) < 0.05  # autocast was on (bf16 rounding), the run is the same run
    assert runs["bf16"].metrics[0]["train_loss"] == pytest.approx(
        runs["fp32"].metrics[0]["train_loss"], rel=0.02)


def test_torchrun_command_line(tmp_path):
    """``torchrun --nproc_per_node 2 -m flatlab.train``: exit 0, rank 0 alone prints and
    writes, the weights of ``python -m flatlab.train`` with the same flags."""
    import os
    import subprocess
    import sys

    from flatlab.training.cli import main

    flags = ["--dataset", "synthetic", "--dataset-arg", "train_size=96", "--dataset-arg",
             "test_size=32", "--model", "mlp", "--model-arg", "hidden=[16]", "--optimizer",
             "nso", "--sigma", "0.05", "--epochs", "1", "--batch-size", "16", "--seed", "3",
             "--device", "cpu", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "flatlab.train", *flags, "--out", str(tmp_path / "two")],
        capture_output=True, text=True, timeout=SPAWN_TIMEOUT, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("flatlab.train: synthetic") == 1  # rank 0 alone prints
    assert "cpu x 2 processes" in proc.stdout
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [
        ".lock", "config.toml", "metrics.csv", "model.safetensors", "train_state.safetensors"]
    assert main([*flags, "--out", str(tmp_path / "one")]) == 0
    two = _checkpoint_weights(tmp_path / "two")["weights"]
    for key, value in _checkpoint_weights(tmp_path / "one")["weights"].items():
        torch.testing.assert_close(torch.tensor(two[key]), torch.tensor(value), rtol=1e-5,
                                   atol=1e-6)



# --------------------------------------------------------------------------- analysis


ANALYSIS = {"trace": True, "trace_matvecs": 16, "eigenvalues": 3, "density": False,
            "landscape": ("1d",), "samples": 45, "batch_size": 8, "grid_points": 5,
            "device": "cpu", "progress": False}


def _analysed_checkpoint(out) -> str:
    """A small trained model (one process, a few SGD steps) to analyse."""
    from flatlab.checkpoint import save_checkpoint
    from flatlab.data import load_dataset
    from flatlab.models import build_model

    data = load_dataset("synthetic", train_size=64, test_size=16)
    torch.manual_seed(4)
    model = build_model("mlp", data.input_shape, data.num_classes, hidden=[12])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(20):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(data.x_train), data.y_train).backward()
        optimizer.step()
    path = out / "model.safetensors"
    save_checkpoint(path, model, {
        "model": {"name": "mlp", "kwargs": {"hidden": [12]},
                  "input_shape": list(data.input_shape), "num_classes": data.num_classes},
        "dataset": data.spec, "optimizer": {"name": "sgd", "kwargs": {"lr": 0.5}},
        "epoch": 20, "step": 20, "grad_evals": 20, "metrics": {}, "seed": 4,
        "run_name": "analysed"})
    return str(path)


def _analyze_on_ranks(checkpoint: str) -> dict:
    """``analyze`` of the checkpoint on this rank: 45 samples sharded 23 / 22 for the Hessian,
    slice points split; the result and the checkpoint path."""
    from flatlab.analyze import AnalyzeOptions, analyze

    return {"path": checkpoint, "analysis": analyze([checkpoint], AnalyzeOptions(**ANALYSIS))}


def _tiny_problem():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    gen = torch.Generator().manual_seed(6)
    x, y = torch.randn(11, 5, generator=gen), torch.randint(0, 3, (11,), generator=gen)
    return model, x, y


def _operator_on_ranks() -> dict:
    """HessianOperator(distributed=True) on this rank's shard of 11 samples (6 / 5, in
    batches of 4): one product, a block of 8 and the loss and gradient, with the sizes of the
    all-reduces each makes."""
    import torch.distributed as dist

    from flatlab.hessian import HessianOperator

    model, x, y = _tiny_problem()
    mine = distributed.shard(torch.arange(11))
    batches = [(x[i], y[i]) for i in mine.split(4)]
    op = HessianOperator(model, nn.CrossEntropyLoss(), batches, distributed=True)
    block = torch.randn(op.size, 8, generator=torch.Generator().manual_seed(7))
    real_all_reduce, sizes = dist.all_reduce, []

    def counting_all_reduce(tensor, *args, **kwargs):
        sizes.append(tensor.numel())
        return real_all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = counting_all_reduce
    try:
        results = {"one": op.matvec(block[:, 0]), "block": op.matvec(block)}
        results["reduces_for_products"] = list(sizes)
        loss, gradient = op.loss_and_gradient()
    finally:
        dist.all_reduce = real_all_reduce
    return {**results, "loss": loss, "gradient": gradient, "size": op.size}


def test_distributed_hessian_products_equal_the_one_process_products(two_ranks):
    from flatlab.hessian import HessianOperator

    model, x, y = _tiny_problem()
    op = HessianOperator(model, nn.CrossEntropyLoss(), [(x, y)])
    block = torch.randn(op.size, 8, generator=torch.Generator().manual_seed(7))
    exact = torch.func.hessian(lambda w: _flat_loss(model, w, x, y))(
        torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    loss, gradient = op.loss_and_gradient()
    for rank in two_ranks:
        got = rank["operator"]
        torch.testing.assert_close(got["block"], exact @ block, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["block"], op.matvec(block), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(got["one"], op.matvec(block[:, 0]), rtol=1e-6, atol=1e-7)
        # one all-reduce per product call, also for the block (sums and the sample count)
        assert got["reduces_for_products"] == [op.size + 1, 8 * op.size + 1]
        assert got["loss"] == pytest.approx(loss, rel=1e-6)
        torch.testing.assert_close(got["gradient"], gradient, rtol=1e-6, atol=1e-7)


def _flat_loss(model, flat, x, y):
    params, offset = {}, 0
    for name, p in model.named_parameters():
        params[name] = flat[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
    return nn.functional.cross_entropy(torch.func.functional_call(model, params, (x,)), y)


def test_distributed_analysis_equals_one_process(two_ranks):
    """Trace, top eigenvalues and the 1-D slice of ``analyze`` on 2 ranks equal the
    one-process numbers (sums in another order: float tolerance; the slice exactly)."""
    from flatlab.analyze import AnalyzeOptions, analyze

    one = analyze([two_ranks[0]["analysis"]["path"]], AnalyzeOptions(**ANALYSIS))
    want = one["checkpoints"][0]
    for rank in two_ranks:
        got = rank["analysis"]["analysis"]["checkpoints"][0]
        assert got["num_samples"] == want["num_samples"] == 45
        assert got["trace"] == pytest.approx(want["trace"], rel=1e-6)
        assert got["trace_stderr"] == pytest.approx(want["trace_stderr"], rel=1e-5)
        assert got["trace_matvecs"] == want["trace_matvecs"]
        assert got["eigenvalues"] == pytest.approx(want["eigenvalues"], rel=1e-6)
        assert got["eigen_matvecs"] == want["eigen_matvecs"]
        assert got["landscape_1d"] == want["landscape_1d"]
        assert got["loss"] == want["loss"] and got["accuracy"] == want["accuracy"]


def test_analysis_runs_without_tf32_and_restores_the_flags(tmp_path, monkeypatch):
    """On CUDA cuDNN convolutions default to TF32 (~1e-3 error); analyze switches it off."""
    from flatlab import analyze as A
    from flatlab.analysis import runner

    seen = []
    run_stage = runner.run_stage

    def recording(*args, **kwargs):
        seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
        return run_stage(*args, **kwargs)

    monkeypatch.setattr(runner, "run_stage", recording)
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        options = A.AnalyzeOptions(**dict(ANALYSIS, trace=False, eigenvalues=0, landscape=()))
        A.analyze([_analysed_checkpoint(tmp_path)], options)
        assert seen == [(False, False)]
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
