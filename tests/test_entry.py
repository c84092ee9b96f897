"""Ctrl-C from the start of every console script: one line, exit 130, while torch is being imported too."""

import os
import signal
import subprocess
import sys
import time
from importlib.metadata import entry_points

import pytest
from helpers import random_model

import fss

COMMANDS = ("fss-run", "fss-train", "fss-export", "fss-eval", "fss-demo", "fss-serve")
AFTER_TORCH_MAPPED_S = (0.0, 0.15, 0.4)  # torch's import goes on for a second or more after that


def console_script(name: str) -> list[str]:
    """What pip's wrapper of the installed console script runs."""
    (entry,) = entry_points(group="console_scripts", name=name)
    wrapper = f"import sys; from {entry.module} import {entry.attr}; sys.exit({entry.attr}())"
    return [sys.executable, "-c", wrapper]


def importing_torch(pid: int) -> bool:
    """torch's library is mapped: the command's heavy imports have begun (fss's own code runs)."""
    try:
        with open(f"/proc/{pid}/maps") as maps:
            return "libtorch_cpu" in maps.read()
    except OSError:  # the process is gone
        return False


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc/<pid>/maps (Linux)")
@pytest.mark.parametrize("name", COMMANDS)
def test_ctrl_c_while_importing_is_one_line_and_130(name, tmp_path):
    # --help ends right after the imports; fss-demo imports torch in main (loading the model) instead
    if name == "fss-demo":
        fss.save_checkpoint(random_model(), tmp_path / "m.pt")
        args = ["--ckpt", str(tmp_path / "m.pt"), "--port", "1"]
    else:
        args = ["--help"]
    for delay in AFTER_TORCH_MAPPED_S:
        process = subprocess.Popen(
            console_script(name) + args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        while process.poll() is None and not importing_torch(process.pid):
            time.sleep(0.002)
        time.sleep(delay)
        process.send_signal(signal.SIGINT)
        err = process.communicate(timeout=60)[1]
        assert (process.returncode, err.splitlines()) == (130, [f"{name}: interrupted"]), (delay, err[-2000:])


def test_an_ignored_sigint_stays_ignored():
    """A background job started with SIGINT ignored is not made interruptible."""
    code = (
        "import signal, sys\n"
        "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
        "import fss.entry\n"
        "sys.argv = ['fss-demo', '--help']\n"
        "try:\n    fss.entry.fss_demo()\nexcept SystemExit:\n    pass\n"
        "assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "usage: fss-demo" in done.stdout, done.stderr
