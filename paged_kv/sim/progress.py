"""A one-line text progress bar for long replays, redrawn in place on a terminal."""

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


__all__ = ["ProgressBar"]
