"""A sweep-then-final study from start to report: run the sweep, choose each setting's
hyperparameters on the validation split, run the final runs, write the report.

With a shard, only the shard's runs are run and no report is written; the final runs start
once every shard's sweep runs are finished (run the shard again after that, or let a later
plain invocation run what is missing and aggregate everything).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from flatlab.study.plan import Shard, StudyConfig, final_runs, sweep_runs
from flatlab.study.report import StudyResult, write_study_report
from flatlab.study.runner import planned_rows, read_results, run_all
from flatlab.study.statistics import select_hyperparameters


def run_study(study: StudyConfig, out: Path, runs_dir: Path, *, title: str, command: str = "",
              jobs: int = 1, shard: Shard | None = None,
              say: Callable[[str], None] = print) -> StudyResult | None:
    """Sweep, select hyperparameters, final runs, report; ``None`` for a shard (no report)."""
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    before = len(read_results(out))
    runs = sweep_runs(study)
    rows = run_all(runs, out, runs_dir, jobs=jobs, shard=shard, say=say)
    swept = planned_rows(rows, runs)
    if len(swept) < len(runs):
        say(f"{len(runs) - len(swept)} sweep run(s) of other shards are not finished yet: "
            f"the final runs start when they are (run this command again then)")
        return None
    chosen, _ = select_hyperparameters(swept)
    for setting in study.settings:
        for name in dict.fromkeys(m.sweep_name for m in study.methods):
            if name not in study.sweep:
                continue
            hyper = chosen.get((setting.name, name))
            say(f"chosen for {setting.name}: {name} {hyper}" if hyper else
                f"warning: no finished sweep run of {name} on {setting.name}; its final runs "
                f"use the library default")
    rows = run_all(final_runs(study, chosen), out, runs_dir, jobs=jobs, shard=shard, say=say)
    if shard is not None:
        say(f"shard {shard} done; aggregate with the same command without --shard")
        return None
    return write_study_report(study, rows, out, title=title, command=command,
                              wall_seconds=time.perf_counter() - started,
                              new_runs=len(rows) - before)
