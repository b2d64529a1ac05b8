"""Checkpoints in, models and data out: resolving paths, naming checkpoints, the analysis subset.

A checkpoint is given as a ``.safetensors`` file or a run directory (its ``model.safetensors``,
or ``best.safetensors`` with ``checkpoint="best"``). Its model and data set are rebuilt from the
checkpoint's metadata; checkpoints on the same data set share one loaded copy. Names are the run
directory's name (a loose file's stem), prefixed by parent directories where two would collide.

The caller's ``options.model`` / ``options.dataset`` (``--model``, ``--dataset``) replace the
file's specs; a plain state dict (a ``.safetensors`` file without flatlab metadata, or a
``torch.save`` one with ``trust_pickle``) has none, so it needs both. A factory named there is the
caller's own words (consent); one named only by a file needs ``options.trust_code``.

Stored examples reach the model through ``Dataset.normalize`` (uint8 image folders: per-channel
statistics; float data: the identity), batch by batch, in every evaluation.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor, nn

from flatlab import distributed
from flatlab.analysis.options import AnalyzeOptions
from flatlab.checkpoint import CHECKPOINT_NAME, load_dataset_for, load_model, resolve_checkpoint
from flatlab.checkpoint.files import sniff
from flatlab.data import Dataset, load_dataset
from flatlab.errors import FlatlabError
from flatlab.runtime import resolve_device
from flatlab.training.rundir import BEST_NAME, CONFIG_NAME, METRICS_NAME


@dataclass
class LoadedCheckpoint:
    """A checkpoint resolved, its model rebuilt and its data set loaded (before any analysis)."""

    name: str
    path: Path
    run_dir: Path | None
    model: nn.Module
    metadata: dict
    dataset: Any = field(repr=False)


class SubsetBatches:
    """Re-iterable ``(normalize(x[indices]), y[indices])`` batches, gathered one batch at a time
    (memory: one batch), moved to ``device`` (stored dtype, e.g. uint8) and then normalised
    there (``normalize``: ``Dataset.normalize``; ``None`` is the identity)."""

    def __init__(self, x: Tensor, y: Tensor, indices: Tensor, batch_size: int,
                 device: torch.device | str = "cpu",
                 normalize: Callable[[Tensor], Tensor] | None = None):
        self.x, self.y, self.indices = x, y, indices
        self.batch_size, self.device = batch_size, torch.device(device)
        self.normalize = normalize

    def __len__(self) -> int:
        return math.ceil(len(self.indices) / self.batch_size)

    @property
    def num_samples(self) -> int:
        return len(self.indices)

    def shard(self) -> SubsetBatches:
        """This rank's share of the samples (under torchrun; all of them otherwise)."""
        return self.subset(distributed.shard(self.indices))

    def subset(self, indices: Tensor) -> SubsetBatches:
        """The same batches over other ``indices`` (into ``x``)."""
        return SubsetBatches(self.x, self.y, indices, self.batch_size, self.device,
                             self.normalize)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for start in range(0, len(self.indices), self.batch_size):
            idx = self.indices[start:start + self.batch_size]
            x = self.x[idx].to(self.device)
            yield (x if self.normalize is None else self.normalize(x)), self.y[idx].to(self.device)


def sample_indices(num_train: int, samples: int | None, seed: int) -> Tensor:
    """The analysis subset: ``samples`` distinct training indices (sorted), drawn with ``seed``;
    all of them when ``samples`` is None or at least ``num_train``."""
    if samples is None or samples >= num_train:
        return torch.arange(num_train)
    perm = torch.randperm(num_train, generator=torch.Generator().manual_seed(seed))
    return perm[:samples].sort().values


def analysis_batches(ck: LoadedCheckpoint, options: AnalyzeOptions) -> SubsetBatches:
    """The checkpoint's analysis subset of its training split, on its model's device."""
    data = ck.dataset
    indices = sample_indices(len(data.y_train), options.samples, options.seed)
    device = next(ck.model.parameters()).device
    return SubsetBatches(data.x_train, data.y_train, indices, options.batch_size, device,
                         data.normalize)


