"""A pool in host memory, read and written in place: what the tiers' moves
(`paged_kv.tiers.movement`) and a same-host transfer (`paged_kv.transfer.stream`)
share when a cache lives on a CPU device.

On a CPU device a jax array's buffer is ordinary host memory, so its pages can be
copied straight from and into numpy without a jitted gather or scatter. Two rules
keep that safe, and each caller follows them: read only after every step that writes
the pool has run (`arrays` to wait for), and write only into a cache this caller
holds alone (donated through a jitted call and waited for), before anyone else sees
it. `writable` hands out a plain pointer view, not a numpy view of the array, so that
a later donation does not see a live reference and copy the pool.
"""

from __future__ import annotations

import ctypes
from typing import Any

import jax
import numpy as np

from paged_kv.cache import PagedKVCache


def arrays(cache: PagedKVCache) -> list[Any]:  # jax.Array, whose stubs lack is_ready and the platform
    """Every array of the pool: each view's page leaves, generations and owner."""
    return [a for view in cache.views for a in (*jax.tree_util.tree_leaves(view.pages()), view.generations,
                                                view.owner)]


def _row_major(a: jax.Array) -> bool:
    if a.ndim <= 1:
        return True
    layout = getattr(getattr(a, "format", None), "layout", None)
    return bool(layout is not None and tuple(layout.major_to_minor) == tuple(range(a.ndim)) and not layout.tiling)


def host_memory(cache: PagedKVCache) -> bool:
    """Whether the pool's pages, generations and owners are host memory laid out as
    numpy would: each array on one CPU device, row-major."""
    pool = arrays(cache)
    if any(not isinstance(a, jax.Array) or len(a.sharding.device_set) != 1 for a in pool):
        return False
    return bool(next(iter(pool[0].sharding.device_set)).platform == "cpu") and all(map(_row_major, pool))


def writable(leaf: jax.Array) -> np.ndarray:
    """The buffer of ``leaf`` (host memory, held by this caller alone) as a writable flat
    uint8 array; a plain pointer, so no reference that a later donation sees."""
    raw = (ctypes.c_char * leaf.nbytes).from_address(leaf.unsafe_buffer_pointer())
    out: np.ndarray = np.frombuffer(memoryview(raw).cast("B"), np.uint8)
    return out


__all__ = ["arrays", "host_memory", "writable"]
