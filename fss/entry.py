"""The console scripts (``[project.scripts]``): Ctrl-C is one line and exit 130 from the start.

Python's own Ctrl-C, a ``KeyboardInterrupt`` wherever the main thread is, goes wrong inside an import:
torch's import sometimes swallows it and goes on, sometimes turns it into a ``SystemError``, and
otherwise it ends in a traceback and death by the signal (a command imports torch, numpy, ONNX
Runtime or Gradio for seconds, at the start and lazily later). So each entry point installs, before
importing its command, a handler that ends the process at once, as a kill would, while an import runs,
and raises ``KeyboardInterrupt`` as Python's does anywhere else: there the command's runner
(``fss.command``) turns it into its note of what is kept, or this module into one line. Once the
command is done, while Python exits, it ends the process at once again, up to the teardown of
Python and its libraries, where Ctrl-C is ignored (:func:`stop_listening`). Every output of fss survives
a kill (atomic writes, stale temporaries removed by the next run). Only the standard library is
imported here.
"""

import atexit
import contextlib
import os
import signal
import sys
from importlib import import_module

INTERRUPTED = 130  # as fss.command.INTERRUPTED, which is not imported before the handling is in place


def launch(prog: str, module: str) -> int:
    """``module.main()`` with Ctrl-C as exit 130 and one line, during its imports too."""
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return import_module(module).main()  # SIGINT ignored (a background job) or someone else's: kept

    def end_at_once():
        os.write(2, f"{prog}: interrupted\n".encode())  # not print: the code interrupted may be in one
        os._exit(INTERRUPTED)

    def on_ctrl_c(signum, frame):
        if not importing(frame):
            raise KeyboardInterrupt
        end_at_once()

    signal.signal(signal.SIGINT, on_ctrl_c)
    atexit.register(stop_listening)  # registered before the command imports anything: runs last
    try:
        return import_module(module).main()
    except KeyboardInterrupt:  # outside the command's runner (parsing the arguments, ...)
        print(f"{prog}: interrupted", file=sys.stderr)
        return INTERRUPTED
    finally:
        # the command is done; Python still has to exit (flush a piped stdout, which may wait for its
        # reader, run atexit hooks): a Ctrl-C meanwhile ends it at once
        signal.signal(signal.SIGINT, lambda signum, frame: end_at_once())


def stop_listening() -> None:
    """The last exit hook: a piped stdout is flushed while Ctrl-C still ends the process, then Ctrl-C is
    ignored. What remains is the teardown of Python and its libraries (a fraction of a second), where
    Python's handlers no longer run: a Ctrl-C there would be lost or kill the process by the signal.
    The command's own status stands."""
    with contextlib.suppress(OSError, ValueError):  # Python's own flush, next, reports what failed
        sys.stdout.flush()
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def importing(frame) -> bool:
    """Whether the interrupted Python code runs inside an import (importlib's frames are its callers)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib._bootstrap"):
            return True
        frame = frame.f_back
    return False


def console_script(prog: str, module: str):
    """The console script ``prog``: ``module.main()`` through :func:`launch`."""

    def script() -> int:
        return launch(prog, module)

    return script


# The console scripts ([project.scripts]).
fss_run = console_script("fss-run", "fss.runtime.cli")
fss_train = console_script("fss-train", "fss.train.cli")
fss_export = console_script("fss-export", "fss.export.cli")
fss_eval = console_script("fss-eval", "fss.train.eval_cli")
fss_demo = console_script("fss-demo", "fss.demo.cli")
fss_serve = console_script("fss-serve", "fss.serve.cli")
