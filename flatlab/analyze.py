"""``python -m flatlab.analyze``: checkpoints -> curvature and landscape numbers -> files.

The code lives in :mod:`flatlab.analysis`; this module is the command's entry point and keeps
the names scripts import from ``flatlab.analyze``.
"""

from flatlab.analysis.cli import build_parser, console_main, main, options_from_args
from flatlab.analysis.loading import (
    LoadedCheckpoint,
    SubsetBatches,
    default_out_dir,
    load_checkpoints,
    sample_indices,
    unique_names,
)
from flatlab.analysis.options import (
    DEFAULT_GRID,
    LANDSCAPES,
    MIN_TRACE_MATVECS,
    TRACE_METHODS,
    AnalyzeOptions,
)
from flatlab.analysis.outputs import (
    ANALYSIS_JSON,
    PLOTS_DIR,
    SUMMARY_COLUMNS,
    SUMMARY_CSV,
    dumps_json,
    plot_path,
    summary_csv,
    summary_rows,
    write_figures,
    write_outputs,
)
from flatlab.analysis.results import Analysis, CheckpointResult, read_analysis
from flatlab.analysis.runner import STAGES, analyze

__all__ = ["ANALYSIS_JSON", "DEFAULT_GRID", "LANDSCAPES", "MIN_TRACE_MATVECS", "PLOTS_DIR",
           "STAGES", "SUMMARY_COLUMNS", "SUMMARY_CSV", "TRACE_METHODS", "Analysis",
           "AnalyzeOptions", "CheckpointResult", "LoadedCheckpoint", "SubsetBatches", "analyze",
           "build_parser", "default_out_dir", "dumps_json", "load_checkpoints", "main",
           "options_from_args", "plot_path", "read_analysis", "sample_indices", "summary_csv",
           "summary_rows", "unique_names", "write_figures", "write_outputs"]

if __name__ == "__main__":
    raise SystemExit(console_main())
