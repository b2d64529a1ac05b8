"""Reports: one page model rendered to HTML and Markdown (:mod:`flatlab.reporting.page`),
figures (:mod:`flatlab.reporting.figures`) and the checkpoint comparison report
(:mod:`flatlab.reporting.report`)."""
