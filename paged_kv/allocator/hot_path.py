"""Hot paths of `KVCacheManager`: the common append (every sequence of a step grows by
the same few tokens, nothing forked, full-attention groups only) and the fill of a
freshly admitted row.

The general path plans per group with numpy over the whole batch (trims, copy-on-
write, ragged counts): ~20 numpy calls, tens of µs even for one sequence. Here a
small batch is grown element by element in Python and a large one with a handful
of vectorized calls. Anything unusual -- a bad id, a duplicate, a sequence too long,
too few free blocks, a sliding or chunked group, a fork -- returns ``None`` before changing
anything, and the general path runs instead (and raises the typed error).

Per-group state: the vector path grows each group's pool and page table in a loop
over groups, so a manager split into one class per layer kind keeps its shape; the
small path serves the one-group case (no sliding layers), the one that is hot.
"""

from __future__ import annotations

from operator import is_

import numpy as np

SMALL_APPEND = 20
"""Up to this many sequences the append runs per element in Python."""
MAX_TOKENS = 4
"""Tokens per sequence the fast path takes (decode, short speculative drafts)."""


def plain(m) -> bool:
    """No fork, no pending copy-on-write copy, no sliding or chunked group: appends and
    steps touch nothing but lengths, new blocks and slots (a local-attention group also
    returns blocks and starts its tables past them)."""
    spec = m.spec
    return not m._forked and spec.sliding_window is None and spec.attention_chunk_size is None and not len(m._copies[0])


def same_ids(ids: list, last: list | None) -> bool:
    """``ids`` names exactly the sequences ``last`` named, element for element.

    ``==`` alone is not enough: ``[True] == [1]`` (and ``1.0 == 1``), and an alias
    must reach the general path's typed error, never act on sequence 1. The same
    int objects (a scheduler reusing its ids) pass by identity; otherwise every
    element must be a plain int.
    """
    return (
        last is not None
        and ids == last
        and (all(map(is_, ids, last)) or set(map(type, ids)) <= {int})
    )


def _uniform_count(counts, n: int) -> int | None:
    """The one count a per-sequence integer array repeats (a simulator's decode step
    passes ``[1] * n`` as an array), else None."""
    if not isinstance(counts, np.ndarray) or counts.shape != (n,) or counts.dtype.kind not in "iu" or not n:
        return None
    first = counts.item(0)
    return None if np.count_nonzero(counts != first) else int(first)


def fast_append(m, seq_ids, num_tokens):
    """Grow each of ``seq_ids`` by ``num_tokens`` like `KVCacheManager.append`, or
    return None (changing nothing) when this case is not the common one."""
    if type(seq_ids) is not list:
        return None
    if type(num_tokens) is not int:
        num_tokens = _uniform_count(num_tokens, len(seq_ids))
    if num_tokens is None or not 0 < num_tokens <= MAX_TOKENS:
        return None
    if not seq_ids or not plain(m):
        return None
    rows_of = m._rows
    try:
        rows = [rows_of[s] for s in seq_ids]
    except (KeyError, TypeError):
        return None
    for s in seq_ids:
        if type(s) is not int:
            return None  # bool/float ids alias an int, numpy ids: the general path sorts them out
    if len(rows) > 1 and len(set(rows)) != len(rows):
        return None  # duplicates: the general path names them
    if len(rows) <= SMALL_APPEND:
        return _small_decode(m, rows) if num_tokens == 1 else _small(m, rows, num_tokens)
    return _vector(m, np.array(rows, dtype=np.int64), num_tokens)


