"""flatlab: find and measure flat minima.

Optimizers live in :mod:`flatlab.optim` (NSO, SAM, ASAM, RWP); curvature estimators in
:mod:`flatlab.hessian`; command-line tools are ``python -m flatlab.train`` and
``python -m flatlab.analyze``.
"""

__version__ = "0.1.0"
