"""Helpers for the ``state()`` / ``from_state()`` pairs of the allocator's classes.

Each class saves and restores its own fields (`paged_kv.checkpoint` keeps only the
file format and asks objects for their state), so the knowledge of a class's
internals stays in the class. Two rules make that safe:

* a restored array is checked for dtype and shape here, before any object uses it,
  so a forged or mis-written file fails with a message naming the array, never an
  IndexError deep inside (`take`);
* a class lists the attributes its ``state()`` covers (``SAVED_ATTRS``); saving an
  object with any other attribute raises, so adding state without saving it fails
  loudly instead of writing a checkpoint that silently drops it (`check_captured`).

Both raise `CheckpointError`; `paged_kv.checkpoint` adds the file's path.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import DTypeLike

from paged_kv.errors import CheckpointError


def take(state: dict[str, np.ndarray], name: str, dtype: DTypeLike, shape: tuple[int | None, ...]) -> np.ndarray:
    """An owned, writable copy of ``state[name]`` if it has ``dtype`` and ``shape``
    (``None`` entries: any length), else `CheckpointError` naming it."""
    if name not in state:
        raise CheckpointError(f"{name} is missing")
    a = state[name]
    ok = isinstance(a, np.ndarray) and a.ndim == len(shape) and all(w is None or w == s for w, s in zip(shape, a.shape))
    if not ok or a.dtype != np.dtype(dtype):
        want = tuple("*" if w is None else w for w in shape)
        got = f"{a.shape} {a.dtype.name}" if isinstance(a, np.ndarray) else type(a).__name__
        raise CheckpointError(f"{name} is {got}; expected {want} {np.dtype(dtype).name}")
    return np.array(a, dtype=dtype, copy=True)  # owned and writable: the allocator mutates it


def scoped(state: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """The entries of ``state`` under ``prefix`` with the prefix removed."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def prefixed(prefix: str, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``state`` with every name put under ``prefix``."""
    return {prefix + k: v for k, v in state.items()}


def check_captured(obj: object, saved: frozenset[str]) -> None:
    """Raise `CheckpointError` if ``obj`` has attributes its ``state()`` does not cover."""
    extra = sorted(set(vars(obj)) - saved)
    if extra:
        raise CheckpointError(
            f"{type(obj).__name__} has state paged_kv.checkpoint does not capture: {extra}; add it to "
            f"{type(obj).__name__}.state()/from_state() (and SAVED_ATTRS) and bump paged_kv.checkpoint.FORMAT_VERSION"
        )


__all__ = ["check_captured", "prefixed", "scoped", "take"]
