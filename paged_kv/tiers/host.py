"""`HostTier`: one layer group's keyed pages in host memory.

Bookkeeping and bytes are separate: the index (key -> slot, each key's parent, the
eviction policy, pins) works alone, which is all the simulator needs; the bytes are
numpy buffers, one per layer of the group and page leaf (keys, values, quantized
scales: everything a page carries), ``[capacity, block_size, ...]`` in the pages'
storage dtype, made once when the device's leaves are first known (`movement.flush`
makes them before its first copy lands: a landing then never allocates). A slot is a
block's worth of every leaf of every layer of the group. Moves copy many slots at
once, each byte once: `read_rows` one `np.take` per leaf; `write_rows` (and
`movement`'s uploads into a pool in host memory) one slice copy per run of rows
consecutive on both sides (`row_runs`; a batch of blocks is mostly a few runs), a
Python loop over runs, not over blocks and leaves where the rows run together.

Pins: a key whose slot a move reads or writes (a download not finished, an upload
not dispatched) is never the victim of an eviction, so a slot never changes under a
move in flight.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable

import numpy as np

from paged_kv.tiers.copies import Copy, start
from paged_kv.tiers.policy import ARC, LRU, make_policy
from paged_kv.tiers.retention import Priorities, Ranked

Pages = list[list[np.ndarray]]
"""A page's bytes: per layer of the group, per leaf, ``[block_size, ...]``."""


class RowsOf:
    """Rows ``ids`` of ``pages`` (``[blocks, ...]``) seen as ``[len(ids), ...]`` without a
    copy: row ``i`` is ``pages[ids[i]]``. `HostTier.write_rows` copies them straight
    from ``pages`` into its slots (one copy); ``a[i]`` is a view of one row."""

    __slots__ = ("pages", "ids", "shape", "dtype")

    def __init__(self, pages: np.ndarray, ids: np.ndarray):
        self.pages, self.ids = pages, ids
        self.shape, self.dtype = (len(ids), *pages.shape[1:]), pages.dtype

    def __getitem__(self, i: int) -> np.ndarray:
        row: np.ndarray = self.pages[self.ids[i]]
        return row


def row_runs(dst_rows: np.ndarray, src_rows: np.ndarray) -> list[tuple[int, int, int, int]]:
    """``dst[dst_rows] = src[src_rows]`` as runs ``(dst_start, src_start, count, step)``:
    ``count`` rows consecutive upwards in ``dst``, and upwards (``step`` 1) or downwards
    (-1: a prefix evicted deepest block first) in ``src``. Sorted by ``dst`` first (stable:
    a row written twice keeps the last), so runs downwards on both sides are found too."""
    order = np.argsort(dst_rows, kind="stable")
    d, s = dst_rows[order].tolist(), src_rows[order].tolist()
    runs: list[tuple[int, int, int, int]] = []
    i, n = 0, len(d)
    while i < n:
        j, step = i + 1, 0
        if j < n and d[j] == d[i] + 1 and s[j] - s[i] in (1, -1):
            step = s[j] - s[i]
            while j < n and d[j] == d[j - 1] + 1 and s[j] - s[j - 1] == step:
                j += 1
        runs.append((d[i], s[i], j - i, step or 1))
        i = j
    return runs


def copy_rows(dst: np.ndarray, src: np.ndarray, runs: list[tuple[int, int, int, int]]) -> None:
    """Copy the `row_runs` of ``src`` into ``dst``, one slice copy per run (a memcpy
    per row at most; numpy's fancy index would gather into a temporary first: two
    copies)."""
    for d0, s0, k, step in runs:
        if step == 1:
            dst[d0: d0 + k] = src[s0: s0 + k]
        else:
            dst[d0: d0 + k] = src[s0 - k + 1: s0 + 1][::-1]


