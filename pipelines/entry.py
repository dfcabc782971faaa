"""One convention for every entry point: one logging set-up and an exit status a scheduler can trust.

====  ===========================================================================================
0     the output is complete
1     failed: an error this process could not classify (its traceback is printed)
2     bad input: the command as given cannot succeed; the message names the key, file or URI
3     incomplete: a transient fault (object store unreachable, workers lost) left work undone;
      re-running the same command resumes and finishes it
====  ===========================================================================================

Every entry point prints one line for statuses 2 and 3 (no traceback: the line is the diagnosis),
so ``ray job submit``, Kubernetes and shell scripts can branch on the status alone.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from system import storage

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INCOMPLETE = 0, 1, 2, 3


class BadInput(Exception):
    """The command cannot succeed as given; the message names the input at fault."""


class Incomplete(Exception):
    """The run stopped with work left; the message says what is missing."""


def run_main(prog: str, body: Callable[[], object], bad_input: tuple[type[BaseException], ...] = ()) -> None:
    """Run ``body`` and exit with the convention's status; ``bad_input`` are further exception types
    that mean the input is at fault (a storage error counts only when it is not transient)."""
    try:
        body()
    except Incomplete as exc:
        _exit(prog, EXIT_INCOMPLETE, f"incomplete: {exc}; re-running the same command finishes it")
    except (BadInput, storage.StorageError, FileNotFoundError, ValueError, *bad_input) as exc:
        if storage.is_transient(exc):
            _exit(prog, EXIT_INCOMPLETE, f"incomplete: {exc}; re-running the same command finishes it")
        _exit(prog, EXIT_BAD_INPUT, f"error: {exc}")
    except Exception as exc:
        if not storage.is_transient(exc):
            raise
        _exit(
            prog, EXIT_INCOMPLETE, f"incomplete: {type(exc).__name__}: {exc}; re-running the same command finishes it"
        )


def _exit(prog: str, status: int, line: str) -> None:
    print(f"{prog}: {' '.join(line.split())}", file=sys.stderr, flush=True)
    sys.exit(status)
