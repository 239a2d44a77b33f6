"""Where checks run: worker processes (CPU-bound checks in parallel across cores) or threads (checks
whose work happens in subprocesses of their own, such as running code).

Worker processes are started with ``spawn``: the parent may hold torch, an inference engine and
their threads, which a forked child would inherit half-initialised. A check that kills its worker
(a crash in a native library, the kernel's out-of-memory killer) breaks the pool; the jobs it had not
finished are then retried one at a time on a fresh pool, so only the job that kills its worker again
is lost, as a failed check saying so, and every other result is kept.
"""

from __future__ import annotations

import asyncio
import atexit
import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Literal, TypeVar

T = TypeVar("T")

Execution = Literal["processes", "threads"]

_POOLS: dict[tuple[Execution, int], Executor] = {}


def default_workers() -> int:
    """One worker per CPU this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _executor(execution: Execution, workers: int) -> Executor:
    key = (execution, workers)
    if key not in _POOLS:
        if execution == "threads":
            _POOLS[key] = ThreadPoolExecutor(workers, thread_name_prefix="synthpref-check")
        else:
            context = multiprocessing.get_context("spawn")
            _POOLS[key] = ProcessPoolExecutor(workers, mp_context=context)
    return _POOLS[key]


def _discard(execution: Execution, workers: int) -> None:
    pool = _POOLS.pop((execution, workers), None)
    if pool is not None:
        pool.shutdown(wait=False, cancel_futures=True)


@atexit.register
def _shutdown() -> None:
    for key in list(_POOLS):
        _discard(*key)


async def run_all(
    fn: Callable[..., T],
    jobs: Sequence[tuple[Any, ...]],
    *,
    execution: Execution = "processes",
    workers: int | None = None,
    died: Callable[[tuple[Any, ...]], T],
) -> list[T]:
    """``fn(*job)`` for every job, in order, ``workers`` at a time (default: one per core).

    ``fn`` must be a module-level function (worker processes import it by name). ``died(job)`` is
    the result of a job whose worker process died twice running it."""
    if not jobs:
        return []
    n = workers or default_workers()
    loop = asyncio.get_running_loop()
    results: list[Any] = [None] * len(jobs)
    pending = list(range(len(jobs)))
    try:
        pool = _executor(execution, n)
        futures = [loop.run_in_executor(pool, fn, *jobs[i]) for i in pending]
        done = await asyncio.gather(*futures, return_exceptions=True)
    except BrokenProcessPool:
        done = [BrokenProcessPool()] * len(pending)
    retry = []
    for i, value in zip(pending, done, strict=True):
        if isinstance(value, BrokenProcessPool):
            retry.append(i)
        elif isinstance(value, BaseException):
            raise value
        else:
            results[i] = value
    if retry:
        _discard(execution, n)
    for i in retry:  # one at a time: a job that kills its worker again takes only itself down
        try:
            results[i] = await loop.run_in_executor(_executor(execution, n), fn, *jobs[i])
        except BrokenProcessPool:
            _discard(execution, n)
            results[i] = died(jobs[i])
    return results
