"""Metadata buffers a `StepBatch` reuses step after step (no allocation once warm)."""

from __future__ import annotations

import numpy as np


class Buffers:
    """Metadata arrays reused step after step: one flat int32 buffer per name, handed
    out as a view of the shape asked for (the same view object for the same shape).

    Why: a fresh array of a few hundred KiB is mmapped and page-faulted on first
    touch, and a mixed step's ``[B, T]`` positions and slots are that size. A buffer
    only grows, so after the first steps of a loop nothing is allocated. Every array
    handed out is fully overwritten by its user, and arrays of one name are one
    layout's (the batch holds one decode layout and one mixed step at a time)."""

    def __init__(self):
        self._flat: dict[str, np.ndarray] = {}
        self._views: dict[tuple, np.ndarray] = {}
        self._memoryviews: dict[tuple, memoryview] = {}

    def get(self, name: str, shape: tuple) -> np.ndarray:
        view = self._views.get((name, shape))
        if view is None:
            size = int(np.prod(shape))
            flat = self._flat.get(name)
            if flat is None or flat.size < size:
                flat = self._flat[name] = np.empty(max(size, 2 * (0 if flat is None else flat.size)), np.int32)
                # Views of the old buffer go with it.
                self._views = {k: v for k, v in self._views.items() if k[0] != name}
                self._memoryviews = {k: v for k, v in self._memoryviews.items() if k[0] != name}
            view = self._views[(name, shape)] = flat[:size].reshape(shape)
        return view

    def memoryview(self, name: str, shape: tuple) -> memoryview:
        """A memoryview of ``get(name, shape)``, made once: exporting a buffer costs ~0.7 µs.
        ``shape`` ``(n,)`` of a ``(B, 1)`` array indexes its column (the same bytes)."""
        mv = self._memoryviews.get((name, shape))
        if mv is None:
            mv = self._memoryviews[(name, shape)] = memoryview(self.get(name, shape))
        return mv


def fill(view: memoryview, values, pad: int) -> None:
    """``view[:len(values)] = values`` and the rest ``pad``, element by element."""
    n = len(values)
    for b, v in enumerate(values):
        view[b] = v
    for b in range(n, len(view)):
        view[b] = pad


__all__ = ["Buffers", "fill"]
