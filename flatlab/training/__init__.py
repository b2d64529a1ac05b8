"""Training: ``train(TrainConfig(...))`` in Python, ``python -m flatlab.train`` on the command line.

=================  ==========================================================================
``config``         :class:`TrainConfig`: every hyperparameter declared once (``fields``)
``trainer``        :func:`train`, the loop (``build``: the parts; ``step``: one step;
                   ``tally``: the epoch's sums on the device; ``state``: resume;
                   ``preempt``: SIGTERM/SIGINT/SIGUSR1; ``rundir``: the run directory's files)
``schedule``       data order per epoch and the learning-rate factor per step
``cli``            the parser generated from the declarations, :func:`main`
=================  ==========================================================================
"""

from flatlab.checkpoint import CHECKPOINT_NAME
from flatlab.training.config import TrainConfig
from flatlab.training.rundir import CONFIG_NAME, METRICS_COLUMNS, METRICS_NAME, STATE_NAME
from flatlab.training.schedule import batches_of, epoch_order, lr_factor
from flatlab.training.step import evaluate
from flatlab.training.trainer import TrainResult, train

__all__ = [
    "CHECKPOINT_NAME", "CONFIG_NAME", "METRICS_COLUMNS", "METRICS_NAME", "STATE_NAME",
    "TrainConfig", "TrainResult", "batches_of", "epoch_order", "evaluate", "lr_factor", "train",
]
