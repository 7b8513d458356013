"""`plain_step_metadata`: the step metadata of a plain manager, in fresh arrays.

A plain manager (`hot_path.plain`: one full-attention group, nothing forked, no copy
pending) needs none of the general path's per-group machinery, so its metadata is
built in O(B x W) gathers plus O(B x T) fills. `KVCacheManager.step_metadata` uses
it for the common case; `paged_kv.batch.StepBatch` shares its helpers.
"""

from __future__ import annotations

import numpy as np

from paged_kv.errors import PagedKVError
from paged_kv.metadata import GroupMetadata, StepMetadata

INT = {int}
EMPTY = np.zeros(0, dtype=np.int32)  # no copy-on-write copies: a plain layout has none


def run_slots(g, row: int, first: int, count: int) -> np.ndarray:
    """Flat slots of ``row``'s tokens ``first .. first + count`` in group ``g``: one slice
    of its blocks, each expanded to its ``block_size`` slots (a prefill row's run)."""
    bs = g.block_size
    blocks = g.table.block_tables[row, first // bs : (first + count - 1) // bs + 1].astype(np.int64)
    return (blocks[:, None] * bs + g.offsets).ravel()[first % bs : first % bs + count]


def bucket_int(n: int, cap: int) -> int:
    """`bucket` for counts already known to be ints (no argument checks: it runs every step)."""
    return min(1 << (max(n, 1) - 1).bit_length(), cap)


def plain_step_metadata(m, seq_ids, num_new_tokens) -> StepMetadata | None:
    """`KVCacheManager.step_metadata` of a plain manager (no copies, no local group), in
    fresh arrays, in O(B x W) gathers plus O(B x T) fills: the [B, T] arrays of a mixed
    prefill + decode step get their padding in one pass, decode rows are written
    vectorized and each prefill row as one contiguous run. None when the input is bad
    (the caller lets the general path raise the typed error)."""
    spec = m.spec
    picked = plain_picked(m, seq_ids, num_new_tokens)
    if picked is None:
        return None
    rows, q = picked
    n = rows.size
    (g,) = m.groups  # plain: full attention only, one group
    kv = g.table.kv_lens[rows]
    if n > spec.max_batch_slots or np.count_nonzero(q > kv):
        return None
    B = bucket_int(n, spec.max_batch_slots)
    T = bucket_int(int(q.max()) if n else 1, spec.max_seq_len)
    kv_lens, query_lens = np.zeros(B, dtype=np.int32), np.zeros(B, dtype=np.int32)
    kv_lens[:n], query_lens[:n] = kv, q
    positions = np.empty((B, T), dtype=np.int32)
    positions[:] = np.maximum(kv_lens - 1, 0)[:, None]  # padding sits at the last real position
    one = np.flatnonzero(q == 1)  # decode rows: one token each, vectorized
    many = np.flatnonzero(q > 1).tolist()  # prefill rows: a contiguous run each, row by row
    groups = (_build_group(m, g, rows, q, kv, one, many, B, T),)
    for b in many:
        first = int(kv[b]) - int(q[b])
        positions[b, : int(q[b])] = np.arange(first, int(kv[b]), dtype=np.int32)
    step = m.note_step(m.steps.next_id(), seq_ids, rows, kv)  # as step_metadata does (no copies are pending)
    return StepMetadata(kv_lens, query_lens, positions, groups, spec.pool_signature(), step, m.steps.tag)


def plain_picked(m, seq_ids, counts) -> tuple[np.ndarray, np.ndarray] | None:
    """The rows and counts of a step, validated (`_plain_rows_and_counts`, else the
    general check); None for bad input."""
    picked = _plain_rows_and_counts(m, seq_ids, counts)
    if picked is None:
        try:
            picked = m._rows_and_counts(seq_ids, counts)
        except PagedKVError:
            return None
    return picked


def _plain_rows_and_counts(m, seq_ids, counts) -> tuple[np.ndarray, np.ndarray] | None:
    """`KVCacheManager._rows_and_counts` for the shapes a serving loop passes -- a list
    of distinct admitted plain-int ids, an int count or a list of int counts -- with
    C-level checks instead of numpy sorting; None for anything else (the general
    check then runs and names the problem)."""
    if type(seq_ids) is not list or not set(map(type, seq_ids)) <= INT:
        return None
    rows_of = m._rows
    try:
        rows = [rows_of[s] for s in seq_ids]
    except KeyError:
        return None
    n = len(rows)
    if len(set(rows)) != n:
        return None
    if type(counts) is int:
        if not 0 <= counts < 2**31:
            return None
        return np.array(rows, dtype=np.int64), np.full(n, counts, dtype=np.int64)
    if type(counts) is not list or len(counts) != n or not set(map(type, counts)) <= INT:
        return None
    if n and not (0 <= min(counts) and max(counts) < 2**31):
        return None
    return np.array(rows, dtype=np.int64), np.array(counts, dtype=np.int64)


def _build_group(m, g, rows, q, kv, one, many: list, B: int, T: int) -> GroupMetadata:
    """The full-attention group's tables and slots for `plain_step_metadata`."""
    bs = m.spec.block_size
    t = g.table
    n = rows.size
    widest = int(t.num_blocks[rows].max()) if n else 0
    # Zeroed by calloc: a table's padding (past a row's blocks, padding rows) is never touched.
    tables = np.zeros((B, bucket_int(widest, m.spec.max_blocks_per_seq)), dtype=np.int32)
    tables[:n, :widest] = t.block_tables[rows, :widest]  # past a row's blocks: null already
    slots = np.full((B, T), g.pad_slot, dtype=np.int32)
    last = kv[one].astype(np.int64) - 1
    slots[one, 0] = t.block_tables[rows[one], last // bs] * bs + last % bs
    for b in many:
        qb = int(q[b])
        slots[b, :qb] = run_slots(g, int(rows[b]), int(kv[b]) - qb, qb)
    return GroupMetadata(tables, slots, np.zeros(B, dtype=np.int32), EMPTY, EMPTY, EMPTY, g.pool.generation[tables],
                         EMPTY, EMPTY)


__all__ = ["EMPTY", "INT", "bucket_int", "plain_picked", "plain_step_metadata", "run_slots"]
