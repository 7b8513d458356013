"""The byte copies of a host move, on the calling thread or shared with workers.

A move between a pool in host memory and the host tier is a list of row copies
(`host.row_runs`: one slice copy per run of rows, per leaf). `start` begins them and
`Running.wait` finishes them, on the calling thread alone (``threads=1``: all in
`wait`, after whatever bookkeeping the caller did in between) or with ``threads - 1``
worker threads (`CacheTiers(copy_threads=...)`) that copy while the caller does its
bookkeeping, then beside it: numpy releases the GIL while it copies a large slice, so
the copies run on several cores at once, which a memory bus one core cannot fill
makes faster than one memcpy.

Work is taken, not handed out: every participant, the caller included, claims the
next copy until none is left, so a worker the OS does not schedule in time (a loaded
machine) costs nothing -- the caller does its share and the copy is never slower than
on one thread by more than the hand-off. The caller returns only once every copy has
finished, and no worker keeps a reference to an array after its copy: a view of the
pool still alive would make a later donation copy the pool (`host_pool`).
"""

from __future__ import annotations

import queue
import threading
import numpy as np

Run = tuple[int, int, int, int]
"""``(dst_start, src_start, count, step)`` as `host.row_runs` makes them."""

Copy = tuple[np.ndarray, np.ndarray, Run]
"""``dst[d0: d0 + k] = src`` rows of one run (``step`` -1: downwards in ``src``)."""

CHUNK_BYTES = 1 << 20
"""Runs longer than this are split (row-aligned), so the copies share out evenly; a
claim costs a few microseconds, a 1 MiB copy ~0.1 ms."""


def _copy(dst: np.ndarray, src: np.ndarray, run: Run) -> None:
    d0, s0, k, step = run
    if step == 1:
        dst[d0: d0 + k] = src[s0: s0 + k]
    else:
        dst[d0: d0 + k] = src[s0 - k + 1: s0 + 1][::-1]


def _chunks(copies: list[Copy]) -> list[Copy]:
    """``copies`` with each run longer than `CHUNK_BYTES` split into row-aligned
    pieces (a run downwards stays downwards), so that the copies share out evenly."""
    out: list[Copy] = []
    for dst, src, (d0, s0, k, step) in copies:
        most = max(CHUNK_BYTES // max(int(dst[:1].nbytes), 1), 1)
        if k <= most:
            out.append((dst, src, (d0, s0, k, step)))
            continue
        for i in range(0, k, most):
            out.append((dst, src, (d0 + i, s0 + step * i, min(most, k - i), step)))
    return out


class _Job:
    """One `copy_all` call: its copies, the next to claim, how many are unfinished."""

    __slots__ = ("copies", "next", "left", "lock", "done", "error")

    def __init__(self, copies: list[Copy]):
        self.copies: list[Copy] | None = copies
        self.next, self.left = 0, len(copies)
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.error: BaseException | None = None

    def work(self) -> None:
        """Claim and run copies until none is left (the caller and every worker)."""
        while True:
            with self.lock:
                copies, i = self.copies, self.next
                if copies is None or i >= len(copies):
                    return
                self.next = i + 1
                dst, src, run = copies[i]
                del copies  # a worker holds no list of the pool's views between claims
            try:
                _copy(dst, src, run)
            except BaseException as exc:  # re-raised by the caller
                self.error = exc
            del dst, src  # before the copy counts as finished: the caller may return then
            with self.lock:
                self.left -= 1
                if self.left == 0:
                    self.done.set()


_jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
_workers: list[threading.Thread] = []
_start = threading.Lock()


def _serve() -> None:
    while True:
        job = _jobs.get()
        job.work()
        del job


def _ensure_workers(n: int) -> None:
    with _start:
        while len(_workers) < n:
            t = threading.Thread(target=_serve, name=f"paged_kv-tier-copy-{len(_workers)}", daemon=True)
            t.start()
            _workers.append(t)


class Running:
    """Copies `start`ed: `wait` returns once every one is done (the caller copies too)."""

    __slots__ = ("_job", "_copies")

    def __init__(self, job: _Job | None, copies: list[Copy] | None):
        self._job, self._copies = job, copies

    def wait(self) -> None:
        """Run what is left on this thread, wait for the workers' copies; raise the
        first error a copy raised. No reference to the copies is kept afterwards."""
        copies, self._copies = self._copies, None
        if copies is not None:  # one thread: every copy runs now
            for dst, src, run in copies:
                _copy(dst, src, run)
            return
        job, self._job = self._job, None
        if job is None:
            return
        job.work()
        job.done.wait()
        with job.lock:
            job.copies = None  # a worker that wakes late finds nothing and holds no view
        if job.error is not None:
            raise job.error


def start(copies: list[Copy], threads: int = 1) -> Running:
    """Begin ``copies`` (module doc): with ``threads - 1`` workers at once, the caller
    joining in at `Running.wait`; on one thread they all run in `Running.wait`. Either
    way the caller can do its bookkeeping in between -- beside the copies, or before
    them, not between them (Python run after a copy of many MiB runs several times
    slower: its caches were flushed)."""
    if threads <= 1 or not copies:
        return Running(None, copies)
    copies = _chunks(copies)
    job = _Job(copies)
    helpers = min(threads - 1, len(copies))
    _ensure_workers(helpers)
    for _ in range(helpers):
        _jobs.put(job)
    return Running(job, None)


def copy_all(copies: list[Copy], threads: int = 1) -> None:
    """`start` ``copies`` and wait for them."""
    start(copies, threads).wait()


def workers_started() -> int:
    """Worker threads started so far (they wait for work; tests count them)."""
    return len(_workers)


__all__ = ["CHUNK_BYTES", "Copy", "Run", "Running", "copy_all", "start", "workers_started"]

