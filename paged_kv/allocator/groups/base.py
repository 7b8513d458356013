"""`GroupAllocator`: the host state of one layer group, the allocator's unit of ownership.

A model's layers fall into groups by attention kind (`CacheSpec.groups`): full
attention, a sliding window, chunked local attention. Each group has its own pool of
blocks and its own page table, and a sequence has the same row in every group's table
(`KVCacheManager` adds and removes rows in lockstep), so one row index serves all
groups. A group object owns its `BlockPool` (and through it its `PrefixCache`), its
`PageTable` and its pending copy-on-write copies; it plans and applies growth, builds
its share of each step's metadata, checks its own integrity and saves its own state.
`KVCacheManager` is the coordinator that loops over groups.

What a kind decides, and nothing else (vLLM v1 has one manager subclass per
attention kind the same way, `single_type_kv_cache_manager.py`):

* `visible_from`: the first logical block a query at position ``p`` can still see
  (the block of `LayerGroup.first_visible`, the rule the device mask applies too).
  Blocks before it go back to the pool as the sequence grows (a trim), and step
  metadata starts the group's tables there.
* what a prefix hit of ``h`` blocks needs: the blocks from ``visible_from(h *
  block_size)`` to ``h`` -- exactly what the first query after the hit reads -- all
  cached in this group (`longest_hit`). Blocks before that are null in the row, as
  after a trim.

Everything else (growth, copy-on-write, metadata, integrity, state, and the
retention rule of `retire_behind`) follows from those two in this base class, so a
new kind is one subclass in one file.
"""

from __future__ import annotations

from collections.abc import Container
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from paged_kv.allocator.block_pool import BlockPool
from paged_kv.allocator.page_table import PageTable, expand_runs
from paged_kv.allocator.pending_copies import PendingCopies
from paged_kv.allocator.prefix_cache import NO_HASH, PrefixCache
from paged_kv.allocator.saved_state import check_captured, prefixed, scoped
from paged_kv.allocator.step_arrays import group_arrays
from paged_kv.errors import CheckpointError, InvalidTokenCountError, OutOfBlocksError
from paged_kv.metadata import GroupMetadata, bucket, pad_slot
from paged_kv.spec import NULL_BLOCK, CacheSpec, LayerGroup

if TYPE_CHECKING:
    from typing_extensions import Self

    from paged_kv.allocator.step_arrays import Out


class GrowthPlan(NamedTuple):
    """One group's share of a validated append: per row, the first logical block it keeps,
    its logical blocks after the append, the blocks it allocates, and whether its write
    first copies a shared partial block (copy-on-write)."""

    keep: np.ndarray
    new_blocks: np.ndarray
    needed: np.ndarray
    cow: np.ndarray


