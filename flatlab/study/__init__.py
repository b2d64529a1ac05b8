"""Studies: plans of training runs keyed by their configuration, a resumable and shardable
runner, paired statistics over seeds, and reports.

- :mod:`~flatlab.study.plan`: methods, settings, budgets, sweeps, run keys, shards;
- :mod:`~flatlab.study.runner`: train-or-resume one run, the process pool, ``results.csv``;
- :mod:`~flatlab.study.statistics`: hyperparameter choice, summaries, paired t tests;
- :mod:`~flatlab.study.report`: the study report (``flatlab.reporting.page``);
- :mod:`~flatlab.study.pipeline`: sweep -> choice -> final runs -> report;
- presets: :mod:`~flatlab.study.scratch` and :mod:`~flatlab.study.demo`, run by
  ``python -m flatlab.study PRESET`` (:mod:`~flatlab.study.cli`).
"""
