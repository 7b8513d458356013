"""Progress of long runs on stderr: a bar redrawn in place on a terminal, or plain
lines when stderr is a log file or a pipe (where a redrawn bar would print nothing
readable, and printing nothing looks like a hang). Both give the time left, estimated
from the rate so far."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _seconds(s: float) -> str:
    """``4.2 s``, ``3 min 05 s``, ``2 h 01 min``: a duration at the precision it is worth."""
    if s < 60:
        return f"{s:.1f} s"
    minutes, sec = divmod(int(round(s)), 60)
    if minutes < 60:
        return f"{minutes} min {sec:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def eta(done: int, total: int, elapsed: float) -> str:
    """``ETA 12.3 s`` from the mean rate so far; empty before the first unit is done
    (no rate yet) and once all are (nothing left)."""
    if done <= 0 or done >= total or elapsed <= 0:
        return ""
    return f", ETA {_seconds(elapsed * (total - done) / done)}"


class ProgressBar:
    """``bar(done, total)`` redraws ``label [####....] 42% 8,131/19,366 requests 3.1 s, ETA 4.3 s``.

    Redraws at most ten times a second so that drawing costs nothing next to the
    work; `close` ends the line. ``unit`` names what is counted.
    """

    def __init__(self, label: str, stream: TextIO | None = None, width: int = 30, unit: str = "requests"):
        self.label = label
        self.stream = sys.stderr if stream is None else stream
        self.width = width
        self.unit = unit
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
        elapsed = now - self.started
        # The padding clears what a longer previous line (a longer ETA) left behind.
        self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (self.width - filled)}] {frac:4.0%} "
                          f"{done:,}/{total:,} {self.unit} {_seconds(elapsed)}{eta(done, total, elapsed)}    ")
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()


class ProgressLog:
    """``log(done, total)`` writes ``label: 8,131/19,366 requests (42%), 10.0 s, ETA 13.8 s``
    at most once every ``every_s`` seconds, one line at a time; `close` writes the final
    count unless the last line shown was it, so a run shorter than ``every_s`` still
    says, once, that it ran and how long it took."""

    def __init__(self, label: str, stream: TextIO | None = None, every_s: float = 10.0, unit: str = "requests"):
        self.label = label
        self.stream = sys.stderr if stream is None else stream
        self.every_s = every_s
        self.unit = unit
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
        """Write the final count, if there was progress and it is not the last line shown."""
        if self._latest is not None and self._latest != self._written:
            self._write(*self._latest, time.perf_counter())

    def _write(self, done: int, total: int, now: float) -> None:
        frac = done / total if total else 1.0
        elapsed = now - self.started
        self.stream.write(f"{self.label}: {done:,}/{total:,} {self.unit} ({frac:.0%}), {_seconds(elapsed)}"
                          f"{eta(done, total, elapsed)}\n")
        self.stream.flush()
        self._written = (done, total)


__all__ = ["ProgressBar", "ProgressLog", "eta"]
