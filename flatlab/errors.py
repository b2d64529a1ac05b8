"""User-facing errors and the command-line wrapper that turns them into one line and an exit code.

Library code raises :class:`FlatlabError` (or a subclass) for anything the *user* got wrong:
bad flags, missing or corrupt files, unknown names. The CLIs catch it, print one line on stderr
and exit with its ``exit_code`` (2 for bad input, 3 for a diverged run). Bugs stay tracebacks.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence


class FlatlabError(Exception):
    """Bad input from the user: reported as one line, exit status 2."""

    exit_code = 2


class DivergenceError(FlatlabError):
    """Training produced a NaN or infinite loss: exit status 3."""

    exit_code = 3


class ArgumentParser(argparse.ArgumentParser):
    """An ``argparse`` parser whose errors are one line on stderr and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise FlatlabError(f"{self.prog}: {message}")


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
