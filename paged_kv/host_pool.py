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
    return in_host_memory(arrays(cache))


_LAYOUTS: dict[Any, bool] = {}
"""Whether arrays of a (PJRT) layout are row-major, per layout seen: `jax.Array.format`
builds Python objects per array (~2 us each, several times that between the copies of
a move, whose bytes flush the CPU's caches); the layout itself is a hashable C++ value."""


def _row_major_fast(a: jax.Array) -> bool:
    layout = getattr(a, "_pjrt_layout", None)  # what `format` reads; absent in another jax: the public way
    if layout is None:
        return _row_major(a)
    known = _LAYOUTS.get(layout)
    if known is None:
        known = _LAYOUTS[layout] = _row_major(a)
    return known


def in_host_memory(pool: list[Any]) -> bool:
    """`host_memory` of the pool's arrays already listed (``jax.tree_util.tree_leaves``
    of a cache lists the same arrays as `arrays`, in C++: a caller that flattens the
    cache anyway saves `arrays`' Python walk over the views)."""
    first = pool[0].sharding if pool and isinstance(pool[0], jax.Array) else None
    if first is None or len(first.device_set) != 1 or next(iter(first.device_set)).platform != "cpu":  # type: ignore[attr-defined]  # jax's Device stubs lack platform
        return False
    # The same sharding (one CPU device) for every array, each row-major.
    return all(isinstance(a, jax.Array) and (a.sharding is first or a.sharding == first) and
               (a.ndim <= 1 or _row_major_fast(a)) for a in pool)


def writable(leaf: jax.Array) -> np.ndarray:
    """The buffer of ``leaf`` (host memory, held by this caller alone) as a writable flat
    uint8 array; a plain pointer, so no reference that a later donation sees."""
    return _at(leaf.unsafe_buffer_pointer(), leaf.nbytes, np.dtype(np.uint8))


def _at(address: int, nbytes: int, dtype: np.dtype) -> np.ndarray:
    """The ``nbytes`` at ``address`` as a flat writable array of ``dtype``, through ctypes:
    numpy holds no reference to the jax array, which a donation would see."""
    raw = (ctypes.c_char * nbytes).from_address(address)
    out: np.ndarray = np.frombuffer(memoryview(raw).cast("B"), dtype)
    return out


_VIEWS: dict[tuple[int, tuple[int, ...], np.dtype], np.ndarray] = {}
"""`pointer_view`'s arrays per buffer address, shape and dtype."""


def pointer_view(leaf: jax.Array, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """`writable` of ``leaf`` (a plain pointer, no reference a donation sees) as an
    array of its ``shape`` and ``dtype`` (the caller's record of them: reading them off
    the jax array costs more than the view), kept per buffer address: a pool donated
    step after step keeps its buffers, so a move finds its views made (~0.6-0.9 us
    against ~5-7 us for `writable` and ~8.5 us for ``np.asarray`` of a 2 MiB bfloat16
    page leaf, measured alone; a miss costs about a `writable`). A view is
    only ever looked up by the address of a live array of that shape and dtype, so it
    never outlives what it shows. The same rules as `writable`: read it once the steps
    writing ``leaf`` have run; write it only while holding ``leaf`` alone."""
    at = leaf.unsafe_buffer_pointer()
    key = (at, shape, dtype)
    view = _VIEWS.get(key)
    if view is None:
        if len(_VIEWS) > 1024:  # pools come and go in a long process: forget the old addresses
            _VIEWS.clear()
        count = 1
        for n in shape:
            count *= n
        view = _VIEWS[key] = _at(at, count * dtype.itemsize, dtype).reshape(shape)  # from what is known
    return view


__all__ = ["arrays", "host_memory", "in_host_memory", "pointer_view", "writable"]
