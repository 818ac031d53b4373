"""The arm worker pool (workers.py): a worker that dies mid-job ends the run at once with WorkerDied, saying how it
ended, and takes the other workers down; without the check multiprocessing's Pool waits forever for the lost job."""

from __future__ import annotations

import os
import re
import signal
import time

import pytest

from kcollapse.errors import WorkerDied
from kcollapse.workers import run_in_processes


def die(how: str) -> None:
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    os._exit(3)


def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@pytest.mark.parametrize("how, said", [("kill", "was killed by SIGKILL (out of memory?)"), ("exit", "exited with code 3")])
def test_a_dead_worker_ends_the_pool_at_once_and_says_how(how, said):
    started = time.monotonic()

    def watch():  # a pool that went on waiting would hang the test: fail it instead
        assert time.monotonic() - started < 30, "the pool still waits 30 s after a worker died"

    with pytest.raises(WorkerDied, match=r"a worker process \(pid \d+\) " + re.escape(said)):
        run_in_processes(call, [("nap", 60.0), ("die", how)], 2, watch, interval=0.05)
    assert time.monotonic() - started < 30  # the napping worker was not waited for


def test_jobs_that_finish_end_the_pool_normally():
    watched = []
    run_in_processes(call, [("nap", 0.1), ("nap", 0.2), ("nap", 0.1)], 2, lambda: watched.append(1), interval=0.05)
    assert watched


def call(name: str, arg):
    return {"die": die, "nap": nap}[name](arg)
