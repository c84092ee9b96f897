"""The one runner of fss's commands: every error a user can cause becomes one line and an exit status.

- ``FssError`` (bad input, arguments, checkpoints): ``<prog>: error: <what> (<file>)``, exit 2; a
  ``SettingError`` names the settings by the command's flags;
- ``OSError`` (disk full, permission denied, ...): the system's reason and the file, exit 2;
- ``MemoryError``: exit 2 with what to lower;
- Ctrl-C: a note of what is kept, exit 130;
- anything else is a bug and keeps its traceback.

Notes of the library's slow, one-off steps (logger ``fss.runtime``, e.g. exporting an encoder for the
cache) are printed as ``<prog>: <note>`` while a command runs.
"""

import contextlib
import logging
import os
import sys
from collections.abc import Callable

from fss.errors import FssError, SettingError, summary

USAGE_ERROR = 2
INTERRUPTED = 130


def error_line(prog: str, message: str) -> str:
    return f"{prog}: error: {' '.join(message.split())}"


def os_error_message(exc: OSError) -> str:
    reason = exc.strerror or summary(exc)
    where = exc.filename if exc.filename is not None else None
    return f"{reason} ({os.fsdecode(where)})" if where is not None else reason


def run_command(
    prog: str,
    body: Callable[[], int | None],
    interrupted: str = "interrupted",
    exit_codes: dict[type, int] | None = None,
) -> int:
    """Run ``body()`` (returns the exit status; None is 0) under the error promise above.

    ``exit_codes`` maps further exception types to statuses (their message printed as an error).
    """
    try:
        with runtime_notes(prog):
            return body() or 0
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return INTERRUPTED
    except Exception as exc:
        handled = failure(exc, exit_codes or {})
        if handled is None:
            raise  # a bug: keep the traceback
        status, message = handled
        print(error_line(prog, message), file=sys.stderr)
        return status


@contextlib.contextmanager
def runtime_notes(prog: str):
    logger = logging.getLogger("fss.runtime")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{prog}: %(message)s"))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def failure(exc: Exception, exit_codes: dict[type, int]) -> tuple[int, str] | None:
    """(exit status, message) of an exception a user can cause, or None for a bug."""
    for kind, status in exit_codes.items():
        if isinstance(exc, kind):
            return status, summary(exc, limit=2000)
    if isinstance(exc, SettingError):
        return USAGE_ERROR, str(exc.flagged())
    if isinstance(exc, FssError):
        return USAGE_ERROR, str(exc)
    if isinstance(exc, MemoryError):
        return USAGE_ERROR, "out of memory: lower --size, --batch or the image sizes (--max-pixels)"
    if isinstance(exc, OSError):
        return USAGE_ERROR, os_error_message(exc)
    return None
