"""What the two command lines share: how they end on an error, how they print a duration.

An error ends a command with one line for what the user can fix and a traceback for a bug. User
errors: a ValueError or RuntimeError raised by saetron's own code (its checks say what was expected,
what arrived and what to do), and an OSError (a path, a permission, a full disk). They print
`PROG: error: MESSAGE` on one line of stderr and exit with USAGE_ERROR (2, as argparse does for a bad
flag). Anything else is a bug: its traceback and exit status 1. Used by saetron-collect and
saetron-train (in one process and on every rank under torchrun, where the line names the rank).
"""

from __future__ import annotations

import sys
import traceback

USAGE_ERROR = 2
BUG = 1
INTERRUPTED = 130  # 128 + SIGINT, the shell's convention for Ctrl-C


def raised_by_saetron(error: BaseException) -> bool:
    """Whether the innermost frame of error's traceback is saetron code (not a library it called)."""
    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    spec = tb.tb_frame.f_globals.get("__spec__")  # `python -m saetron.x` runs x as __main__: its spec knows
    name = spec.name if spec is not None else tb.tb_frame.f_globals.get("__name__", "")
    return name.startswith("saetron.")


def is_user_error(error: BaseException) -> bool:
    if isinstance(error, OSError):
        return True
    return isinstance(error, ValueError | RuntimeError) and raised_by_saetron(error)


def _line(text: str) -> None:
    """One write of one line: the ranks under torchrun share stderr, and a single write of a short line
    is not interleaved with another process's (print writes the newline apart)."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def exit_status(error: BaseException, prog: str, rank: int | None = None) -> int:
    """Report `error` on stderr (one line or a traceback) and return the process's exit status."""
    if isinstance(error, SystemExit):  # argparse: --help (0) or a bad flag (2, already reported)
        return error.code if isinstance(error.code, int) else BUG
    where = f" (rank {rank})" if rank is not None else ""
    if isinstance(error, KeyboardInterrupt):
        _line(f"{prog}: interrupted{where}")
        return INTERRUPTED
    if is_user_error(error):
        _line(f"{prog}: error{where}: {' '.join(str(error).split()) or type(error).__name__}")
        return USAGE_ERROR
    traceback.print_exception(error)
    return BUG


def format_seconds(seconds: float) -> str:
    """A duration for a progress line: `3m 07s`, `2h 05m`; `unknown` when infinite."""
    if seconds == float("inf"):
        return "unknown"
    minutes, s = divmod(int(seconds), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours}h {m:02d}m" if hours else f"{m}m {s:02d}s"
