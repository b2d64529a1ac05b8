"""User-facing errors and the command-line wrapper that turns them into one line and an exit code.

Library code raises :class:`FlatlabError` (a :class:`ValueError`, so ``except ValueError`` in a
user's script catches it) for anything the *user* got wrong: bad arguments, missing or corrupt
files, unknown names. Only the command-line tools turn it into one line on stderr and the exit
status ``exit_code`` (2 for bad input, 3 for a diverged run, 143/130 for a run stopped by
SIGTERM/SIGINT after saving its state), through :func:`run_cli`. Bugs stay tracebacks.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from flatlab import __version__


class FlatlabError(ValueError):
    """Bad input from the user: reported by the CLIs as one line, exit status 2."""

    exit_code = 2


class DivergenceError(FlatlabError):
    """Training produced a NaN or infinite loss: exit status 3."""

    exit_code = 3


class Interrupted(FlatlabError):
    """Training stopped by a signal after saving its state: exit status 143 for SIGTERM and
    SIGUSR1 (the preemption notices of SLURM, Kubernetes, spot instances), 130 for SIGINT."""

    def __init__(self, message: str, exit_code: int = 143) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class ArgumentParser(argparse.ArgumentParser):
    """An ``argparse`` parser whose errors are one line on stderr and exit status 2.

    Abbreviated long options are refused by default (``allow_abbrev=False``: ``--eigen 5``
    is an error, not ``--eigenvalues 5``). A ``type=`` function may raise :class:`FlatlabError`
    to give its own message.
    """

    def __init__(self, *args: Any, allow_abbrev: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, allow_abbrev=allow_abbrev, **kwargs)

    def add_version(self) -> None:
        """Add ``--version``: prints ``flatlab <version>`` and exits 0."""
        self.add_argument("--version", action="version", version=f"flatlab {__version__}")

    def error(self, message: str) -> None:  # type: ignore[override]
        raise FlatlabError(f"{self.prog}: {message}")

    def _get_value(self, action: argparse.Action, arg_string: str) -> Any:
        # argparse turns any ValueError of a type function into "invalid <type> value";
        # a FlatlabError (a ValueError) keeps its own message
        try:
            return super()._get_value(action, arg_string)
        except argparse.ArgumentError as err:
            if isinstance(err.__context__, FlatlabError):
                raise err.__context__ from None
            raise


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None,
            prog: str = "flatlab") -> int:
    """Run ``main(argv)``; turn a :class:`FlatlabError` into one stderr line and its exit code."""
    try:
        code = main(argv)
    except FlatlabError as err:
        # one line, whatever the message echoes back (user input can hold line breaks)
        msg = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(err))
        if not msg.startswith(prog):
            msg = f"{prog}: error: {msg}"
        print(msg, file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)
