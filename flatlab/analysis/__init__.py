"""Curvature and landscape analysis of checkpoints.

``analyze(checkpoints, options) -> Analysis`` (typed results, the versioned ``analysis.json``
schema), ``write_outputs(analysis, out_dir)`` (``analysis.json``, ``summary.csv``, figures,
optionally the comparison report), ``read_analysis(path)`` (any schema version). Modules:
:mod:`~flatlab.analysis.options` (what to compute), :mod:`~flatlab.analysis.loading`
(checkpoints -> models, data, names), :mod:`~flatlab.analysis.runner` (the stages),
:mod:`~flatlab.analysis.results` (the schema), :mod:`~flatlab.analysis.outputs` (files),
:mod:`~flatlab.analysis.cli` (``python -m flatlab.analyze``).
"""

from flatlab.analysis.loading import (
    LoadedCheckpoint,
    SubsetBatches,
    default_out_dir,
    load_checkpoints,
    sample_indices,
    unique_names,
)
from flatlab.analysis.options import AnalyzeOptions
from flatlab.analysis.outputs import summary_csv, write_outputs
from flatlab.analysis.results import (
    SCHEMA_VERSION,
    Analysis,
    CheckpointResult,
    Density,
    Interpolation,
    LayerTrace,
    Slice1D,
    Slice2D,
    read_analysis,
)
from flatlab.analysis.runner import STAGES, analyze

__all__ = ["SCHEMA_VERSION", "STAGES", "Analysis", "AnalyzeOptions", "CheckpointResult",
           "Density", "Interpolation", "LayerTrace", "LoadedCheckpoint", "Slice1D", "Slice2D",
           "SubsetBatches", "analyze", "default_out_dir", "load_checkpoints", "read_analysis",
           "sample_indices", "summary_csv", "unique_names", "write_outputs"]
