"""Ctrl-C from the start of every console script: one line, exit 130, while torch is being imported too."""

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from importlib.metadata import entry_points

import pytest
from helpers import random_model

import fss

COMMANDS = ("fss-run", "fss-train", "fss-export", "fss-eval", "fss-demo", "fss-serve")
AFTER_TORCH_MAPPED_S = (0.0, 0.5)  # while torch is imported (a second or more here), or after
MODEL_FIRST = {"fss-demo": "--port", "fss-serve": "--http-port"}  # the port flag of a command run for real


def console_script(name: str) -> list[str]:
    """What pip's wrapper of the installed console script runs."""
    (entry,) = entry_points(group="console_scripts", name=name)
    assert entry.module == "fss.entry", f"{name} installed from an older pyproject.toml: pip install -e ."
    wrapper = f"import sys; from {entry.module} import {entry.attr}; sys.exit({entry.attr}())"
    return [sys.executable, "-c", wrapper]


def importing_torch(pid: int) -> bool:
    """torch's library is mapped: the command's heavy imports have begun (fss's own code runs)."""
    try:
        with open(f"/proc/{pid}/maps") as maps:
            return "libtorch_cpu" in maps.read()
    except OSError:  # the process is gone
        return False


def full_pipe() -> tuple[int, int]:
    """(read end, write end) of a pipe that is already full: a write to it waits until it is read."""
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    for chunk in (4096, 1):
        with contextlib.suppress(BlockingIOError):
            while True:
                os.write(write_end, bytes(chunk))
    os.set_blocking(write_end, True)
    return read_end, write_end


def blocked_writing_to_a_pipe(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/wchan") as wchan:
            return "pipe_write" in wchan.read()
    except OSError:  # the process is gone
        return False


def as_from_a_terminal() -> None:
    """In the child before exec: SIGINT as a terminal's foreground job has it. A test runner started in
    the background inherits SIGINT ignored, which the commands rightly keep (see the last test)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def finished(process: subprocess.Popen) -> str:
    """The stderr of ``process`` once it ends; killed after a minute (a command that ignored the signal
    would otherwise hold the test run)."""
    try:
        return process.communicate(timeout=60)[1]
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise


def interrupted(argv: list[str], ready, delay: float = 0.0) -> tuple[int, str]:
    """(exit status, stderr) of ``argv`` sent SIGINT ``delay`` s after ``ready(pid)`` (or a minute). Its
    stdout is a full pipe: it cannot end before the signal, whatever the machine's speed (the help it
    writes, buffered, waits to be read when Python exits)."""
    read_end, write_end = full_pipe()
    env = {key: value for key, value in os.environ.items() if key != "PYTHONUNBUFFERED"}
    with open(read_end, "rb") as stdout:
        process = subprocess.Popen(
            argv, stdout=write_end, stderr=subprocess.PIPE, text=True, env=env, preexec_fn=as_from_a_terminal
        )
        os.close(write_end)
        deadline = time.monotonic() + 60
        while process.poll() is None and not ready(process.pid) and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(delay)
        process.send_signal(signal.SIGINT)
        threading.Thread(target=stdout.read, daemon=True).start()  # its exit flushes stdout
        err = finished(process)
    return process.returncode, err


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc/<pid>/maps (Linux)")
@pytest.mark.parametrize("name", COMMANDS)
def test_ctrl_c_while_importing_is_one_line_and_130(name, tmp_path):
    # fss-demo and fss-serve import torch in main (to load the model; their --help does not need it), the
    # others while importing their module
    if name in MODEL_FIRST:
        fss.save_checkpoint(random_model(), tmp_path / "m.pt")
        args = ["--ckpt", str(tmp_path / "m.pt"), MODEL_FIRST[name], "1"]
    else:
        args = ["--help"]
    for delay in AFTER_TORCH_MAPPED_S:
        status, err = interrupted(console_script(name) + args, importing_torch, delay)
        assert (status, err.splitlines()) == (130, [f"{name}: interrupted"]), (delay, err[-2000:])


@pytest.mark.skipif(not os.path.exists("/proc/self/wchan"), reason="needs /proc/<pid>/wchan (Linux)")
def test_ctrl_c_while_python_exits_is_one_line_and_130():
    """The help is written when Python exits, after main (stdout is buffered): it waits for the pipe."""
    status, err = interrupted(console_script("fss-demo") + ["--help"], blocked_writing_to_a_pipe)
    assert (status, err.splitlines()) == (130, ["fss-demo: interrupted"]), err[-2000:]


def ignores_sigint(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as status:
            mask = next(line for line in status if line.startswith("SigIgn:")).split()[1]
    except OSError:  # the process is gone
        return False
    return bool(int(mask, 16) & 1 << (signal.SIGINT - 1))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc/<pid>/status (Linux)")
def test_ctrl_c_in_pythons_teardown_leaves_the_commands_status():
    """After the last exit hook only the teardown remains (torch's takes ~0.8 s): Ctrl-C is ignored."""
    for _ in range(5):  # the teardown of fss-demo --help lasts ~20 ms: seen at once here, retried if missed
        argv = console_script("fss-demo") + ["--help"]
        process = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, preexec_fn=as_from_a_terminal
        )
        while process.poll() is None and not ignores_sigint(process.pid):
            time.sleep(0.001)
        signalled = process.poll() is None
        process.send_signal(signal.SIGINT)
        err = finished(process)
        if signalled:
            break
    assert signalled, "never saw the process ignore SIGINT before it ended"
    assert (process.returncode, err) == (0, "")


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
