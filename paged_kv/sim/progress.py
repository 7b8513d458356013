"""Progress of long replays on stderr: a bar redrawn in place on a terminal, or a
plain line every few seconds when stderr is a log file or a pipe (where a redrawn
bar would print nothing readable, and printing nothing looks like a hang)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressBar:
    """``bar(done, total)`` redraws ``label [####....] 42% 8,131/19,366 requests 3.1 s``.

    Redraws at most ten times a second so that drawing costs nothing next to the
    replay; `close` ends the line.
    """

    def __init__(self, label: str, stream: TextIO | None = None, width: int = 30):
        self.label = label
        self.stream = sys.stderr if stream is None else stream
        self.width = width
        self.started = time.perf_counter()
        self._last = -1.0
        self._drawn = False

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if now - self._last < 0.1 and done < total:
            return
        self._last = now
        frac = done / total if total else 1.0
        filled = int(frac * self.width)
        self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (self.width - filled)}] {frac:4.0%} "
                          f"{done:,}/{total:,} requests {now - self.started:.1f} s")
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()


class ProgressLog:
    """``log(done, total)`` writes ``label: 8,131/19,366 requests (42%), 10.0 s`` at most
    once every ``every_s`` seconds, one line at a time; `close` adds the final count
    if a line was written and the count moved on since (a short replay stays quiet)."""

    def __init__(self, label: str, stream: TextIO | None = None, every_s: float = 10.0):
        self.label = label
        self.stream = sys.stderr if stream is None else stream
        self.every_s = every_s
        self.started = self._last = time.perf_counter()
        self._latest: tuple[int, int] | None = None
        self._written: tuple[int, int] | None = None

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        self._latest = (done, total)
        if now - self._last >= self.every_s:
            self._last = now
            self._write(done, total, now)

    def close(self) -> None:
        """Write the final count, if lines were written and it is not the last one shown."""
        if self._written is not None and self._latest != self._written:
            self._write(*self._latest, time.perf_counter())

    def _write(self, done: int, total: int, now: float) -> None:
        frac = done / total if total else 1.0
        self.stream.write(f"{self.label}: {done:,}/{total:,} requests ({frac:.0%}), {now - self.started:.1f} s\n")
        self.stream.flush()
        self._written = (done, total)


__all__ = ["ProgressBar", "ProgressLog"]
