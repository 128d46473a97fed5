"""Errors shared across the package, below everything that raises them, and the one-line form
every stage and command prints when it fails.

    raise UserError("job 'x' not found")      # the CLI prints it as one line, exit 2
    log.error("train: error: %s", one_line(exc))
"""

from __future__ import annotations


class UserError(Exception):
    """An error the user can fix; printed as one line, exit status 2."""


_WORKER_DIED = ("DataLoader worker", "exited unexpectedly", "is killed by signal")


def is_expected(exc: BaseException) -> bool:
    """An error we raise on purpose (ours, with a message that says what to do), or a DataLoader
    worker that died: one line is enough. Anything else is a bug and deserves its traceback."""
    if type(exc).__module__.split(".", 1)[0] == "app":
        return True
    text = str(exc)
    return text.startswith(_WORKER_DIED[0]) and any(t in text for t in _WORKER_DIED[1:])


def one_line(exc: BaseException) -> str:
    """The message of `exc` as one line. An error re-raised from a DataLoader worker ("Caught X in
    DataLoader worker process 0. Original Traceback ...") becomes the worker's own last line."""
    text = str(exc).strip()
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1].strip()
        kind, sep, message = last.partition(": ")
        text = f"{message} (in a DataLoader worker)" if sep and "." in kind else last
    first = text.splitlines()[0] if text else ""
    if type(exc).__module__.split(".", 1)[0] != "app" and not first.startswith(_WORKER_DIED[0]):
        first = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return first
