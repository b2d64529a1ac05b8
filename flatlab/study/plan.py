"""What a study runs: methods, settings, budgets, hyperparameter sweeps, and one key per run.

A study is a grid of *runs*. Each run is one training configuration (a
:class:`flatlab.train.TrainConfig`) plus, for the final runs, what to measure on the result
(:class:`flatlab.analyze.AnalyzeOptions` fields). Runs are identified by their **key**, a hash
of everything that determines their numbers, so a finished run is never run twice and a changed
grid value or a changed hyperparameter choice is a new run.

Budgets. A step of SAM, ASAM, RWP (clean pass plus one perturbed pass) or NSO k=1 (W+U, W-U)
costs 2 forward/backward passes, SGD 1, NSO k=2 4 (``gradient_evaluations_per_step``). With a
shared batch size, passes per example = passes per step x epochs, and two comparisons follow:

* **same epochs**: every method E epochs;
* **same gradient evaluations**: every method ``P_ref x E`` passes per example, the budget of
  the reference optimizer (SAM) at E epochs; a method with ``P`` passes per step trains
  ``P_ref x E / P`` epochs (SGD 2E, NSO k=2 E/2).

Shards. :class:`Shard` ``I/N`` owns the runs whose key, read as a hexadecimal number, is
``I - 1`` modulo ``N``: the N shards partition any plan, disjointly and completely, whatever
order or subset of it a process sees.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path

import torch

from flatlab.errors import FlatlabError
from flatlab.optim import build_optimizer, gradient_evaluations_per_step
from flatlab.train import TrainConfig

SAME_EPOCHS, SAME_GRADS = "same epochs", "same gradient evaluations"
BUDGETS = (SAME_EPOCHS, SAME_GRADS)
REFERENCE_OPTIMIZER = "sam"  # "same gradient evaluations" = this method's passes at E epochs
# The TrainConfig fields when the scratch study first ran. A field added later (precision,
# independent_noise, ...) is left out of a run's key while it is at its default, the value that
# reproduces the earlier behaviour, so cached runs stay valid as TrainConfig grows.
KEYED_FIELDS = frozenset({
    "base_optimizer", "batch_size", "clean_weight", "data_dir", "data_seed", "dataset",
    "dataset_kwargs", "device", "epochs", "label_smoothing", "lr", "model", "model_kwargs",
    "momentum", "noise", "num_perturbs", "on_nan", "optimizer", "out", "rho",
    "save_every_steps", "schedule", "seed", "sigma", "threads", "weight_decay"})
DEFAULT_NOISE = {"nso": "absolute", "rwp": "filter"}  # the library's defaults
# Version of the optimizers' noise stream for a given seed. Bump it when flatlab.optim draws
# different noise for the same seed (e.g. a salt mixed into the noise seed): from 2 on it
# enters the key of every noise-using run, so their cached results are not reused.
NOISE_STREAM_VERSION = 2  # 2: NSO/RWP noise seeds are salted (noise_generator)
_KEY_IGNORES = frozenset({"out", "device", "threads"})  # where and how fast, not what


@dataclass(frozen=True)
class Method:
    """One optimizer configuration compared in a study."""

    label: str                      # "nso k=2"
    optimizer: str                  # flatlab.optim name
    num_perturbs: int | None = None
    baseline: bool = True           # False: one of the variants under test
    sweep: str | None = None        # which sweep it takes its value from (default: optimizer)
    train_args: dict = field(default_factory=dict)  # further TrainConfig fields, {"noise": ...}

    @property
    def sweep_name(self) -> str:
        return self.sweep or self.optimizer


@dataclass(frozen=True)
class Setting:
    """A data set and model; ``epochs`` is E, the "same epochs" budget."""

    name: str
    dataset: str
    model: str
    epochs: int
    dataset_kwargs: dict = field(default_factory=dict)
    model_kwargs: dict = field(default_factory=dict)
    train_args: dict = field(default_factory=dict)  # TrainConfig fields for this setting only
                                                    # (init_from, a chosen lr, ...)


@dataclass(frozen=True)
class StudyConfig:
    """Everything a study varies and shares (a preset such as ``scratch`` fills it)."""

    settings: tuple[Setting, ...]
    seeds: tuple[int, ...]
    sweep: dict[str, tuple[str, tuple[float, ...]]]  # sweep name -> (argument, values)
    methods: tuple[Method, ...]
    validation_fraction: float = 0.2
    validation_seed: int = 0
    sweep_seed: int = 0
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    samples: int = 1000         # analysis subset of the training split
    trace_matvecs: int = 100
    eigen_tol: float = 1e-4
    landscape: tuple[str, ...] = ("1d",)
    analysis_seed: int = 0
    # Further TrainConfig fields shared by every run (base_optimizer, base_kwargs, keep, ...);
    # a ``step_every`` here is in epochs of an E-epoch run and stretches with the run's epochs.
    train_args: dict = field(default_factory=dict)
    sweep_seeds: tuple[int, ...] = ()   # seeds of the sweep runs (default: (sweep_seed,))
    final_validation: bool = False      # final runs hold out the validation split too

    @property
    def sweep_seed_list(self) -> tuple[int, ...]:
        return self.sweep_seeds or (self.sweep_seed,)


def passes_per_step(optimizer: str, num_perturbs: int | None = None,
                    clean_pass: bool = False) -> int:
    """Forward/backward passes one step of this optimizer makes (by the library's count)."""
    param = torch.zeros(1, requires_grad=True)
    opt = build_optimizer(optimizer, [param], lr=0.1, num_perturbs=num_perturbs,
                          clean_pass=clean_pass or None)
    return gradient_evaluations_per_step(opt)


def matched_epochs(epochs: int, passes: int, reference_passes: int) -> int:
    """Epochs that give ``passes`` per step the budget of ``reference_passes`` x ``epochs``."""
    total = epochs * reference_passes
    if total % passes:
        raise FlatlabError(f"cannot match the gradient budget: {epochs} epochs x "
                           f"{reference_passes} passes is not a multiple of {passes} passes per "
                           f"step; choose E divisible by {passes // math.gcd(passes, total)}")
    return total // passes


@dataclass(frozen=True)
class Variant:
    """A method at one epoch count, and the budget comparisons it belongs to."""

    name: str                   # "nso k=2 (E/2)"
    method: Method
    epochs: int
    passes: int                 # per step
    budgets: tuple[str, ...]

    @property
    def passes_per_example(self) -> int:
        return self.epochs * self.passes


def plan_variants(methods: Sequence[Method], epochs: int) -> list[Variant]:
    """Each method at E epochs ("same epochs") and at the epochs that match the reference
    optimizer's passes at E epochs ("same gradient evaluations"); equal runs are merged."""
    reference = passes_per_step(REFERENCE_OPTIMIZER)
    variants: dict[tuple[str, int], Variant] = {}
    for method in methods:
        passes = passes_per_step(method.optimizer, method.num_perturbs,
                                 bool(method.train_args.get("clean_pass")))
        for budget in BUDGETS:
            e = epochs if budget == SAME_EPOCHS else matched_epochs(epochs, passes, reference)
            key = (method.label, e)
            if key in variants:
                variants[key] = replace(variants[key], budgets=variants[key].budgets + (budget,))
                continue
            name = method.label if e == epochs else f"{method.label} ({epochs_label(e, epochs)})"
            variants[key] = Variant(name, method, e, passes, (budget,))
    return list(variants.values())


def epochs_label(e: int, epochs: int) -> str:
    """``e`` as a multiple of E: "2E", "E/2", else "N epochs"."""
    ratio = Fraction(e, epochs)
    if ratio.denominator == 1:
        return f"{ratio.numerator}E"
    if ratio.numerator == 1:
        return f"E/{ratio.denominator}"
    return f"{e} epochs"


@dataclass(frozen=True)
class RunSpec:
    """One training run (and, for final runs, its analysis)."""

    phase: str                  # "sweep" | "final"
    setting: Setting
    variant: Variant
    seed: int
    hyper: dict                 # {"rho": 0.05} / {"sigma": 0.02} / {}
    config: dict                # TrainConfig fields (out filled in by the runner)
    analysis: dict | None       # AnalyzeOptions fields; None for sweep runs

    @property
    def key(self) -> str:
        """Hash of everything that determines the run's numbers (16 hex digits)."""
        payload = {"phase": self.phase, "variant": self.variant.name,
                   "budgets": self.variant.budgets,
                   "config": key_config(self.config),
                   "analysis": self.analysis}
        return digest(payload)[:16]

    @property
    def run_name(self) -> str:
        """``setting/phase/variant-hyper-seedS-KEY8``: the run's directory under the runs dir."""
        hyper = "".join(f"-{k}{v:g}" for k, v in self.hyper.items())
        slug = self.variant.name.replace(" ", "").replace("=", "").replace("/", "over")
        slug = slug.replace("(", "-").replace(")", "")
        return f"{self.setting.name}/{self.phase}/{slug}{hyper}-seed{self.seed}-{self.key[:8]}"


def digest(payload: object) -> str:
    """SHA-256 (hex) of ``payload`` as sorted JSON: the hash behind run keys and names."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def key_config(config: dict) -> dict:
    """The fields of a run's config that enter its key (see :data:`KEYED_FIELDS`)."""
    defaults = TrainConfig().to_dict()
    keyed = {k: v for k, v in config.items() if k not in _KEY_IGNORES
             and (k in KEYED_FIELDS or k not in defaults or v != defaults[k])}
    if NOISE_STREAM_VERSION > 1 and config.get("optimizer") in DEFAULT_NOISE:
        keyed["noise_stream"] = NOISE_STREAM_VERSION
    return keyed


def train_config(study: StudyConfig, setting: Setting, variant: Variant, seed: int,
                 hyper: dict, *, validation: bool) -> dict:
    """The ``TrainConfig`` fields of one run (validated by building it)."""
    dataset_kwargs = dict(setting.dataset_kwargs)
    if validation:
        dataset_kwargs.update(validation_fraction=study.validation_fraction,
                              validation_seed=study.validation_seed)
    fields = dict(
        dataset=setting.dataset, dataset_kwargs=dataset_kwargs, model=setting.model,
        model_kwargs=dict(setting.model_kwargs), optimizer=variant.method.optimizer,
        num_perturbs=variant.method.num_perturbs, epochs=variant.epochs,
        batch_size=study.batch_size, lr=study.lr, momentum=study.momentum,
        weight_decay=study.weight_decay, schedule=study.schedule, seed=seed, device="cpu")
    # later wins: the study's shared fields, the setting's, the method's, the swept value
    fields.update(study.train_args)
    fields.update(setting.train_args)
    fields.update(variant.method.train_args)
    fields.update({k: float(v) for k, v in hyper.items()})
    if fields.get("step_every"):  # the step schedule stretches with the run, as cosine does
        fields["step_every"] = max(1, round(fields["step_every"] * variant.epochs
                                            / setting.epochs))
    return TrainConfig(**fields).validate().to_dict()


def analysis_fields(study: StudyConfig) -> dict:
    """What each final run measures (``AnalyzeOptions`` fields): trace, λ1, 1-D slices."""
    return {"trace": True, "eigenvalues": 1, "density": False, "landscape": list(study.landscape),
            "samples": study.samples, "seed": study.analysis_seed, "mode": "eval",
            "trace_matvecs": study.trace_matvecs, "trace_method": "hutch++",
            "eigen_tol": study.eigen_tol}


def sweep_runs(study: StudyConfig) -> list[RunSpec]:
    """Runs on the validation split, one per swept method x value x sweep seed, at E epochs
    (methods sharing a sweep, such as NSO k=1 and k=2, are swept once)."""
    runs = []
    for setting in study.settings:
        done: set[str] = set()
        for variant in plan_variants(study.methods, setting.epochs):
            name = variant.method.sweep_name
            if name not in study.sweep or name in done or variant.epochs != setting.epochs:
                continue
            done.add(name)
            arg, values = study.sweep[name]
            for value in values:
                hyper = {arg: value}
                for seed in study.sweep_seed_list:
                    runs.append(RunSpec("sweep", setting, variant, seed, hyper,
                                        train_config(study, setting, variant, seed, hyper,
                                                     validation=True), None))
    return runs


def final_runs(study: StudyConfig, chosen: dict[tuple[str, str], dict]) -> list[RunSpec]:
    """Every variant x seed on the full training split, with the chosen hyperparameters
    (``chosen[(setting, sweep name)]``; a method without a choice takes the library default)."""
    runs = []
    for setting in study.settings:
        for variant in plan_variants(study.methods, setting.epochs):
            hyper = chosen.get((setting.name, variant.method.sweep_name), {})
            for seed in study.seeds:
                runs.append(RunSpec("final", setting, variant, seed, hyper,
                                    train_config(study, setting, variant, seed, hyper,
                                                 validation=study.final_validation),
                                    analysis_fields(study)))
    return runs


@dataclass(frozen=True)
class Shard:
    """Part ``index`` (1-based) of ``count``: the runs whose key is ``index - 1`` mod ``count``."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not 1 <= self.index <= self.count:
            raise FlatlabError(f"--shard {self.index}/{self.count}: I must be in 1..N "
                               f"(the I-th of N parts)")

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"I/N"`` -> ``Shard(I, N)``."""
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not match:
            raise FlatlabError(f"--shard {text!r}: expected I/N, for example 1/4")
        return cls(int(match.group(1)), int(match.group(2)))

    def owns(self, key: str) -> bool:
        return int(key, 16) % self.count == self.index - 1

    def select(self, runs: Sequence[RunSpec]) -> list[RunSpec]:
        return [run for run in runs if self.owns(run.key)]

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def add_study_flags(parser: argparse.ArgumentParser, *, default_out: Path, quick_out: Path,
                    default_runs: Path, quick_help: str, seeds_help: str) -> None:
    """The flags every study preset takes: --out, --runs-dir, --quick, --seeds, --settings,
    --jobs (each preset adds its own, e.g. --shard with its wording)."""
    parser.add_argument("--out", type=Path, default=None,
                        help=f"output directory (default {default_out}; with --quick "
                             f"{quick_out})")
    parser.add_argument("--runs-dir", type=Path, default=None,
                        help=f"where checkpoints go (default {default_runs}; with --quick "
                             f"OUT/runs)")
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--seeds", type=int, default=None, help=seeds_help)
    parser.add_argument("--settings", nargs="+", default=None, metavar="NAME",
                        help="only these settings (default: all)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs in parallel, one CPU thread each (default 1)")