class HostTier:
    """Keys -> slots of a group's host buffers, with an eviction policy (module doc)."""

    medium = "host"

    def __init__(self, capacity: int, policy: str = "lru", keep_bytes: bool = True,
                 priorities: Priorities | None = None, copy_threads: int = 1):
        self.capacity = int(capacity)
        self.copy_threads = copy_threads  # threads that copy a batch of rows (`copies.copy_all`)
        base = make_policy(policy, self.capacity)
        # With priorities, lower ones go first whatever the policy says (`retention`).
        self.policy: LRU | ARC | Ranked = base if priorities is None else Ranked(base, priorities)
        self.slot_of: dict[int, int] = {}
        self.parent_of: dict[int, int] = {}
        self._free = list(range(self.capacity - 1, -1, -1))
        self.pins: Counter[int] = Counter()
        self.ready: set[int] = set()  # keys whose bytes are in their slot (a copy down may still be on its way)
        self.keep_bytes = keep_bytes
        self.buffers: Pages | None = None
        self._shapes: object = None  # the last shapes `ensure_buffers` accepted, the very object
        # Called with (key, parent, pages or None) for each key evicted to make room: the
        # tiers move it one level down (write-back) or drop it. Pages are a copy.
        self.on_evict: Callable[[int, int, Pages | None], None] | None = None

    def __contains__(self, key: object) -> bool:
        """Whether ``key`` is here with its bytes (a hit may use it)."""
        return key in self.ready

    def __len__(self) -> int:
        return len(self.slot_of)

    @property
    def nbytes(self) -> int:
        """Bytes of the host buffers (0 until the first page is stored, or without bytes)."""
        return sum(a.nbytes for layer in self.buffers for a in layer) if self.buffers else 0

    def ensure_buffers(self, shapes: list[list[tuple[tuple[int, ...], np.dtype]]]) -> None:
        """Make the buffers for page leaves of these ``(shape, dtype)`` (per layer, per leaf),
        once; `AssertionError` if a later page has other leaves."""
        if shapes is self._shapes:  # the pool's shapes of the last flush (`movement._Pool`): checked then
            return
        if self.buffers is None:
            # np.zeros maps zero pages lazily: the first landing in a slot pays the page
            # faults once, not every flush.
            self.buffers = [[np.zeros((self.capacity, *s), d) for s, d in layer] for layer in shapes]
            self._shapes = shapes
        else:
            have = [[(a.shape[1:], a.dtype) for a in layer] for layer in self.buffers]
            if have != [[(tuple(s), np.dtype(d)) for s, d in layer] for layer in shapes]:
                raise AssertionError(f"host tier pages are {have}; a page of {shapes} does not fit")
            self._shapes = shapes

    def insert(self, key: int, parent: int, ready: bool = False) -> int | None:
        """Give ``key`` a slot (evicting the policy's victim when full); None when every
        key is pinned or of a higher priority than ``key``. The slot's bytes are the caller's to `write` (``ready``: there
        are none to write, the simulator's case)."""
        if key in self.slot_of:
            self.policy.touch(key)
            return self.slot_of[key]
        if self.capacity == 0:
            return None
        if not self._free:
            victim = self.policy.victim(self.pins, key)
            if victim is None:
                return None
            pages = self.read(victim) if self.buffers is not None and victim in self.ready else None
            parent_v = self.parent_of[victim]
            self.policy.evicted(victim)
            self.ready.discard(victim)
            self._free.append(self.slot_of.pop(victim))
            del self.parent_of[victim]
            if self.on_evict is not None:
                self.on_evict(victim, parent_v, pages)
        slot = self._free.pop()
        self.slot_of[key] = slot
        self.parent_of[key] = parent
        self.policy.insert(key)
        if ready:
            self.ready.add(key)
        return slot

    def write(self, key: int, pages: Pages) -> None:
        """Store ``pages`` in ``key``'s slot."""
        slot = self.slot_of[key]
        assert self.buffers is not None
        for buf_layer, layer in zip(self.buffers, pages):
            for buf, a in zip(buf_layer, layer):
                buf[slot] = a
        self.ready.add(key)

    def write_rows(self, keys: list[int], pages: Pages, rows: np.ndarray | slice,
                   meanwhile: Callable[[], None] | None = None) -> None:
        """Store ``pages[layer][leaf][rows]`` (a batch of landed copies; `RowsOf`: rows
        of the pool itself, the same ``ids`` in every leaf) in the slots of ``keys``:
        ``rows`` a slice when the batch is whole, else an index array. One copy, a slice
        per run of rows (`row_runs`), started together (`copies.start`); ``meanwhile``
        runs while they are copied (with workers) or before (one thread)."""
        if not keys:
            return
        assert self.buffers is not None
        slots = np.fromiter((self.slot_of[k] for k in keys), np.intp, len(keys))
        index = np.arange(len(keys))[rows] if isinstance(rows, slice) else np.asarray(rows, np.intp)
        first = pages[0][0]
        runs = row_runs(slots, first.ids[index] if isinstance(first, RowsOf) else index)  # the same rows in every leaf
        copies: list[Copy] = []  # listed first, then copied in one go: no Python between the copies
        src = None
        for buf_layer, layer in zip(self.buffers, pages):
            for buf, a in zip(buf_layer, layer):
                src = a.pages if isinstance(a, RowsOf) else a
                copies.extend((buf, src, run) for run in runs)
        running = start(copies, self.copy_threads)
        del copies, src  # views of the pool (`RowsOf`): none outlives the copy
        try:
            if meanwhile is not None:
                meanwhile()
        finally:  # an error in between still waits: no worker writes a slot after this returns
            running.wait()
        self.ready.update(keys)

    def read_rows(self, keys: list[int], out: list[list[np.ndarray]]) -> None:
        """Copy the slots of ``keys`` into ``out[layer][leaf]`` (``[len(keys), ...]``
        each), one `np.take` per leaf straight into ``out`` (no temporary: mode="clip",
        the slots are in range; the default "raise" takes into a temporary first)."""
        assert self.buffers is not None
        slots = np.fromiter((self.slot_of[k] for k in keys), np.intp, len(keys))
        for buf_layer, out_layer in zip(self.buffers, out):
            for buf, o in zip(buf_layer, out_layer):
                np.take(buf, slots, axis=0, out=o, mode="clip")

    def read(self, key: int) -> Pages:
        """A copy of ``key``'s pages."""
        slot = self.slot_of[key]
        assert self.buffers is not None
        return [[buf[slot].copy() for buf in layer] for layer in self.buffers]

    def touch(self, key: int) -> None:
        """A hit on ``key``."""
        self.policy.touch(key)

    def remove(self, key: int) -> None:
        """Forget ``key`` (its bytes never arrived, or were refused)."""
        if key in self.slot_of:
            self.policy.remove(key)
            self._free.append(self.slot_of.pop(key))
            del self.parent_of[key]
            self.pins.pop(key, None)
            self.ready.discard(key)

    def pin(self, key: int) -> None:
        self.pins[key] += 1

    def unpin(self, key: int) -> None:
        self.unpin_all((key,))

    def unpin_all(self, keys: Iterable[int]) -> None:
        """`unpin` each of ``keys`` (a batch's, in one call: no method call per block)."""
        pins = self.pins
        for key in keys:
            left = pins[key] - 1
            if left > 0:
                pins[key] = left
            else:
                del pins[key]

    def check_integrity(self) -> None:
        """Raise AssertionError unless slots, policy and pins agree."""
        slots = list(self.slot_of.values())
        if len(set(slots)) != len(slots) or set(slots) & set(self._free):
            raise AssertionError("host tier: a slot is used twice or both used and free")
        if len(slots) + len(self._free) != self.capacity:
            raise AssertionError(f"host tier: {len(slots)} used + {len(self._free)} free != {self.capacity}")
        if set(self.policy.keys()) != set(self.slot_of) or len(self.policy) != len(self.slot_of):
            raise AssertionError("host tier: the policy's keys differ from the index")
        if set(self.parent_of) != set(self.slot_of):
            raise AssertionError("host tier: parents and slots name different keys")
        if not self.ready <= set(self.slot_of):
            raise AssertionError("host tier: a key is ready without a slot")
        if not set(self.pins) <= set(self.slot_of):
            raise AssertionError("host tier: a pinned key is not in the tier")


__all__ = ["HostTier", "Pages", "RowsOf", "copy_rows", "row_runs"]
