"""Pages through a shared-memory ring (`paged_kv.transfer.shm`): which rows of which
page array each chunk carries (`plan`), the sender's copy of a chunk from its pool
read in place (`Source`), the receiver's copy of a chunk into its pool written in
place (`Sink`). Two copies in all, and the sender's copy of chunk i+1 overlaps the
receiver's copy of chunk i (two processes, two cores).

The byte stream: layer by layer, page array by page array (`leaves_of`'s order),
the rows of the group's blocks in the sequence's order -- one row is one block of
one page array, ``block_size`` slots. A chunk packs whole rows, at most one slot of
the ring; each side computes the same plan from its own spec and the admitted block
counts, so nothing in a message says where bytes go.

Both pools must be host memory (`paged_kv.host_pool.host_memory`: a CPU device, row-major), where a
page array's buffer is its rows as numpy lays them out. As `gather_sequence` does,
the sender zeroes every slot at or past the sequence's length (the last block's
tail: its previous owner's bytes never leave) and sends zeros for pages that serve
another manager; as `write_sequence` does, the receiver stamps each block's
generation and writes nothing into pages of another manager.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial

import attrs
import jax
import numpy as np

from paged_kv.host_pool import arrays as pool_arrays, writable
from paged_kv.allocator.manager import KVCacheManager
from paged_kv.binding import bind_blocks
from paged_kv.cache import PagedKVCache
from paged_kv.sequence_pages import padded_ids


@attrs.frozen
class Piece:
    """Rows ``start:stop`` (of the group's blocks, in the sequence's order) of page array
    ``leaf`` of layer ``layer``, at byte ``offset`` of the chunk's slot."""

    layer: int
    leaf: int
    start: int
    stop: int
    offset: int


@attrs.frozen
class Plan:
    chunks: tuple[tuple[Piece, ...], ...]
    sizes: tuple[int, ...]
    """Bytes of each chunk."""
    row_bytes: tuple[tuple[int, ...], ...]
    """Per layer, per page array: bytes of one block's row."""

    @property
    def nbytes(self) -> int:
        return sum(self.sizes)


def row_bytes(cache: PagedKVCache) -> tuple[tuple[int, ...], ...]:
    """Per layer, per page array: the bytes of one block (its row)."""
    return tuple(tuple(math.prod(leaf.shape[1:]) * np.dtype(leaf.dtype).itemsize
                       for leaf in jax.tree_util.tree_leaves(view.pages())) for view in cache.views)


