"""Where step metadata arrays live: `FRESH` (new arrays, the caller's to keep) or
`Buffers` (one flat buffer per name, reused step after step), and `fill`, the element
writer a few rows use. The builders of `paged_kv.allocator.step_arrays` take either."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Shape = tuple[int, ...]


class Fresh:
    """New arrays on every request: what `step_metadata` returns is the caller's to keep."""

    __slots__ = ()

    @staticmethod
    def get(name: str, shape: Shape) -> np.ndarray:
        return np.empty(shape, np.int32)


FRESH = Fresh()


class Buffers:
    """Metadata arrays reused step after step: one flat int32 buffer per name, handed
    out as a view of the shape asked for (the same view object for the same shape).

    Why: a fresh array of a few hundred KiB is mmapped and page-faulted on first
    touch, and a mixed step's ``[B, T]`` positions and slots are that size. A buffer
    only grows, so after the first steps of a loop nothing is allocated. Every array
    handed out is fully overwritten by its user, and arrays of one name are one
    layout's (a holder keeps one decode layout and one mixed step at a time). A buffer
    that grows keeps its bytes, so a layout whose batch bucket grows keeps its rows."""

    def __init__(self) -> None:
        self._flat: dict[str, np.ndarray] = {}
        self._views: dict[tuple[str, Shape], np.ndarray] = {}
        self._memoryviews: dict[tuple[str, Shape], memoryview] = {}
        self.epoch = 0  # bumped whenever a buffer is replaced (its views with it): holders re-fetch theirs

    def get(self, name: str, shape: Shape) -> np.ndarray:
        view = self._views.get((name, shape))
        if view is None:
            size = int(np.prod(shape))
            flat = self._flat.get(name)
            if flat is None or flat.size < size:
                old = flat
                flat = self._flat[name] = np.empty(max(size, 2 * (0 if old is None else old.size)), np.int32)
                if old is not None:
                    flat[:old.size] = old
                self.epoch += 1
                # Views of the old buffer go with it.
                self._views = {k: v for k, v in self._views.items() if k[0] != name}
                self._memoryviews = {k: v for k, v in self._memoryviews.items() if k[0] != name}
            view = self._views[(name, shape)] = flat[:size].reshape(shape)
        return view

    def memoryview(self, name: str, shape: Shape) -> memoryview:
        """A memoryview of ``get(name, shape)``, made once: exporting a buffer costs ~0.7 µs.
        ``shape`` ``(n,)`` of a ``(B, 1)`` array indexes its column (the same bytes)."""
        mv = self._memoryviews.get((name, shape))
        if mv is None:
            mv = self._memoryviews[(name, shape)] = memoryview(self.get(name, shape))  # type: ignore[arg-type]  # numpy arrays export buffers
        return mv


def fill(view: memoryview, values: Sequence[int], pad: int) -> None:
    """``view[:len(values)] = values`` and the rest ``pad``, element by element (a memoryview)."""
    n = len(values)
    for b, v in enumerate(values):
        view[b] = v
    for b in range(n, len(view)):
        view[b] = pad


__all__ = ["Buffers", "FRESH", "Fresh", "fill"]
