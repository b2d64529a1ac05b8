"""Curvature of the loss: matrix-free Hessian products and the estimators built on them.

>>> from flatlab.hessian import HessianOperator, trace, top_eigenvalues, spectral_density
>>> op = HessianOperator(model, torch.nn.CrossEntropyLoss(), batches)  # doctest: +SKIP
>>> trace(op).estimate, top_eigenvalues(op, k=5).eigenvalues         # doctest: +SKIP

Every estimator takes any object with ``size``, ``dtype``, ``device`` and ``matvec`` (a
symmetric operator); :class:`DenseOperator` wraps an explicit matrix for tests.
"""

from flatlab.evaluation import select_parameters
from flatlab.hessian.density import DensityResult, spectral_density
from flatlab.hessian.lanczos import EigenResult, top_eigenvalues
from flatlab.hessian.operator import (
    BACKENDS,
    MODES,
    DenseOperator,
    HessianOperator,
    LinearOperator,
    as_scipy,
)
from flatlab.hessian.paper import (
    NormTraceResult,
    PaperEigenResult,
    batch_mean,
    norm_trace,
    paper_parameters,
    paper_top_eigenvalue,
    paper_trace,
)
from flatlab.hessian.trace import TRACE_METHODS, TraceResult, trace

__all__ = [
    "BACKENDS",
    "MODES",
    "TRACE_METHODS",
    "DenseOperator",
    "DensityResult",
    "EigenResult",
    "HessianOperator",
    "LinearOperator",
    "NormTraceResult",
    "PaperEigenResult",
    "TraceResult",
    "as_scipy",
    "batch_mean",
    "norm_trace",
    "paper_parameters",
    "paper_top_eigenvalue",
    "paper_trace",
    "select_parameters",
    "spectral_density",
    "top_eigenvalues",
    "trace",
]
