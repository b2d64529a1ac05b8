"""``TrainConfig``: every training hyperparameter, each declared once (see :mod:`.fields`).

A field's declaration is its type (the annotation), default, constraint, help text and flag;
``config.toml``, the command line, type checking and validation are generated from it. To add a
hyperparameter: declare it here and use it where it acts (usually :mod:`flatlab.optim` or
:mod:`.trainer`).
"""

from __future__ import annotations

from dataclasses import dataclass

from flatlab.augment import AUGMENTATIONS
from flatlab.data import DATASETS
from flatlab.models import MODELS
from flatlab.optim import BASE_OPTIMIZERS, NOISE_TYPES, OPTIMIZERS
from flatlab.runtime import AUTOCAST_DTYPES, DEVICES
from flatlab.training.fields import DeclaredConfig, option

SCHEDULES = ("none", "step", "cosine")
ON_NAN = ("stop", "skip")
PRECISIONS = tuple(AUTOCAST_DTYPES)
KEEP = ("last", "best")
SEED_MAX = 2**32 - 1


@dataclass
class TrainConfig(DeclaredConfig):
    """Everything that defines a training run; the TOML file and the flags set these fields.

    Method arguments left ``None`` (``sigma``, ``num_perturbs``, ``rho``, ``noise``,
    ``clean_weight``) take the optimizer's own default. ``out=None`` picks
    ``runs/<dataset>-<model>-<optimizer>`` (with ``-2``, ``-3``, ... if that is taken).
    """

    # ---- data and model
    dataset: str = option("mnist1d", f"one of {', '.join(DATASETS)} or package.module:factory",
                          choices=DATASETS, pattern=r".*:.*",
                          pattern_text=" or 'package.module:factory'")
    dataset_kwargs: dict = option(
        {}, "data set argument (repeatable), e.g. train_size=256", flag="--dataset-arg",
        metavar="KEY=VALUE")
    data_seed: int = option(0, "seed of the data split/generation", low=0, high=SEED_MAX)
    data_dir: str | None = option(None, "directory with CIFAR python files, or the image folder "
                                  "of --dataset folder (DIR/train|val|test/CLASS/*.png|jpg)",
                                  resumable=True)
    augment: str = option("none", "training batches only: none, or crop-flip (pad-4 random crop "
                          "and horizontal flip, seeded, resumed exactly)", choices=AUGMENTATIONS,
                          write_default=False, record="changed")
    model: str = option(
        "cnn1d", f"one of {', '.join(MODELS)} or package.module:factory", choices=MODELS,
        pattern=r".*:.*", pattern_text=" or 'package.module:factory'", noun="model")
    model_kwargs: dict = option(
        {}, "model argument (repeatable), e.g. hidden=[64,64] or depth=20", flag="--model-arg",
        metavar="KEY=VALUE")
    init_from: str | None = option(
        None, "start from these weights: a flatlab checkpoint, a .safetensors state dict, or a "
        ".pt/.pth state dict (with --trust-pickle); tensors matched by name and shape, the rest "
        "keep their fresh initialisation and are listed", metavar="PATH", write_default=False)
    init_partial: bool = option(
        False, "with --init-from: model tensors missing from the file keep their fresh "
        "initialisation (default: an error listing them)", write_default=False,
        only_with=("init_from", None))
    init_prefix: str | None = option(
        None, "with --init-from: prefix of the file's tensor names to strip, e.g. 'module.' "
        "(default: the one that matches most names)", metavar="PREFIX", write_default=False,
        only_with=("init_from", None))
    # ---- optimizer
    optimizer: str = option("sgd", f"one of {', '.join(OPTIMIZERS)}", choices=OPTIMIZERS)
    base_optimizer: str = option(
        "sgd", f"base optimizer under the method: {', '.join(BASE_OPTIMIZERS)}",
        record="always", record_as="base")
    base_kwargs: dict = option(
        {}, "base optimizer option (repeatable; TOML value), e.g. amsgrad=true or "
        "betas=[0.9, 0.99]", flag="--base-arg", metavar="KEY=VALUE", record="changed")
    sigma: float | None = option(None, "NSO/RWP noise scale", low=0.0, record="changed")
    num_perturbs: int | None = option(None, "NSO/RWP perturbations per step (k)", low=1,
                                      record="changed")
    rho: float | None = option(None, "SAM/ASAM radius", low=0.0, low_open=True,
                               record="changed")
    noise: str | None = option(None, f"NSO/RWP noise: {' or '.join(NOISE_TYPES)}",
                               choices=NOISE_TYPES, record="changed")
    clean_weight: float | None = option(None, "NSO/RWP weight of the clean gradient", low=0.0,
                                        high=1.0, record="changed")
    clean_pass: bool = option(
        False, "NSO: a pass at W every step even with clean weight 0 (its gradient unused): "
        "BatchNorm running statistics come from W, as the paper's code, and the logged train "
        "loss is the loss at W; one more pass per step",
        record="changed", only_with=("optimizer", ("nso",)))
    independent_noise: bool = option(
        False, "NSO/RWP under torchrun: a different noise draw on every process (default: the "
        "same draw on all)", record="changed", only_with=("optimizer", ("nso", "rwp")))
    # ---- schedule
    epochs: int = option(60, "number of epochs", low=1, resumable=True)
    batch_size: int = option(128, "global batch size", low=1, record="always")
    lr: float = option(0.1, "peak learning rate", low=0.0, record="always")
    momentum: float = option(0.9, "SGD momentum", low=0.0, high=1.0, high_open=True,
                             record="always")
    weight_decay: float = option(5e-4, "weight decay", low=0.0, record="always")
    label_smoothing: float = option(0.0, "label smoothing of the cross-entropy", low=0.0,
                                    high=1.0, high_open=True, record="always")
    schedule: str = option("cosine", "learning-rate schedule, per step: none, step (x0.1 at "
                           "50% and 75% of the steps) or cosine", choices=SCHEDULES,
                           record="always")
    step_every: int = option(0, "--schedule step: multiply the learning rate by --gamma every E "
                             "epochs (0: at 50% and 75% of the steps)", low=0, metavar="E",
                             write_default=False, record="changed",
                             only_with=("schedule", ("step",)))
    gamma: float = option(0.1, "--schedule step: learning-rate factor at each drop", low=0.0,
                          high=1.0, low_open=True, write_default=False, record="changed",
                          only_with=("schedule", ("step",)))
    seed: int = option(0, "seed of init, data order and noise", low=0, high=SEED_MAX)
    # ---- how it runs
    device: str = option("auto", "auto, cpu or cuda", choices=DEVICES, pattern=r"cuda:\d+",
                         noun="device", resumable=True)
    precision: str = option("fp32", "fp32, bf16 or fp16 (autocast for the forward passes; "
                            "weights stay float32; fp16 adds a gradient scaler)",
                            choices=PRECISIONS, resumable=True, record="changed")
    threads: int = option(0, "CPU threads (0: one for models under 1M parameters, else "
                          "torch's default)", low=0, high=1024, resumable=True)
    save_every_steps: int = option(0, "also save the training state every N steps (0: each "
                                   "epoch only)", low=0, metavar="N", resumable=True)
    on_nan: str = option("stop", "on a non-finite loss: stop (exit 3) or skip the step",
                         choices=ON_NAN, resumable=True)
    keep: str = option("last", "last: model.safetensors holds the last epoch; best: also "
                       "best.safetensors, the epoch of highest validation accuracy (ties: lower "
                       "validation loss; needs a validation split)", choices=KEEP,
                       write_default=False)
    out: str | None = option(None, "run directory (default runs/DATASET-MODEL-OPTIMIZER, "
                             "numbered if taken)", metavar="RUN_DIR", resumable=True,
                             in_file=False)
