"""Running lmforge under torchrun from a test, so that a hang fails with the workers' stacks
rather than only a timeout."""

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

# One thread a rank: two ranks on two cores. Python's fault handler prints every thread's
# stack on SIGABRT, which is how a hung run shows where it waits.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}


def torchrun(args: list[str], nproc: int = 2, launcher: list[str] | None = None,
             timeout: float = 240) -> str:
    """`python -m torch.distributed.run ... -m lmforge.cli ARGS`; its output. A run still
    going after `timeout` seconds is aborted (each worker prints its stacks) and fails the
    test with the end of its output."""
    cmd = [sys.executable, "-m", "torch.distributed.run",
           *(launcher or ["--standalone"]), f"--nproc_per_node={nproc}", "-m", "lmforge.cli",
           *args]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # torchrun starts each worker in a session of its own: they are signalled one by one,
        # or they would outlive the test.
        workers = children(proc.pid)
        for pid in workers:
            os.kill(pid, signal.SIGABRT)
        proc.terminate()
        try:
            output, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            for pid in [proc.pid, *workers]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            output, _ = proc.communicate()
        pytest.fail(f"torchrun was still running after {timeout} s:\n{output[-8000:]}")
    assert proc.returncode == 0, output[-4000:]
    return output


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (from /proc: Linux)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            # the parent is the second field after the command, which ends with the last ')'
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return found