def plan(cache: PagedKVCache, counts: tuple[int, ...], slot_bytes: int) -> Plan:
    """The chunks of a sequence of ``counts`` blocks per group, through slots of
    ``slot_bytes`` (`ValueError` if a row is larger than a slot)."""
    rows = row_bytes(cache)
    chunks: list[tuple[Piece, ...]] = []
    sizes: list[int] = []
    current: list[Piece] = []
    used = 0
    for layer, view in enumerate(cache.views):
        n = counts[view.group]
        for leaf, r in enumerate(rows[layer]):
            if r > slot_bytes:
                raise ValueError(f"a block of layer {layer} is {r} bytes, over a ring slot of {slot_bytes}")
            start = 0
            while start < n:
                take = min(n - start, (slot_bytes - used) // r)
                if take == 0:
                    chunks.append(tuple(current))
                    sizes.append(used)
                    current, used = [], 0
                    continue
                current.append(Piece(layer, leaf, start, start + take, used))
                used += take * r
                start += take
    if current:
        chunks.append(tuple(current))
        sizes.append(used)
    return Plan(tuple(chunks), tuple(sizes), rows)


def _rows(a: np.ndarray, r: int) -> np.ndarray:
    return a.reshape(-1).view(np.uint8).reshape(a.shape[0], r)


class Source:
    """The sender's pool, read in place: numpy views of its page arrays (no copy on a
    CPU device). Every step that writes the pool has run first (waited for). Drop it
    before the cache is donated again (a live view makes the donation copy)."""

    def __init__(self, cache: PagedKVCache, p: Plan, blocks: tuple[np.ndarray, ...], first_blocks: tuple[int, ...],
                 num_tokens: int, tag: np.ndarray) -> None:
        jax.block_until_ready(pool_arrays(cache))  # type: ignore[no-untyped-call]  # jax: unannotated
        self.plan = p
        self.groups = [view.group for view in cache.views]
        self.ids = [np.asarray(b, np.intp) for b in blocks]
        bs = cache.views[0].spec.block_size
        # Live slots of each group's last block; the rest of it is zeroed in the ring.
        self.tail = [min(bs, max(0, num_tokens - (f + b.size - 1) * bs)) for f, b in zip(first_blocks, blocks)]
        self.block_size = bs
        self.rows: list[list[np.ndarray | None]] = []
        for view, rs in zip(cache.views, p.row_bytes):
            mine = int(np.asarray(view.owner)) == int(tag)
            self.rows.append([_rows(np.asarray(leaf), r) if mine else None
                              for leaf, r in zip(jax.tree_util.tree_leaves(view.pages()), rs)])

    def fill(self, index: int, slot: memoryview) -> int:
        """Copy chunk ``index`` into ``slot``; returns its bytes."""
        out = np.frombuffer(slot, np.uint8)
        for p in self.plan.chunks[index]:
            r = self.plan.row_bytes[p.layer][p.leaf]
            dst = out[p.offset: p.offset + (p.stop - p.start) * r].reshape(-1, r)
            src = self.rows[p.layer][p.leaf]
            if src is None:  # pages of another manager: zeros, as a gather reads them
                dst[...] = 0
                continue
            g = self.groups[p.layer]
            np.take(src, self.ids[g][p.start: p.stop], axis=0, out=dst, mode="clip")  # ids: the manager's own
            if p.stop == self.ids[g].size and self.tail[g] < self.block_size:
                dst[-1].reshape(self.block_size, -1)[self.tail[g]:] = 0
        return self.plan.sizes[index]


@partial(jax.jit, donate_argnums=0)
def own(cache: PagedKVCache, ids: tuple[jax.Array, ...], gens: tuple[np.ndarray, ...], tag: jax.Array) -> PagedKVCache:
    """Stamp blocks ``ids[group]`` (past the pool: nothing) with ``gens[group]``, as
    `write_sequence` does, the pages passed through: donated, so the same buffers, then
    held by this caller alone (a donation waits for every program that reads them)."""
    views = []
    for view in cache.views:
        _, generations, owner = bind_blocks(view.generations, view.owner, tag, ids[view.group], gens[view.group])  # type: ignore[arg-type]  # a cache's views carry their binding arrays
        views.append(dataclasses.replace(view, generations=generations, owner=owner))
    return PagedKVCache(tuple(views))


def take_over(cache: PagedKVCache, manager: KVCacheManager, blocks: tuple[np.ndarray, ...], sizes: tuple[int, ...],
              stamp: bool) -> PagedKVCache:
    """``cache`` made this caller's alone (`own`), waited for; with ``stamp``, ``blocks``
    stamped with their generations in ``manager``'s pools (padded to ``sizes``: one
    compilation for both)."""
    past_pool = tuple(g.num_blocks for g in manager.spec.groups)
    ids = padded_ids(blocks if stamp else tuple(np.zeros(0, np.int32) for _ in blocks), past_pool, sizes)
    gens = tuple(g.pool.generations_of(i) for g, i in zip(manager.groups, ids))
    out: PagedKVCache = own(cache, tuple(jax.numpy.asarray(i) for i in ids), gens, manager.steps.tag)
    jax.block_until_ready(out)  # type: ignore[no-untyped-call]  # jax: unannotated
    return out


class Sink:
    """The receiver's pool (taken over: `take_over`), written in place. Valid until the
    cache leaves the caller's hands (a step may donate it); make a new one after."""

    def __init__(self, cache: PagedKVCache, p: Plan, blocks: tuple[np.ndarray, ...], tag: np.ndarray) -> None:
        self.plan = p
        self.groups = [view.group for view in cache.views]
        self.ids = [np.asarray(b, np.intp) for b in blocks]
        self.rows: list[list[np.ndarray | None]] = []
        for view, rs in zip(cache.views, p.row_bytes):
            mine = int(np.asarray(view.owner)) == int(tag)  # another manager's pages are not written
            self.rows.append([writable(leaf).reshape(leaf.shape[0], r) if mine else None
                              for leaf, r in zip(jax.tree_util.tree_leaves(view.pages()), rs)])

    def write(self, index: int, slot: memoryview) -> None:
        """Copy chunk ``index`` out of ``slot`` into the sequence's blocks."""
        src = np.frombuffer(slot, np.uint8)
        for p in self.plan.chunks[index]:
            dst = self.rows[p.layer][p.leaf]
            if dst is None:
                continue
            r = self.plan.row_bytes[p.layer][p.leaf]
            dst[self.ids[self.groups[p.layer]][p.start: p.stop]] = src[p.offset: p.offset + (p.stop - p.start) * r
                                                                       ].reshape(-1, r)


__all__ = ["Piece", "Plan", "Sink", "Source", "own", "plan", "row_bytes", "take_over"]
