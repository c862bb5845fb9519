"""`hpc convert --processes N`: worker processes share the shards of all studies (one big file is
converted in parallel too). Workers die with the parent (even `kill -9`: PR_SET_PDEATHSIG), ignore
Ctrl-C (the parent decides: hpc.convert.convert.Interrupt), and are stopped at once on an error or an
interrupt, their temporary shards removed.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
from collections.abc import Callable
from pathlib import Path

from hpc.convert.study import Options, Study, convert_shard, hash_sources, shard_ranges, study_entry, sweep_temporaries
from hpc.progress import Progress

_QUEUE = None  # per worker process: where progress counts go


def available_cores() -> int:
    """Cores this process may run on (its affinity mask: a Slurm task's share, not the node's)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def die_with_parent(parent: int) -> None:
    """In a worker process: be killed (SIGKILL) when the parent dies, even by kill -9 (Linux
    PR_SET_PDEATHSIG); a parent already gone before that took effect means exit now. Without it,
    workers of a killed `hpc convert` are re-parented and keep writing."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(1)


class _QuietSpawnProcess(multiprocessing.get_context("spawn").Process):
    def start(self) -> None:
        """Start with SIGINT ignored from the worker's first instruction (an ignored signal stays
        ignored across exec): Ctrl-C reaches the whole process group, and a worker still importing
        hpc would print a KeyboardInterrupt traceback. The parent alone decides (Interrupt)."""
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            super().start()
        finally:
            signal.signal(signal.SIGINT, previous)


class _QuietSpawnContext(type(multiprocessing.get_context("spawn"))):
    Process = _QuietSpawnProcess


def _init_worker(queue, parent: int) -> None:
    global _QUEUE
    die_with_parent(parent)
    _QUEUE = queue


def _shard_task(*args) -> dict:
    return convert_shard(*args, _QUEUE.put)


def _drain(queue, bar: Progress) -> None:
    while not queue.empty():
        bar.update(queue.get())


def _gather(pool, queue, bar: Progress, futures: list, check: Callable[[], None]) -> list:
    """Results of ``futures`` in order, feeding the progress bar; the first error cancels the rest;
    ``check()`` (Ctrl-C) runs every 0.2 s."""
    from concurrent.futures import FIRST_EXCEPTION, wait

    pending = set(futures)
    while pending:
        check()
        done, pending = wait(pending, timeout=0.2, return_when=FIRST_EXCEPTION)
        _drain(queue, bar)
        failed = [f for f in done if f.exception() is not None]
        if failed:
            raise failed[0].exception()  # _run_pool stops the other workers
    _drain(queue, bar)
    return [f.result() for f in futures]


def run_pool(studies: list[Study], out: Path, opts: Options, workers: int, bar: Progress,
              check: Callable[[], None] = lambda: None) -> list[dict]:
    """Worker processes share the shards of all studies (one big file is converted in parallel
    too): first the source checksums, then every shard, largest study first."""
    from concurrent.futures import ProcessPoolExecutor

    ctx = _QuietSpawnContext()  # fresh interpreters: no inherited HDF5 state
    queue = ctx.Queue()
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(queue, os.getpid()))
    try:
        return _pool_entries(pool, queue, studies, out, opts, bar, check)
    except BaseException:
        # an error or Ctrl-C: stop the workers now (not after their current shard), then remove
        # the temporary shards they leave behind. Killed before the pool is shut down: shutting down
        # lets the pool's queues go, whose semaphores a worker still starting (unpickling them) then
        # cannot find, and it printed a traceback after "interrupted"
        procs = list((pool._processes or {}).values())  # no public API to stop running workers
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.join(timeout=30)
        pool.shutdown(wait=False, cancel_futures=True)
        sweep_temporaries(out)
        raise
    finally:
        pool.shutdown(wait=True)


def _pool_entries(pool, queue, studies: list[Study], out: Path, opts: Options, bar: Progress,
                  check: Callable[[], None]) -> list[dict]:
    sums = _gather(pool, queue, bar, [pool.submit(hash_sources, s) for s in studies], check)
    tasks = [(i, k, first, count) for i in sorted(range(len(studies)), key=lambda i: -studies[i].nbytes)
             for k, (first, count) in enumerate(shard_ranges(studies[i], opts))]
    futures = [pool.submit(_shard_task, studies[i], sums[i], k, first, count, out, opts)
               for i, k, first, count in tasks]
    shards: dict[int, list] = {i: [] for i in range(len(studies))}
    for (i, _, _, _), entry in zip(tasks, _gather(pool, queue, bar, futures, check), strict=True):
        shards[i].append(entry)  # tasks of one study are in shard order
    while bar.n < sum(s.target.num_slices for s in studies):  # counts may trail the results
        bar.update(queue.get(timeout=10))
    return [study_entry(s, sums[i], shards[i]) for i, s in enumerate(studies)]
