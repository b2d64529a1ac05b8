"""``python -m flatlab.train``: the entry point of :mod:`flatlab.training` (see there).

The names below are re-exported for scripts written against the old single-module layout; new
code imports from :mod:`flatlab.training`.
"""

from flatlab.checkpoint import CHECKPOINT_NAME
from flatlab.training import (
    CONFIG_NAME,
    METRICS_COLUMNS,
    METRICS_NAME,
    STATE_NAME,
    TrainConfig,
    TrainResult,
    batches_of,
    epoch_order,
    evaluate,
    lr_factor,
    train,
)
from flatlab.training.cli import build_parser, main, parse_args, run

__all__ = [
    "CHECKPOINT_NAME", "CONFIG_NAME", "METRICS_COLUMNS", "METRICS_NAME", "STATE_NAME",
    "TrainConfig", "TrainResult", "batches_of", "build_parser", "epoch_order", "evaluate",
    "lr_factor", "main", "parse_args", "train",
]

if __name__ == "__main__":
    raise SystemExit(run())
