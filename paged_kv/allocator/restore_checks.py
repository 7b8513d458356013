"""Cross-field checks of a restored allocator: every invariant that ties one saved array
to another, checked before `KVCacheManager.from_state` returns anything.

Why a restore needs more than digests and ``check_integrity``: a checkpoint's digests
only catch accidents -- a buggy writer or an edited file carries valid digests -- and
``check_integrity`` was written to catch the manager's own bugs, not to read untrusted
arrays. Edits that passed it loaded a manager that later handed out block -1 (its
writes dropped), keyed blocks no step had written (a prefix hit then read a previous
tenant's bytes), or failed deep inside a later ``commit`` with an IndexError. Each
object's ``from_state`` checks its own arrays' dtypes and shapes (`saved_state.take`);
this module reads their public ``state()`` and checks how they fit together, with a
`CheckpointError` naming the array and the value.

What a restore checks (the README quotes this list):

* sequences: ids >= 0, each in its own row, and those rows are exactly the rows in use
  in every group, with the same lengths in every group;
* page tables: free rows are exactly the rows not in use, each once; unused rows are
  empty; a row in use holds ``ceil(kv_len / block_size)`` blocks (at most
  ``max_blocks_per_seq``), starts at block 0 in a full-attention group, names real
  blocks (``1 <= id < num_blocks``, none twice) where it holds blocks and the null
  block elsewhere; a block several rows hold sits at the same logical position in each
  (forks and prefix hits never move a block);
* block pools: ref counts are the number of table entries naming each block; the free
  stack's live part holds distinct, real, unowned, uncached blocks, and free + held +
  cached blocks are all the usable blocks;
* prefix caches: the null block carries no key, keys are distinct and nonzero, a
  parent key only with a key, each eviction tier lists distinct cached unowned blocks,
  the tiers do not overlap, counters are >= 0; a block a row holds carries a key only
  below the row's keyed end (it was written);
* written blocks: per row ``0 <= keyed * block_size <= written <= kv_len``, hash
  chains of at most ``max_blocks_per_seq`` nonzero keys and keyed <= chain length.
  A chain may be longer than the row's blocks: a chunked prefill keeps its whole
  prompt's keys while it holds one chunk.

`KVCacheManager.check_integrity` then runs as the last guard.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from paged_kv.allocator.prefix_cache import NO_HASH, from_u128
from paged_kv.errors import CheckpointError
from paged_kv.spec import NULL_BLOCK

if TYPE_CHECKING:
    from paged_kv.allocator.groups import GroupAllocator
    from paged_kv.allocator.manager_base import ManagerBase
    from paged_kv.allocator.written import WrittenBlocks
    from paged_kv.spec import CacheSpec


def _refuse(condition: object, message: str) -> None:
    if condition:
        raise CheckpointError(message)


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def check_restored(manager: ManagerBase) -> None:
    """`CheckpointError` naming the first cross-field invariant ``manager`` breaks
    (see the module docstring); returns None for a state a manager could have reached."""
    rows = _check_sequences(manager._rows)
    checked: list[tuple[GroupAllocator, dict[str, np.ndarray], np.ndarray, np.ndarray]] = []
    for g in manager.groups:  # tables and pools first: the later checks index by their values
        table = g.table.state()
        name = f"group{g.index}"
        held = _check_table(name, g, table, rows)
        lengths = checked[0][1]["kv_lens"] if checked else table["kv_lens"]
        _refuse(not np.array_equal(table["kv_lens"], lengths),
                f"{name}.table.kv_lens differ from group0's at rows "
                f"{np.flatnonzero(table['kv_lens'] != lengths).tolist()[:8]}; every group holds the same tokens")
        checked.append((g, table, *_check_pool(name, g, held)))
    if manager.prefix_cache is not None:
        _check_written(manager._written, checked[0][1]["kv_lens"], manager.spec)
        for g, table, refs, free in checked:
            _check_cache(f"group{g.index}", g, refs, free, table, manager._written)


def _check_sequences(seq_rows: dict[int, int]) -> np.ndarray:
    """The rows of the admitted sequences, sorted; ids >= 0 and one row each."""
    bad = [s for s in seq_rows if s < 0]
    _refuse(bad, f"manager.rows holds sequence ids {bad[:8]}; sequence ids are >= 0")
    rows = np.array(sorted(seq_rows.values()), np.int64)
    twice = rows[1:][rows[1:] == rows[:-1]]
    _refuse(twice.size, f"manager.rows puts several sequences in rows {twice.tolist()[:8]}")
    return rows


def _check_table(name: str, g: GroupAllocator, t: dict[str, np.ndarray], rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Check one group's page table; returns the held entries as (rows, columns, block ids)."""
    tables, kv, nblocks, first, in_use = (t[k] for k in ("block_tables", "kv_lens", "num_blocks", "first_block",
                                                         "in_use"))
    capacity, width = tables.shape
    bs, nb = g.block_size, g.pool.num_blocks
    _refuse(rows.size and rows[-1] >= capacity, f"manager.rows points at row {rows[-1] if rows.size else 0} "
                                                f"outside {name}'s {capacity} rows")
    used = np.flatnonzero(in_use)
    _refuse(not np.array_equal(used, rows), f"{name}.table.in_use marks rows {used.tolist()[:8]} in use; the "
                                            f"admitted sequences hold rows {rows.tolist()[:8]}")
    free = np.sort(t["free_rows"])
    _refuse(not np.array_equal(free, np.flatnonzero(~in_use)),
            f"{name}.table.free_rows must list each row not in use exactly once")
    idle = ~in_use
    _refuse(np.any(idle & ((kv != 0) | (nblocks != 0) | (first != 0))) or np.any(tables[idle] != NULL_BLOCK),
            f"{name}.table: rows not in use must be empty (no length, no blocks)")
    _refuse(np.any(kv < 0) or np.any(kv > width * bs),
            f"{name}.table.kv_lens must lie in [0, {width * bs}] (max_blocks_per_seq * block_size)")
    bad = nblocks != -(-kv.astype(np.int64) // bs)
    _refuse(np.any(bad), f"{name}.table: row {_first(bad) if bad.any() else 0} holds "
                         f"{nblocks[bad][:1].tolist()} blocks for {kv[bad][:1].tolist()} tokens of {bs} per block")
    _refuse(np.any((first < 0) | (first > nblocks)), f"{name}.table.first_block must lie in [0, num_blocks] of its row")
    _refuse(not g.local and np.any(first != 0), f"{name}.table.first_block: a {g.kind} group never drops blocks")
    cols = np.arange(width)
    mask = (cols[None, :] >= first[:, None]) & (cols[None, :] < nblocks[:, None])
    ids = tables[mask]
    _refuse(np.any((ids < 1) | (ids >= nb)), f"{name}.table.block_tables: held entries must name blocks in "
                                             f"[1, {nb}); found {ids[(ids < 1) | (ids >= nb)][:8].tolist()}")
    _refuse(np.any(tables[~mask] != NULL_BLOCK), f"{name}.table.block_tables: entries a row does not hold must be "
                                                 f"the null block")
    held_rows, held_cols = np.nonzero(mask)
    _check_sharing(name, held_rows, held_cols, ids, nb)
    return held_rows, held_cols, ids


def _check_sharing(name: str, rows: np.ndarray, cols: np.ndarray, ids: np.ndarray, nb: int) -> None:
    """A block appears once per row, and at one logical position in every row."""
    if not ids.size:
        return
    pairs = np.unique(np.stack([rows.astype(np.int64), ids.astype(np.int64)]), axis=1)
    _refuse(pairs.shape[1] != ids.size, f"{name}.table.block_tables: a row names the same block twice")
    low, high = np.full(nb, np.iinfo(np.int64).max), np.full(nb, -1)
    np.minimum.at(low, ids, cols)
    np.maximum.at(high, ids, cols)
    moved = (high >= 0) & (low != high)
    _refuse(moved.any(), f"{name}.table.block_tables: block {_first(moved) if moved.any() else 0} sits at different "
                         f"logical positions in different rows (forks and prefix hits never move a block)")


def _check_pool(name: str, g: GroupAllocator, held: tuple[np.ndarray, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Check one group's pool against the table's held blocks; returns the ref counts
    and the free blocks."""
    p = g.pool.state()
    refs, stack, top, nb = p["ref_counts"], p["free_stack"], int(p["num_free"]), g.pool.num_blocks
    _refuse(refs[NULL_BLOCK] != 0 or p["generation"][NULL_BLOCK] != 0,
            f"{name}.pool: the null block has owners or a generation")
    want = np.bincount(held[2], minlength=nb)
    bad = want != refs
    _refuse(bad.any(), f"{name}.pool.ref_counts: block {_first(bad) if bad.any() else 0} has ref count "
                       f"{refs[bad][:1].tolist()} but {want[bad][:1].tolist()} table entries")
    free = stack[:top]
    outside = (free < 1) | (free >= nb)
    _refuse(outside.any(), f"{name}.pool.free_stack holds {free[outside][:8].tolist()} below num_free={top}; "
                           f"free blocks are ids in [1, {nb})")
    _refuse(np.unique(free).size != free.size, f"{name}.pool.free_stack holds a block twice")
    _refuse(np.any(refs[free] != 0), f"{name}.pool.free_stack holds blocks {free[refs[free] != 0][:8].tolist()} "
                                     f"that rows hold")
    cached = 0 if g.cache is None else g.cache.num_evictable
    _refuse(np.count_nonzero(refs) + top + cached != nb - 1,
            f"{name}.pool: {np.count_nonzero(refs)} held + {top} free + {cached} cached blocks != the {nb - 1} usable "
            f"ones; a block would be lost or handed out twice")
    return refs, free


def _check_cache(name: str, g: GroupAllocator, refs: np.ndarray, free: np.ndarray, table: dict[str, np.ndarray],
                 written: WrittenBlocks) -> None:
    """Check one group's prefix cache against the pool and the rows' keyed ends."""
    c = g.cache.state()  # type: ignore[union-attr]  # checked with the prefix cache on
    hashes, parents = np.array(from_u128(c["hash"]), object), np.array(from_u128(c["parent"]), object)
    keyed = hashes != NO_HASH
    _refuse(keyed[NULL_BLOCK], f"{name}.prefix.hash: the null block carries a key")
    _refuse(np.any(~keyed & (parents != NO_HASH)), f"{name}.prefix.parent: a block without a key has a parent key")
    _refuse(len(set(hashes[keyed].tolist())) != int(keyed.sum()), f"{name}.prefix.hash: two blocks carry one key")
    evictable, behind = np.asarray(c["evictable"], np.int64), np.asarray(c["behind"], np.int64)
    tiers = np.concatenate([evictable, behind])
    _refuse(np.unique(tiers).size != tiers.size, f"{name}.prefix.evictable/behind list a block twice")
    _refuse(np.any(refs[tiers] != 0) or not np.all(keyed[tiers]),
            f"{name}.prefix.evictable/behind: evictable blocks must carry a key and have no owner")
    lost = keyed & (refs == 0)
    lost[tiers] = False
    _refuse(lost.any(), f"{name}.prefix.hash: block {_first(lost) if lost.any() else 0} carries a key, has no owner "
                        f"and is in no eviction tier")
    _refuse(np.any(c["stats"] < 0), f"{name}.prefix.stats: counters are >= 0")
    _refuse(np.any(keyed[free]), f"{name}.pool.free_stack holds blocks that still carry a cache key")
    # A held block with a key was written: it lies below its row's keyed end.
    tables, first, nblocks = table["block_tables"], table["first_block"], table["num_blocks"]
    for row in np.flatnonzero(table["in_use"]).tolist():
        end = written.keyed_end(row)
        cols = np.arange(max(int(first[row]), end), int(nblocks[row]))
        late = cols[keyed[tables[row, cols]]] if cols.size else cols
        _refuse(late.size, f"{name}.prefix.hash: row {row}'s block at position {late[:1].tolist()} carries a key "
                           f"past the row's keyed end ({end} blocks): a prefix hit would read unwritten bytes")


def _check_written(written: WrittenBlocks, kv_lens: np.ndarray, spec: CacheSpec) -> None:
    """Per row: ``0 <= keyed * block_size <= written <= kv_len``; chains of nonzero keys,
    no longer than ``max_blocks_per_seq``, at least ``keyed`` long."""
    bs, limit = spec.block_size, spec.max_blocks_per_seq
    for row in sorted(set(written.written) | set(written.keyed) | set(written.hashes)):
        n, k, chain = written.written.get(row, 0), written.keyed.get(row, 0), written.hashes.get(row, ())
        kv = int(kv_lens[row])
        _refuse(not 0 <= n <= kv, f"written.lengths: row {row} has {n} tokens written but holds {kv}")
        _refuse(not 0 <= k * bs <= n, f"written.keyed: row {row} has {k} blocks keyed, {n} tokens written "
                                      f"(keyed blocks are written ones, {bs} tokens each)")
        _refuse(len(chain) > limit, f"written.hash_index: row {row}'s chain has {len(chain)} keys > "
                                    f"max_blocks_per_seq={limit}")
        _refuse(k > len(chain), f"written.keyed: row {row} has {k} blocks keyed but a chain of {len(chain)}")
        _refuse(NO_HASH in chain, f"written.hash_value: row {row}'s chain holds the no-key value 0")


__all__ = ["check_restored"]
