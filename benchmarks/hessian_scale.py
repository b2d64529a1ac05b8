"""Curvature at the scale of real networks: ResNet-18 and ResNet-50 at CIFAR and ImageNet sizes.

For each model (timm's ``resnet18`` / ``resnet50`` when timm imports, else flatlab's CIFAR
``resnet`` widened to the same parameter count) on random inputs and labels, eval mode:

* one full-data gradient and one Hessian-vector product, and their ratio;
* ``top_eigenvalues(k)``, the same with ``basis_device="cpu"`` (CUDA only), ``trace``
  (Hutch++) and ``spectral_density``: wall time, products and peak extra memory (CUDA:
  ``torch.cuda.max_memory_allocated`` above what was allocated before; CPU: peak resident set).

Before anything runs, the memory every model needs is estimated (weights, gradient, the
activations the products keep, the largest estimator's vectors and the products' working
memory) and the whole check is refused, with one message, if any model exceeds
``--max-memory-gb`` (default on CUDA: 90% of the device's memory). ``--size tiny`` is a CPU
smoke run (small flatlab ResNet, 16 x 16 images, few products).

    python benchmarks/hessian_scale.py [--device cuda] [--size auto|full|tiny] [--max-memory-gb 40]

(``benchmarks/gpu_check.py`` runs the same check as its last part.)
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
from hessian_memory import peak_memory, sync
from torch import nn

from flatlab._compat import ensure_torchvision_importable
from flatlab.errors import FlatlabError
from flatlab.hessian import HessianOperator, spectral_density, top_eigenvalues, trace
from flatlab.hessian.lanczos import default_basis


@dataclass(frozen=True)
class Config:
    """One model at one input size, and how much of each estimator to run."""

    name: str
    arch: str                       # timm name (resnet18 / resnet50) or "tiny"
    input_shape: tuple[int, int, int]
    num_classes: int
    samples: int
    batch: int
    k: int = 5
    trace_matvecs: int = 100
    density_runs: int = 4
    density_steps: int = 64


FULL = (Config("resnet18-cifar", "resnet18", (3, 32, 32), 10, 256, 128),
        Config("resnet50-cifar", "resnet50", (3, 32, 32), 10, 256, 128),
        Config("resnet18-imagenet", "resnet18", (3, 224, 224), 1000, 64, 32),
        Config("resnet50-imagenet", "resnet50", (3, 224, 224), 1000, 64, 32))
TINY = (Config("resnet8-tiny", "tiny", (3, 16, 16), 10, 8, 4, k=2, trace_matvecs=12,
               density_runs=2, density_steps=8),)
_FALLBACK = {"resnet18": {"depth": 20, "width": 104}, "resnet50": {"depth": 56, "width": 84}}
_PRODUCT_BYTES = 32  # operator working memory per parameter and vector in a block (float32)
_GRAPH_COPIES = 4    # saved tensors of a double-backward graph per activation (operator's rule)


def build(config: Config) -> nn.Module:
    """The model of ``config`` (timm when importable, else flatlab's ResNet of similar size)."""
    from flatlab.models import build_model

    if config.arch == "tiny":
        return build_model("resnet", config.input_shape, config.num_classes, depth=8, width=8)
    ensure_torchvision_importable()
    try:
        import timm
    except ImportError:
        return build_model("resnet", config.input_shape, config.num_classes,
                           **_FALLBACK[config.arch])
    return timm.create_model(config.arch, pretrained=False, num_classes=config.num_classes)


def activation_numel(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Outputs of all leaf modules for one sample (a forward pass on the meta device)."""
    meta = copy.deepcopy(model).to("meta").eval()
    total = [0]

    def record(module: nn.Module, inputs: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor):
            total[0] += output.numel()

    hooks = [m.register_forward_hook(record) for m in meta.modules() if not list(m.children())]
    with torch.no_grad():
        meta(torch.empty(2, *input_shape, device="meta"))
    for hook in hooks:
        hook.remove()
    return total[0] // 2


def estimate_bytes(config: Config, model: nn.Module, block: int = 4) -> dict[str, int]:
    """Rough peak need of ``config`` (float32). The operator keeps every batch's graph when
    they fit in its 1 GiB cache budget; otherwise it streams the data in chunks of about
    2^22 activation entries times vectors (at least one sample), keeping one chunk's graph."""
    params = sum(p.numel() for p in model.parameters())
    per_sample = activation_numel(model, config.input_shape)
    graphs = _GRAPH_COPIES * 4 * per_sample * config.samples
    chunk = _GRAPH_COPIES * 4 * max(2**22, per_sample * block)
    activations = graphs if graphs <= 2**30 else chunk
    vectors = max(4 * (default_basis(config.k) + 1 + config.k),   # top-k
                  4 * (config.trace_matvecs // 3 + 3),             # Hutch++ sketch + block
                  4 * 3 * config.density_runs + 8)                 # SLQ, local
    total = params * (4 + 4 + vectors + _PRODUCT_BYTES * block) + activations
    return {"params": params, "activations": activations, "total": total}


def guard(configs: tuple[Config, ...], device: torch.device,
          max_memory_gb: float | None) -> list[tuple[Config, nn.Module, dict[str, int]]]:
    """Build every model and refuse the whole run up front if one would not fit."""
    limit = max_memory_gb
    if limit is None and device.type == "cuda":
        limit = 0.9 * torch.cuda.get_device_properties(device).total_memory / 2**30
    planned = []
    for config in configs:
        torch.manual_seed(0)
        model = build(config)
        need = estimate_bytes(config, model)
        if limit is not None and need["total"] > limit * 2**30:
            raise FlatlabError(
                f"{config.name} needs about {need['total'] / 2**30:.1f} GB "
                f"({need['params'] / 1e6:.1f}M parameters, {need['activations'] / 2**30:.1f} GB "
                f"of activations for {config.samples} samples) but --max-memory-gb is "
                f"{limit:.1f}; nothing was run (raise the limit or run the tiny smoke size)")
        planned.append((config, model, need))
    return planned


def median_seconds(fn, device: torch.device, repeats: int = 3) -> float:
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def run_config(config: Config, model: nn.Module, device: torch.device) -> list[dict]:
    """Timings and peak memory of the gradient, one product and each estimator."""
    model = model.to(device).eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(config.samples, *config.input_shape, generator=gen).to(device)
    y = torch.randint(0, config.num_classes, (config.samples,), generator=gen).to(device)
    batches = list(zip(x.split(config.batch), y.split(config.batch), strict=True))
    loss_fn = nn.CrossEntropyLoss()
    params = [p for p in model.parameters() if p.requires_grad]
    size = sum(p.numel() for p in params)

    def gradient() -> None:
        for xb, yb in batches:
            torch.autograd.grad(loss_fn(model(xb), yb) * len(yb) / config.samples, params)

    op = HessianOperator(model, loss_fn, batches)
    probe = [torch.randn(size, generator=gen).to(device)]
    seconds_gradient = median_seconds(gradient, device)
    seconds_product = median_seconds(lambda: op.matvec(probe[0]), device)
    probe.clear()  # not part of the estimators' baseline
    rows = [{"model": config.name, "params": size, "what": "gradient",
             "seconds": seconds_gradient, "products": 0, "peak_gb": math.nan, "ratio": 1.0},
            {"model": config.name, "params": size, "what": "one product",
             "seconds": seconds_product, "products": 1, "peak_gb": math.nan,
             "ratio": seconds_product / seconds_gradient}]
    estimators = [(f"top-{config.k}", lambda: top_eigenvalues(op, k=config.k).matvecs)]
    if device.type == "cuda":
        estimators.append((f"top-{config.k}, basis on cpu",
                           lambda: top_eigenvalues(op, k=config.k, basis_device="cpu").matvecs))
    estimators += [
        (f"trace hutch++ {config.trace_matvecs}",
         lambda: trace(op, num_matvecs=config.trace_matvecs).num_matvecs),
        (f"density {config.density_runs}x{config.density_steps}",
         lambda: spectral_density(op, num_runs=config.density_runs,
                                  num_steps=config.density_steps).matvecs)]
    for what, estimator in estimators:
        record: dict[str, int] = {}
        start = time.perf_counter()
        with peak_memory(device.type, record):
            products = estimator()
            sync(device)
        seconds = time.perf_counter() - start
        rows.append({"model": config.name, "params": size, "what": what, "seconds": seconds,
                     "products": products, "peak_gb": record["peak"] / 2**30,
                     "ratio": seconds / products / seconds_gradient})
    return rows


def run(planned: list[tuple[Config, nn.Module, dict[str, int]]],
        device: torch.device) -> list[dict]:
    """Every planned model in turn (``planned`` from :func:`guard`)."""
    rows = []
    for config, model, need in planned:
        print(f"{config.name}: {need['params'] / 1e6:.1f}M parameters, estimated peak "
              f"{need['total'] / 2**30:.1f} GB", file=sys.stderr, flush=True)
        rows += run_config(config, model, device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def configs_for(size: str, device: torch.device) -> tuple[Config, ...]:
    """``size`` "full", "tiny", "none", or "auto" (full on CUDA, tiny elsewhere)."""
    if size == "auto":
        size = "full" if device.type == "cuda" else "tiny"
    return {"full": FULL, "tiny": TINY, "none": ()}[size]


def print_table(rows: list[dict], device: torch.device) -> None:
    print(f"\ncurvature at scale on {device} (peak: extra memory during the call; ratio: "
          "seconds per product / one gradient)")
    print(f"{'model':18} {'params':>7} {'what':22} {'s':>8} {'products':>8} {'peak GB':>8} "
          f"{'B/param':>8} {'ratio':>6}")
    for r in rows:
        per_param = r["peak_gb"] * 2**30 / r["params"]
        print(f"{r['model']:18} {r['params'] / 1e6:>6.2f}M {r['what']:22} {r['seconds']:>8.2f} "
              f"{r['products']:>8} {r['peak_gb']:>8.2f} {per_param:>8.0f} {r['ratio']:>6.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", default="auto", choices=("auto", "full", "tiny"))
    parser.add_argument("--max-memory-gb", type=float, default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    try:
        rows = run(guard(configs_for(args.size, device), device, args.max_memory_gb), device)
    except FlatlabError as err:
        print(f"hessian_scale: {err}", file=sys.stderr)
        return 2
    print_table(rows, device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