class GroupAllocator:
    """One layer group's pool, page table and pending copies (see the module docstring)."""

    kind = "abstract"
    local = False
    """Whether blocks behind a query's reach go back to the pool as a sequence grows."""
    SAVED_ATTRS = frozenset({"layer_group", "index", "block_size", "offsets", "pool", "table", "copies", "pad_slot"})
    """Attributes `state` covers: copies must be empty to save, the rest follows from the spec."""

    def __init__(self, spec: CacheSpec, index: int, prefix_cache: bool = False):
        self.layer_group = spec.groups[index]
        self.index = index
        self.block_size = spec.block_size
        self.offsets = np.arange(spec.block_size, dtype=np.int32)  # slot offsets inside a block (hot path)
        self.pool = BlockPool(self.layer_group.num_blocks, prefix_cache=prefix_cache)
        self.table = PageTable(spec.max_blocks_per_seq)
        # Copy-on-write copies of this group, carried by every step until committed.
        self.copies = PendingCopies()
        self.pad_slot = pad_slot(spec, index)

    # ---- the kind's rule ------------------------------------------------------------
    @classmethod
    def visible_from(cls, layer_group: LayerGroup, positions: Any, block_size: int) -> Any:
        """First logical block a query at ``positions`` (an int or an array) can see: the
        block holding `LayerGroup.first_visible` (the one rule the device mask uses too)."""
        return layer_group.first_visible(positions) // block_size

    def first_visible(self, positions: Any) -> Any:
        """`visible_from` for this group."""
        return self.visible_from(self.layer_group, positions, self.block_size)

    def keep_from(self, rows: np.ndarray, first_query: np.ndarray) -> np.ndarray:
        """First logical block any query at or after ``first_query`` can still see."""
        # int64 like ``first_query`` (no astype: this runs on every general append).
        keep: np.ndarray = np.maximum(self.first_visible(first_query), self.table.first_block[rows])
        return keep

    @property
    def cache(self) -> PrefixCache | None:
        """This group's prefix cache (keyed by the same chain hashes in every group), or None."""
        return self.pool.cache

    # ---- rows -------------------------------------------------------------------------
    def release_row(self, row: int, keyed_end: int = 0) -> int:
        """Forget ``row`` and drop its hold on its blocks; returns how many no row holds now.
        Tail first: a full group's cache then evicts a chain's tail before its parents.
        ``keyed_end``: blocks of the row's chain keyed (the retention rule, `retire_behind`)."""
        if keyed_end and self.local and self.cache is not None:
            first = int(self.table.first_block[row])
            blocks = self.table.remove_row(row)[::-1]
            behind = np.arange(first + blocks.size - 1, first - 1, -1) < self.hit_start(keyed_end)
            return int(self.pool.free_distinct(blocks, behind).size)
        return int(self.pool.free_distinct(self.table.remove_row(row)[::-1]).size)

    def fork_row(self, parent: int, child: int) -> None:
        """``child`` (a new row) shares every block ``parent`` holds."""
        self.table.copy_row(parent, child)
        self.pool.incref(self.table.blocks_of(child))
        if len(self.copies):
            self.copies.fork(parent, child)

    def fill_row(self, row: int, first: int, total: int, num_tokens: int) -> np.ndarray:
        """Fresh blocks for logical blocks ``[first, total)`` of a new row (a swap in); returns them."""
        ids = self.pool.allocate(total - first)
        self.table.fill_row(row, first, ids, num_tokens)
        return ids

    def copies_into(self, row: int) -> bool:
        """Whether a pending copy writes into one of ``row``'s blocks (its bytes are not there yet)."""
        return bool(len(self.copies)) and self.copies.touches(self.table.blocks_of(row))

    # ---- growth -----------------------------------------------------------------------
    def plan(self, rows: np.ndarray, counts: np.ndarray, old: np.ndarray, new_blocks: np.ndarray,
             forked: bool) -> GrowthPlan:
        """This group's share of an append, or `OutOfBlocksError` (nothing changed).
        Blocks this group trims in the same call count as free."""
        first = self.table.first_block[rows]
        # Appending no tokens to a row changes nothing for it: no trim either.
        keep = np.where(counts > 0, np.minimum(self.keep_from(rows, old), new_blocks), first)
        needed = new_blocks - self.table.num_blocks[rows]
        cow = self.copy_on_write_rows(rows, counts, old) if forked else np.zeros(rows.size, dtype=bool)
        total = int(needed.sum()) + int(cow.sum())
        free = self.pool.num_free + self._trimmed_free(rows, keep - first, first)
        if total > free:
            raise OutOfBlocksError(total, free, f"append to {len(rows)} sequences (layer group {self.index})")
        return GrowthPlan(keep, new_blocks, needed, cow)

    def _trimmed_free(self, rows: np.ndarray, drop: np.ndarray, first: np.ndarray) -> int:
        """Blocks a trim of ``drop`` leading blocks per row frees: only those every holder drops."""
        if not drop.any():
            return 0
        drop_rows, drop_cols = expand_runs(rows, drop, first)
        ids, times = np.unique(self.table.block_tables[drop_rows, drop_cols], return_counts=True)
        return int(np.count_nonzero(self.pool.ref_counts[ids] == times))

    def copy_on_write_rows(self, rows: np.ndarray, counts: np.ndarray, old: np.ndarray) -> np.ndarray:
        """Rows whose write lands in a shared, partially filled last block: each gets a
        copy of that block first. Full shared blocks are never written, so never copied.

        When every holder of a block writes in the same call, the last of them keeps
        the original (nobody else needs it), so k writers of a block held k times make
        k - 1 copies. Pins of pending copies are references but not holders: a block
        whose only other reference is a pin is the writer's own.
        """
        bs = self.block_size
        cow = np.zeros(rows.size, dtype=bool)
        partial = (counts > 0) & (old % bs != 0)
        if not partial.any():
            return cow
        idx = np.flatnonzero(partial)
        last = self.table.block_tables[rows[idx], old[idx] // bs]
        shared = self.pool.ref_counts[last] - self.copies.pins(last) > 1
        if not shared.any():
            return cow
        idx, last = idx[shared], last[shared]
        order = np.argsort(last, kind="stable")
        blocks, starts, writers = np.unique(last[order], return_index=True, return_counts=True)
        holders = self.pool.ref_counts[blocks] - self.copies.pins(blocks)
        copies = np.where(writers >= holders, writers - 1, writers)
        rank = np.arange(idx.size) - np.repeat(starts, writers)
        cow[idx[order[rank < np.repeat(copies, writers)]]] = True
        return cow

    def grow(self, rows: np.ndarray, counts: np.ndarray, old: np.ndarray, plan: GrowthPlan, tok_rows: np.ndarray,
             positions: np.ndarray, keyed_ends: np.ndarray | None = None) -> np.ndarray:
        """Apply a validated `plan`: trim, copy-on-write, allocate, record; returns the
        new tokens' slots in this group. ``keyed_ends``: per row, how many leading blocks
        of its chain are keyed (the retention rule of `retire_behind`; None without a cache)."""
        bs, table = self.block_size, self.table
        if self.local:
            drop = plan.keep - table.first_block[rows]
            if drop.any():
                self._trim(rows, plan.keep, drop, keyed_ends)
        if plan.cow.any():
            cow_rows, cow_cols = rows[plan.cow], old[plan.cow] // bs
            dst = self.pool.allocate(cow_rows.size)
            src = table.replace_blocks(cow_rows, cow_cols, dst)
            # The row's reference on src becomes the copy's pin (released at commit).
            self.copies.add(src, dst, old[plan.cow] % bs, cow_rows, cow_cols)
            self.drop_dead_copies()  # src may be an earlier copy's dst: that copy's owner moved on
        table.extend(rows, plan.needed, self.pool.allocate(int(plan.needed.sum())))
        table.set_lengths(rows, old + counts)
        return table.slots(tok_rows, positions, bs)

    def _trim(self, rows: np.ndarray, keep: np.ndarray, drop: np.ndarray, keyed_ends: np.ndarray | None) -> None:
        """Return the blocks before ``keep`` to the pool (keyed ones stay cached)."""
        behind = None
        if keyed_ends is not None and self.cache is not None:
            # Retention: a block behind the window of its chain's latest keyed end is
            # evicted before the blocks a continuation of that chain needs.
            cols = expand_runs(rows, drop, self.table.first_block[rows])[1]
            behind = cols < self.first_visible(np.repeat(keyed_ends, drop) * self.block_size)
        self.pool.free(self.table.trim(rows, keep), behind=behind)
        # Before anything allocates: the free list may hand a freed copy destination
        # straight back, and a copy still pending would then overwrite its new tokens.
        self.drop_dead_copies()

    # ---- copy-on-write copies ---------------------------------------------------------
    def issue_copies(self, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every pending copy, bucketed, for step description ``step`` (see `PendingCopies.issue`)."""
        if not len(self.copies):
            empty = np.zeros(0, np.int32)
            return empty, empty, empty
        return self.copies.issue(step, self.layer_group.num_blocks, 1)

    def retire_copies(self, step: int) -> None:
        """The step described at ``step`` ran: drop the copies it carried and unpin their sources."""
        unpin = self.copies.retire(step)
        if unpin:
            self.pool.free(np.asarray(unpin, np.int32))

    def drop_dead_copies(self) -> None:
        """Forget copies into blocks their owners no longer hold (see `PendingCopies.drop_dead`)."""
        if len(self.copies):
            unpin = self.copies.drop_dead(self.table.block_tables, self.table.in_use)
            if unpin:
                self.pool.free(np.asarray(unpin, np.int32))

    # ---- step metadata ----------------------------------------------------------------
    def check_visible(self, seq_ids: list[int], rows: np.ndarray, first_query: np.ndarray) -> None:
        """`InvalidTokenCountError` when a step's first query (at ``first_query``) would
        see a block this group already returned to the pool. A local group trims when a
        sequence grows, keeping what the appended tokens' queries see; a step describing
        tokens appended earlier than the last append may need blocks that trim dropped,
        and attention would run without them."""
        if not self.local or not rows.size:
            return
        held = self.table.first_block[rows]
        lost = self.first_visible(first_query) < held
        if lost.any():
            i = int(np.flatnonzero(lost)[0])
            raise InvalidTokenCountError(
                f"seq_id={seq_ids[i]}: a step whose first new token is at position {int(first_query[i])} needs "
                f"{self.layer_group.kind} layer group {self.index}'s blocks from logical block "
                f"{int(self.first_visible(first_query[i]))}, but blocks before {int(held[i])} went back to the pool "
                "when the sequence grew past them; describe each step (step_metadata) before appending the next "
                "tokens, or describe fewer new tokens")

    def metadata(self, out: Out, rows: np.ndarray, kv: np.ndarray, q: np.ndarray, positions: np.ndarray | None,
                 B: int, step: int) -> GroupMetadata:
        """This group's share of a step of ``B`` rows over ``rows`` holding ``kv`` tokens whose
        last ``q`` are new (``positions``: the step's ``[B, T]``, or None: derived, and then
        so are the slots), written by the one builder
        (`step_arrays.group_arrays`) into ``out``: the blocks from the first one this
        step's queries can see (the kind's rule) to the last one held, the new tokens'
        write slots, and every pending copy-on-write copy."""
        table, n = self.table, rows.size
        first = self.keep_from(rows, kv - q) if self.local else np.zeros(n, np.int64)
        width = table.num_blocks[rows] - first
        W = bucket(int(width.max(initial=1)), table.max_blocks_per_seq)
        src, dst, length = self.issue_copies(step)
        return group_arrays(out, self.index, table, self.pool.generation, rows, kv, q, positions, B,
                            W, self.pad_slot, self.block_size, self._step_tables(rows, first, W), first,
                            (src, dst, length, *self.copy_generations(src, dst)))

    def copy_generations(self, src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The generations of copies' sources and destinations (0 for padding, whose
        destination is past the pool), as `GroupMetadata` carries them."""
        return self.pool.generation[src], self.pool.generations_of(dst)

    def _step_tables(self, rows: np.ndarray, first: np.ndarray, width: int) -> np.ndarray:
        """Columns ``first .. first + width`` of each row, null past the row's last block.
        Only those columns are indexed, never whole rows of max_blocks_per_seq, so the
        step's host cost stays O(batch x (width + tokens))."""
        table = self.table
        cols = first[:, None] + np.arange(width)[None, :]
        held = cols < table.num_blocks[rows][:, None]
        picked = table.block_tables[rows[:, None], np.minimum(cols, table.max_blocks_per_seq - 1)]
        return np.where(held, picked, NULL_BLOCK)

    # ---- prefix caching ---------------------------------------------------------------
    def hit_start(self, hit_blocks: int) -> int:
        """First logical block a hit of ``hit_blocks`` blocks needs (what its next query reads)."""
        return int(self.first_visible(hit_blocks * self.block_size))

    def longest_hit(self, hashes: list[int], limit: int, present: Container[int] | None = None) -> int:
        """Longest hit ``h <= limit`` (in blocks) this group can serve: blocks
        ``[hit_start(h), h)`` of the chain all cached here (or, given ``present``, all
        keys it contains: the tiers below count them). ``h = 0`` always serves.

        Scans back from ``limit``: a missing block ``j`` rules out every ``h > j``
        whose needs reach back to ``j`` (all of them: ``hit_start`` never decreases
        with ``h``), so the next candidate is ``h = j``. O(limit) lookups."""
        block_of = self.cache.block_of if present is None else present  # type: ignore[union-attr]  # called with the prefix cache on
        h = limit
        j = h - 1
        while h > 0:
            start = self.hit_start(h)
            while j >= start and hashes[j] in block_of:
                j -= 1
            if j < start:
                return h
            h, j = j, j - 1
        return 0

    def hit_blocks(self, hashes: list[int], hit: int) -> np.ndarray:
        """Ids of the cached blocks ``[hit_start(hit), hit)`` a hit of ``hit`` blocks revives here."""
        chain = hashes[self.hit_start(hit):hit]
        return np.fromiter(map(self.cache.block_of.__getitem__, chain), np.int32, len(chain))  # type: ignore[union-attr]  # called with the prefix cache on

    def prompt_needs(self, hits: np.ndarray, hit: int, total: int) -> tuple[int, int]:
        """(blocks a prompt hitting ``hit`` blocks (ids ``hits`` here) and holding ``total``
        allocates here, blocks an allocation can take once its cached hits are revived)."""
        revived = int(np.count_nonzero(self.pool.ref_counts[hits] == 0))
        return total - hit, self.pool.num_free - revived

    def admit_prompt_row(self, row: int, hits: np.ndarray, hit: int, total: int, num_tokens: int,
                         prompt_tokens: int) -> None:
        """A new row holding ``num_tokens`` of a ``prompt_tokens`` prompt: its cached blocks
        ``hits`` (logical ``[hit_start(hit), hit)``) revived, fresh ones up to ``total``.
        Checked by `prompt_needs` first. Every group records the query; blocks reused are its own."""
        self.pool.revive(hits)
        self.table.fill_row(row, hit - hits.size, np.concatenate([hits, self.pool.allocate(total - hit)]), num_tokens)
        self.cache.record_query(prompt_tokens, hit * self.block_size, int(hits.size))  # type: ignore[union-attr]  # called with the prefix cache on

    def key_blocks(self, row: int, hashes: list[int], start: int, stop: int) -> int:
        """Key ``row``'s written full blocks ``[start, stop)`` it still holds; returns how
        many were new. Blocks a trim already returned were freed unkeyed: a hit never
        needs them in this group unless a shorter window covers them again."""
        table, cache = self.table, self.cache
        stored = 0
        for i in range(max(start, int(table.first_block[row])), stop):
            stored += cache.store(int(table.block_tables[row, i]), hashes[i], hashes[i - 1] if i else NO_HASH)  # type: ignore[union-attr]  # called with the prefix cache on
        return stored

    def retire_behind(self, hashes: list[int], old_end: int, new_end: int) -> None:
        """A chain's keyed end moved from ``old_end`` to ``new_end`` blocks: its cached,
        unheld blocks that no longer serve a hit at the end (behind ``hit_start(new_end)``)
        move to the front of eviction. See `retention rule` in docs/architecture.md."""
        if not self.local:
            return
        block_of = self.cache.block_of  # type: ignore[union-attr]  # called with the prefix cache on
        for i in range(self.hit_start(old_end), self.hit_start(new_end)):
            block = block_of.get(hashes[i])
            if block is not None:
                self.cache.demote(block)  # type: ignore[union-attr]  # called with the prefix cache on

    # ---- integrity and state ----------------------------------------------------------
    def check_integrity(self, rows: np.ndarray, kv_lens: np.ndarray) -> None:
        """Raise AssertionError unless pool, table and copies agree for the admitted ``rows``
        holding ``kv_lens`` tokens (group 0's lengths: every group holds the same tokens)."""
        name, table, pool = f"group {self.index} ({self.kind})", self.table, self.pool
        pool.check_integrity()
        table.check_integrity(self.block_size)
        if not np.array_equal(rows, np.flatnonzero(table.in_use)):
            raise AssertionError(f"{name}: admitted sequences and page-table rows in use disagree")
        if not np.array_equal(table.kv_lens, kv_lens):
            raise AssertionError(f"{name}: lengths differ from group 0")
        held = np.concatenate([table.blocks_of(r) for r in rows]) if rows.size else np.empty(0, np.int32)
        # A pending copy keeps its writer's reference on the source block (a pin).
        held = np.concatenate([held, np.asarray(self.copies.pinned(), np.int32)])
        refs = np.bincount(held, minlength=pool.num_blocks).astype(np.int32)
        if not np.array_equal(refs, pool.ref_counts):
            bad = np.flatnonzero(refs != pool.ref_counts)
            raise AssertionError(f"{name} blocks {bad.tolist()}: table references {refs[bad].tolist()} "
                                 f"!= ref counts {pool.ref_counts[bad].tolist()}")
        for src, dst, length in self.copies.snapshot():
            if pool.ref_counts[dst] < 1 or pool.ref_counts[src] < 1 or not 0 < length < self.block_size:
                raise AssertionError(f"{name}: pending copy {src}->{dst} ({length} slots) is stale")
        self.copies.check(table.block_tables, table.in_use)
        if self.local and rows.size:
            # Never trimmed a block the last written token's query can still see.
            reach = self.first_visible(np.maximum(table.kv_lens[rows].astype(np.int64) - 1, 0))
            if np.any(table.first_block[rows] > reach):
                raise AssertionError(f"{name}: a block a {self.kind} query can see was returned to the pool")

    def state(self) -> dict[str, np.ndarray]:
        """Saved arrays: ``pool.*``, ``table.*`` and, with a cache, ``prefix.*``. Pending
        copies must have been committed (their bytes are not in the pages yet)."""
        check_captured(self, self.SAVED_ATTRS)
        if len(self.copies):
            raise CheckpointError(f"layer group {self.index} has {len(self.copies)} copy-on-write copies pending")
        state = {**prefixed("pool.", self.pool.state()), **prefixed("table.", self.table.state())}
        if self.cache is not None:
            state.update(prefixed("prefix.", self.cache.state()))
        return state

    @classmethod
    def from_state(cls, spec: CacheSpec, index: int, prefix_cache: bool, state: dict[str, np.ndarray]) -> Self:
        """The group `state` describes (`CheckpointError` naming a malformed array)."""
        group = cls(spec, index, prefix_cache)
        nb = group.layer_group.num_blocks
        cache = PrefixCache.from_state(scoped(state, "prefix."), nb) if prefix_cache else None
        group.pool = BlockPool.from_state(scoped(state, "pool."), nb, cache)
        group.table = PageTable.from_state(scoped(state, "table."), spec.max_blocks_per_seq)
        return group


__all__ = ["GroupAllocator", "GrowthPlan"]
