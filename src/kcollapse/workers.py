"""A pool of spawned worker processes that die with their parent: how arms run in parallel (`parallel_arms: N`).

On a small CPU, two single-threaded processes beat one two-threaded process (a tiny model's ops are too small to
split well across threads). Arms are independent after generation 0, so the loop hands them to N workers, one arm
at a time each. Every step is seeded from (seed, arm, generation) alone and written atomically, so what a worker
computes does not depend on the scheduling, and resume works unchanged. This module knows nothing of arms: it
runs picklable jobs and calls `watch()` while they run.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import time


def threads_per_worker(parallel: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // parallel)


def die_with_parent() -> None:
    """This process gets SIGKILL when its parent dies (Linux), so a killed run leaves no orphan writing files."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _job(fn, args):
    die_with_parent()
    return fn(*args)


def run_in_processes(fn, jobs: list[tuple], parallel: int, watch, interval: float = 0.5) -> None:
    """fn(*args) for every args in `jobs` on `parallel` spawned processes; `watch()` every `interval` seconds and once
    after the last job. A worker's error (e.g. a UserError) is raised here; on it, or on Ctrl-C, no worker goes on."""
    pool = multiprocessing.get_context("spawn").Pool(parallel)
    try:
        handles = [pool.apply_async(_job, (fn, args)) for args in jobs]
        while True:
            all_done = all(h.ready() for h in handles)  # before watching: a late finish is seen by this watch
            for h in handles:
                if h.ready():
                    h.get()
            watch()
            if all_done:
                break
            time.sleep(interval)
        pool.close()
    finally:
        pool.terminate()
        pool.join()
