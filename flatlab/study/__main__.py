"""``python -m flatlab.study``: see :mod:`flatlab.study.cli`."""

from flatlab.errors import run_cli
from flatlab.study.cli import main

raise SystemExit(run_cli(main, prog="flatlab.study"))