def _small_decode(m, rows: list):
    """One token each, element by element: a row takes a block when its length is a
    block multiple. Blocks go to rows in the order given, as in the general path."""
    spec = m.spec
    bs, limit = spec.block_size, spec.max_seq_len
    (g,) = m.groups  # no sliding layers: one full-attention group
    t = g.table
    kv, bt, nbl = t.kv_lens, t.block_tables, t.num_blocks
    old = [kv.item(r) for r in rows]
    need = 0
    for o in old:
        if o >= limit:
            return None
        if o % bs == 0:
            need += 1
    if need:
        ids = g.pool.take(need)
        if ids is None:  # too few free blocks (or only cached ones left): the general path evicts or raises
            return None
        k = 0
    t.version += 1  # rows in use change: a cached batch layout is stale
    out = []
    for r, o in zip(rows, old):
        kv[r] = o + 1
        off = o % bs
        if off:
            out.append(bt.item(r, o // bs) * bs + off)
        else:
            b = ids[k]
            k += 1
            bt[r, o // bs] = b
            nbl[r] = o // bs + 1
            out.append(b * bs)
    return np.array([out], dtype=np.int32)


def _small(m, rows: list, n: int):
    spec = m.spec
    bs, cap = spec.block_size, spec.max_blocks_per_seq
    (g,) = m.groups  # no sliding layers: one full-attention group
    t = g.table
    kv, bt, nbl = t.kv_lens, t.block_tables, t.num_blocks
    old = [int(kv[r]) for r in rows]
    need = 0
    for o in old:
        after = (o + n + bs - 1) // bs
        if after > cap:
            return None
        need += after - (o + bs - 1) // bs
    if need:
        if need > g.pool.num_free:
            return None
        ids = g.pool.allocate(need).tolist()
    t.version += 1
    out = []
    for r, o in zip(rows, old):
        kv[r] = o + n
        before, after = (o + bs - 1) // bs, (o + n + bs - 1) // bs
        if after != before:
            bt[r, before:after] = ids[:after - before]
            del ids[:after - before]
            nbl[r] = after
        for p in range(o, o + n):
            out.append(int(bt[r, p // bs]) * bs + p % bs)
    return np.array([out], dtype=np.int32)


def _vector(m, rows: np.ndarray, n: int):
    if n == 1:
        return _vector_decode(m, rows)
    spec = m.spec
    bs = spec.block_size
    old = m.groups[0].table.kv_lens[rows].astype(np.int64)
    if -(-(int(old.max()) + n) // bs) > spec.max_blocks_per_seq:
        return None
    before, after = -(-old // bs), -(-(old + n) // bs)
    new = after - before  # 0 or 1 for n <= block_size; MAX_TOKENS keeps it small
    need = int(new.sum())
    if need and any(need > g.pool.num_free for g in m.groups):
        return None
    grew = np.flatnonzero(new)
    pos = (old[:, None] + np.arange(n)[None, :]).ravel() if n > 1 else old
    tok_rows = np.repeat(rows, n) if n > 1 else rows
    slots = np.empty((len(m.groups), pos.size), dtype=np.int32)
    for i, g in enumerate(m.groups):
        t = g.table
        t.version += 1
        if need:
            ids = g.pool.allocate(need)
            if int(new.max()) == 1:
                t.block_tables[rows[grew], before[grew]] = ids
            else:  # n > block_size is excluded, but a row may still cross two boundaries
                r_idx = np.repeat(rows[grew], new[grew])
                c_idx = np.repeat(before[grew], new[grew]) + (
                    np.arange(need) - np.repeat(np.cumsum(new[grew]) - new[grew], new[grew]))
                t.block_tables[r_idx, c_idx] = ids
            t.num_blocks[rows[grew]] = after[grew]
        t.kv_lens[rows] = old + n
        slots[i] = t.block_tables[tok_rows, pos // bs] * bs + pos % bs
    return slots


def _vector_decode(m, rows: np.ndarray):
    """One token each: a row needs a block exactly when its length is a block multiple."""
    spec = m.spec
    bs = spec.block_size
    old = m.groups[0].table.kv_lens[rows]
    if int(old.max()) >= spec.max_seq_len:
        return None
    col, off = np.divmod(old, bs)
    grew = np.flatnonzero(off == 0)
    if grew.size and any(grew.size > g.pool.num_free for g in m.groups):
        return None
    slots = np.empty((len(m.groups), rows.size), dtype=np.int32)
    for i, g in enumerate(m.groups):
        t = g.table
        t.version += 1
        if grew.size:
            at = rows[grew]
            t.block_tables[at, col[grew]] = g.pool.allocate(grew.size)
            t.num_blocks[at] += 1
        t.kv_lens[rows] = old + 1
        slots[i] = t.block_tables[rows, col] * bs + off
    return slots


def fill_new_row(m, row: int, n: int, blocks: int) -> np.ndarray:
    """Give a new (validated, empty) row ``blocks`` fresh blocks per group holding ``n``
    tokens; returns their slots ``[num_groups, n]``. What `_plan` + `_grow` do for a
    row that holds nothing yet -- no trim, no copy-on-write -- without their batch
    machinery, so an admit costs a few µs."""
    bs = m.spec.block_size
    slots = np.empty((len(m.groups), n), dtype=np.int32)
    offsets = np.arange(bs, dtype=np.int32)
    for i, g in enumerate(m.groups):
        ids = g.pool.allocate(blocks)
        t = g.table
        t.block_tables[row, :blocks] = ids
        t.kv_lens[row] = n
        t.num_blocks[row] = blocks
        slots[i] = (ids[:, None] * bs + offsets).ravel()[:n]
    return slots


def fast_admit(m, seq_id, n):
    """`KVCacheManager.admit` of a new sequence into a manager with one full-attention
    group and no prefix cache, in a few numpy calls; None (nothing changed) for
    anything else -- a bad or taken id, a bad count, too long, too few free blocks --
    and the general path raises the typed error."""
    if type(seq_id) is not int or type(n) is not int or seq_id < 0 or n < 1 or seq_id in m._rows:
        return None
    groups = m.groups
    if len(groups) != 1:
        return None
    g = groups[0]
    pool, t, bs = g.pool, g.table, g.block_size
    blocks = (n + bs - 1) // bs
    if blocks > t.max_blocks_per_seq or pool.cache is not None or not 0 < blocks <= pool.num_free:
        return None
    row = t.add_row()
    m._rows[seq_id] = row
    ids = pool.allocate(blocks)
    t.block_tables[row, :blocks] = ids
    t.kv_lens[row] = n
    t.num_blocks[row] = blocks
    # [blocks, bs] slots, flattened: a view of one fresh array, no second copy.
    return (ids[:, None] * bs + g.offsets).reshape(1, -1)[:, :n]


def fast_release(m, seq_id) -> int | None:
    """`KVCacheManager.release` when no block can be shared -- one full-attention group,
    never forked, no prefix cache, no copy pending -- so every block of the row has
    exactly one owner and goes straight back to the free list; None (nothing changed)
    otherwise, or for an id that is not a plain admitted int or sits in a decode slot."""
    if type(seq_id) is not int or m._forked or len(m.groups) != 1 or (m._slotted and seq_id in m._slotted):
        return None
    g = m.groups[0]
    if g.pool.cache is not None or len(m._copies[0]):
        return None
    row = m._rows.pop(seq_id, None)
    if row is None:
        return None
    m._described.pop(row, None)
    blocks = g.table.remove_row(row)
    g.pool.free_unshared(blocks)
    return int(blocks.size)


def nothing_to_commit(m, seq_ids) -> bool:
    """True when `commit(seq_ids)` has nothing to do -- no copy pending in any group, no
    prefix cache -- and every id is a plain int the manager holds (anything else:
    False, and the full commit raises the typed error)."""
    if m.prefix_cache is not None or type(seq_ids) is not list:
        return False
    for copies in m._copies:
        if len(copies):
            return False
    rows_of = m._rows
    for s in seq_ids:
        if type(s) is not int or s not in rows_of:
            return False
    return True


__all__ = ["MAX_TOKENS", "fast_admit", "fast_release", "fill_new_row", "nothing_to_commit", "same_ids", "SMALL_APPEND", "fast_append", "plain"]