def resolve(path_or_run_dir: str | Path, which: str = "final") -> Path:
    """The checkpoint file: a file as given; in a run directory ``model.safetensors``
    (``which="final"``) or ``best.safetensors`` (``which="best"``)."""
    path = Path(path_or_run_dir).expanduser()
    if which == "best" and path.is_dir():
        best = path / BEST_NAME
        if not best.is_file():
            raise FlatlabError(f"run directory {str(path)!r} has no {BEST_NAME} (train "
                               f"with --keep best and a validation split to write it)")
        return best
    return resolve_checkpoint(path)


def run_dir_of(path: Path) -> Path | None:
    """The run directory holding checkpoint ``path``, or ``None`` for a loose file."""
    parent = path.parent
    if path.name == CHECKPOINT_NAME or any(
            (parent / f).is_file() for f in (METRICS_NAME, CONFIG_NAME)):
        return parent
    return None


def _base_name(path: Path, run_dir: Path | None) -> str:
    if run_dir is not None and path.name == CHECKPOINT_NAME:
        return run_dir.resolve().name or "model"
    if run_dir is not None:
        return f"{run_dir.resolve().name}/{path.stem}"
    return path.stem


def unique_names(paths: Sequence[Path]) -> list[str]:
    """Run directory names (file stems for loose files), prefixed by parent directories where two
    would otherwise collide: ``runs/a/nso``, ``runs/b/nso`` -> ``a/nso``, ``b/nso``."""
    run_dirs = [run_dir_of(p) for p in paths]
    names = [_base_name(p, r) for p, r in zip(paths, run_dirs, strict=True)]
    depth = [0] * len(paths)
    while len(set(names)) < len(names):
        changed = False
        clashing = {name for name in names if names.count(name) > 1}
        for i, name in enumerate(names):
            if name in clashing:
                anchor = (run_dirs[i] or paths[i].with_suffix("")).resolve()
                parents = anchor.parents
                if depth[i] < len(parents) - 1:
                    depth[i] += 1
                    names[i] = f"{parents[depth[i] - 1].name}/{name}"
                    changed = True
        if not changed:
            break
    seen: dict[str, int] = {}
    for i, name in enumerate(names):  # last resort: numbered
        if names.count(name) > 1:
            seen[name] = seen.get(name, 0) + 1
            names[i] = f"{name}-{seen[name]}"
    return names


def load_checkpoints(checkpoints: Sequence[str | Path], options: AnalyzeOptions
                     ) -> list[LoadedCheckpoint]:
    """Resolve every checkpoint, rebuild its model and data set. Raises :class:`FlatlabError`
    for a missing or corrupt file, a checkpoint given twice, or bad options; writes nothing."""
    options.validate()
    if not checkpoints:
        raise FlatlabError("no checkpoint given")
    device = distributed.device_for(resolve_device(options.device))
    paths = [resolve(c, options.checkpoint) for c in checkpoints]
    seen: dict[Path, str] = {}
    for given, path in zip(checkpoints, paths, strict=True):
        key = path.resolve()
        if key in seen:
            raise FlatlabError(f"checkpoint {str(path)!r} given twice ({seen[key]!r} and "
                               f"{str(given)!r})")
        seen[key] = str(given)
    given = _given_dataset(options)
    datasets: dict[str, Any] = {}
    loaded = []
    for name, path in zip(unique_names(paths), paths, strict=True):
        plain = not has_flatlab_metadata(path)
        if plain and (options.model is None or given is None):
            raise FlatlabError(
                f"{path} is a plain state dict (no flatlab metadata): name the model and the "
                f"data it was trained for: --model NAME [--model-arg KEY=VALUE] --dataset NAME "
                f"[--dataset-arg KEY=VALUE] [--data-dir DIR]")
        data = given
        if data is None:  # rebuilt from the file's metadata (read without the tensors)
            spec = file_metadata(path).get("dataset")
            key = json.dumps(spec, sort_keys=True)
            if key not in datasets:
                datasets[key] = load_dataset_for({"dataset": spec}, data_dir=options.data_dir,
                                                 trust_code=options.trust_code)
            data = datasets[key]
        spec = _given_model_spec(options, data)
        model, meta = load_model(path, device=device, trust_pickle=options.trust_pickle,
                                 trust_code=options.trust_code, model_spec=spec)
        # recorded in the results: the specs the checkpoint was analysed with
        if spec is not None:
            meta = {**meta, "model": {**(meta.get("model") or {}), **spec}}
        if given is not None:
            meta = {**meta, "dataset": data.spec}
        loaded.append(LoadedCheckpoint(name=name, path=path, run_dir=run_dir_of(path),
                                       model=model, metadata=meta, dataset=data))
    if options.interpolate is not None:
        interpolation_pair(loaded, options.interpolate)
    return loaded


