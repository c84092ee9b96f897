"""The console scripts (``[project.scripts]``): Ctrl-C is one line and exit 130 from the start.

A command's module imports torch, numpy or Gradio (seconds). A Ctrl-C then would end in a
``KeyboardInterrupt`` traceback and death by the signal, so each entry point first makes SIGINT end
the process at once (nothing is written yet), then imports the command and hands Ctrl-C back to
Python: from there it is a ``KeyboardInterrupt``, which the command's runner (``fss.command``) turns
into its note, or this module into one line. Only the standard library is imported here.
"""

import os
import signal
import sys
from importlib import import_module

INTERRUPTED = 130  # as fss.command.INTERRUPTED, which is not imported before the handling is in place


def fss_run() -> int:
    return launch("fss-run", "fss.runtime.cli")


def fss_train() -> int:
    return launch("fss-train", "fss.train.cli")


def fss_export() -> int:
    return launch("fss-export", "fss.export.cli")


def fss_eval() -> int:
    return launch("fss-eval", "fss.train.eval_cli")


def fss_demo() -> int:
    return launch("fss-demo", "fss.demo.cli")


def fss_serve() -> int:
    return launch("fss-serve", "fss.serve.cli")


def launch(prog: str, module: str) -> int:
    """``module.main()`` with Ctrl-C as exit 130 and one line, during its imports too."""
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return import_module(module).main()  # SIGINT ignored (a background job) or someone else's: kept

    def end_at_once(signum, frame):
        # os.write and os._exit: the interrupted code may be inside a print; nothing needs cleaning up
        os.write(2, f"{prog}: interrupted\n".encode())
        os._exit(INTERRUPTED)

    signal.signal(signal.SIGINT, end_at_once)
    main = import_module(module).main
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        return main()
    except KeyboardInterrupt:  # outside the command's runner (parsing the arguments, ...)
        print(f"{prog}: interrupted", file=sys.stderr)
        return INTERRUPTED
