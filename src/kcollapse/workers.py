"""A pool of spawned worker processes that die with their parent: how arms run in parallel (`parallel_arms: N`).

On a small CPU, two single-threaded processes beat one two-threaded process (a tiny model's ops are too small to
split well across threads). Arms are independent after generation 0, so the loop hands them to N workers, one arm
at a time each. Every step is seeded from (seed, arm, generation) alone and written atomically, so what a worker
computes does not depend on the scheduling, and resume works unchanged. This module knows nothing of arms: it
runs picklable jobs and calls `watch()` while they run. A worker that dies (the out-of-memory killer, a signal) ends
the run with `WorkerDied`: multiprocessing's Pool would quietly start another process and wait forever for the lost
job.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import time

from kcollapse.errors import WorkerDied


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
    after the last job. A worker's error (e.g. a UserError) is raised here, a worker's death as WorkerDied; on either,
    or on Ctrl-C, no worker goes on."""
    before = {p.pid for p in multiprocessing.active_children()}
    pool = multiprocessing.get_context("spawn").Pool(parallel)
    try:
        pool_workers = [p for p in multiprocessing.active_children() if p.pid not in before]
        handles = [pool.apply_async(_job, (fn, args)) for args in jobs]
        while True:
            all_done = all(h.ready() for h in handles)  # before watching: a late finish is seen by this watch
            for h in handles:
                if h.ready():
                    h.get()
            watch()
            if all_done:
                break
            for p in pool_workers:  # a pool worker only exits when the pool closes: any earlier end is a death
                if p.exitcode is not None:
                    raise WorkerDied(f"a worker process (pid {p.pid}) {ended(p.exitcode)} before its job was done")
            time.sleep(interval)
        pool.close()
    finally:
        pool.terminate()
        pool.join()


def ended(exitcode: int) -> str:
    """How a process ended, in words: a signal by name (SIGKILL is what the out-of-memory killer sends)."""
    if exitcode >= 0:
        return f"exited with code {exitcode}"
    try:
        name = signal.Signals(-exitcode).name
    except ValueError:
        name = f"signal {-exitcode}"
    return f"was killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