def has_flatlab_metadata(path: Path) -> bool:
    """Whether ``path`` is a flatlab checkpoint (a safetensors file with a ``flatlab`` metadata
    entry) rather than a plain state dict; reads the header only."""
    return sniff(path) == "safetensors" and "flatlab" in _raw_metadata(path)


def file_metadata(path: Path) -> dict:
    """A flatlab checkpoint's metadata, from the header alone (validated later by
    ``load_model``, before any tensor is used)."""
    text = _raw_metadata(path).get("flatlab", "{}")
    try:
        meta = json.loads(text)
    except (ValueError, RecursionError) as err:
        raise FlatlabError(f"{path}: metadata is not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise FlatlabError(f"{path}: metadata must be a JSON object")
    return meta


def _raw_metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            return fh.metadata() or {}
    except Exception as err:  # the file's fault whatever the parser says
        raise FlatlabError(f"{path} is a truncated or corrupted safetensors file ({err})") \
            from None


def _given_dataset(options: AnalyzeOptions) -> Dataset | None:
    """The data set the caller names (``--dataset``: consent to its factory), or ``None``."""
    if options.dataset is None:
        return None
    return load_dataset(options.dataset, data_dir=options.data_dir, trust_code=True,
                        **options.dataset_kwargs)


def _given_model_spec(options: AnalyzeOptions, data: Dataset) -> dict | None:
    """The caller's model spec (``--model``, ``--model-arg``; the data's input shape and class
    count), which replaces the file's key by key; ``None`` keeps the file's."""
    if options.model is None:
        return None
    spec: dict[str, Any] = {"name": options.model}
    if options.model_kwargs:
        spec["kwargs"] = dict(options.model_kwargs)
    return {**spec, "input_shape": list(data.input_shape), "num_classes": data.num_classes}


def _find(loaded: Sequence[LoadedCheckpoint], ref: str) -> LoadedCheckpoint:
    for ck in loaded:
        if ref == ck.name:
            return ck
    ref_path = Path(ref).expanduser()
    if ref_path.exists():
        target = ref_path.resolve()
        for ck in loaded:
            if target in (ck.path.resolve(), ck.run_dir.resolve() if ck.run_dir else None):
                return ck
    raise FlatlabError(f"--interpolate {ref!r} is not one of the analysed checkpoints; choose "
                       f"from {', '.join(ck.name for ck in loaded)} (or their paths)")


def interpolation_pair(loaded: Sequence[LoadedCheckpoint], refs: Sequence[str]
                       ) -> tuple[LoadedCheckpoint, LoadedCheckpoint]:
    """The two checkpoints ``refs`` names (names or paths), checked to be interpolable."""
    a, b = _find(loaded, refs[0]), _find(loaded, refs[1])
    if a is b:
        raise FlatlabError(f"--interpolate needs two different checkpoints, got {a.name!r} twice")
    sa, sb = a.model.state_dict(), b.model.state_dict()
    if sa.keys() != sb.keys() or any(sa[k].shape != sb[k].shape for k in sa):
        raise FlatlabError(f"cannot interpolate {a.name!r} and {b.name!r}: different "
                           f"architectures")
    if a.dataset.spec != b.dataset.spec:
        raise FlatlabError(f"cannot interpolate {a.name!r} and {b.name!r}: trained on different "
                           f"data sets")
    return a, b


def default_out_dir(loaded: Sequence[LoadedCheckpoint]) -> Path:
    """One run directory -> ``RUN/analysis`` (``RUN/analysis-best`` for its best checkpoint);
    otherwise ``analysis/`` beside the first run directory (``runs/a``, ``runs/b`` ->
    ``runs/analysis``) or beside the first loose file."""
    first = loaded[0]
    if len(loaded) == 1 and first.run_dir is not None:
        return first.run_dir / ("analysis-best" if first.path.name == BEST_NAME
                                else "analysis")
    anchor = first.run_dir if first.run_dir is not None else first.path
    return anchor.parent / "analysis"
