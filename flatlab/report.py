"""The comparison report; the code lives in :mod:`flatlab.reporting` (page model, figures,
report). This module keeps the names scripts import from ``flatlab.report``."""

from flatlab.reporting.figures import (
    METHOD_COLORS,
    checkpoint_colors,
    plot_density,
    plot_eigenvalues,
    plot_interpolation,
    plot_slices_1d,
    plot_slices_2d,
    plot_training_curves,
    save_figure,
)
from flatlab.reporting.format import format_hyperparameters, relative_change
from flatlab.reporting.page import markdown_table
from flatlab.reporting.report import (
    COMPARISON_CSV,
    FIGURES_DIR,
    display_table,
    load_metrics,
    provenance_table,
    resolve_baseline,
    shared_hyperparameters,
    summary_table,
    write_report,
)

__all__ = ["COMPARISON_CSV", "FIGURES_DIR", "METHOD_COLORS", "checkpoint_colors",
           "display_table", "format_hyperparameters", "load_metrics", "markdown_table",
           "plot_density", "plot_eigenvalues", "plot_interpolation", "plot_slices_1d",
           "plot_slices_2d", "plot_training_curves", "provenance_table", "relative_change",
           "resolve_baseline", "save_figure", "shared_hyperparameters", "summary_table",
           "write_report"]
