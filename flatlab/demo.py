"""``python -m flatlab.demo``: the demo preset of :mod:`flatlab.study` (see
:mod:`flatlab.study.demo`; ``python -m flatlab.study demo`` is the same)."""

from flatlab.errors import run_cli
from flatlab.study.demo import (  # noqa: F401  (the public names of flatlab.demo)
    analysis_options,
    analyze_command,
    build_parser,
    demo_configs,
    main,
    run_demo,
)

if __name__ == "__main__":
    raise SystemExit(run_cli(main, prog="flatlab.demo"))
