"""`KVCacheManager`: the scheduler-facing host API.

Predicate/action pairs (`can_admit`/`admit`, `can_append`/`append`) over plain numpy
state. Every action validates everything first and mutates last, so a call that
raises leaves the manager exactly as it was: no half-admitted sequence, no leaked
block.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NewType

import numpy as np

from paged_kv.allocator.block_pool import BlockPool
from paged_kv.allocator.page_table import PageTable
from paged_kv.allocator.prefix_cache import NO_HASH, PrefixCache, chain_hashes
from paged_kv.allocator.swap_record import SwapRecord
from paged_kv.errors import (
    BatchTooLargeError,
    DuplicateSequenceError,
    InvalidTokenCountError,
    OutOfBlocksError,
    SequenceTooLongError,
    SpecError,
    UnknownSequenceError,
)
from paged_kv.metadata import GroupMetadata, StepMetadata, bucket
from paged_kv.spec import NULL_BLOCK, CacheSpec

SeqId = NewType("SeqId", int)
"""The caller's name for a request: any non-negative Python or numpy integer."""


def _check_seq_id(seq_id) -> int:
    if isinstance(seq_id, bool) or not isinstance(seq_id, (int, np.integer)):
        raise InvalidTokenCountError(f"seq_id={seq_id!r} must be an integer (got {type(seq_id).__name__})")
    if seq_id < 0:
        raise InvalidTokenCountError(f"seq_id={seq_id} must be >= 0")
    return int(seq_id)


def _id_list(seq_ids) -> list:
    """``seq_ids`` as a list; a bare id or another non-iterable is a typed error."""
    if isinstance(seq_ids, list):
        return seq_ids
    if isinstance(seq_ids, (str, bytes)) or not hasattr(seq_ids, "__iter__"):
        raise UnknownSequenceError(f"seq_ids={seq_ids!r} must be a list of sequence ids (wrap a single id: [{seq_ids!r}])")
    return list(seq_ids)


def _expand(rows: np.ndarray, counts: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Runs of ``counts[i]`` consecutive indices from ``starts[i]``, labelled ``rows[i]``.

    rows [7, 9], counts [2, 3], starts [0, 4] -> ([7, 7, 9, 9, 9], [0, 1, 4, 5, 6]).
    Vectorized; a decode step (every count 0 or 1) takes a mask instead of
    ``repeat``/``cumsum``, which halves the host cost of the common case.
    """
    if counts.size and counts.max() <= 1:
        keep = counts > 0
        return rows[keep], starts[keep].astype(np.int64)
    total = int(counts.sum())
    offsets = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    return np.repeat(rows, counts), np.repeat(starts, counts).astype(np.int64) + offsets


class _Group:
    """Host state of one layer group: its own pool and page table.

    A sequence has the same row in every group's table (rows are added and removed
    in lockstep), so one row index serves all groups.
    """

    def __init__(self, spec: CacheSpec, index: int, prefix_cache: bool = False):
        layer_group = spec.groups[index]
        self.window = layer_group.window
        self.pool = BlockPool(layer_group.num_blocks, prefix_cache=prefix_cache)
        self.table = PageTable(spec.max_blocks_per_seq)
        # Flat slot the write drops: one past the last token slot of this group's pages.
        self.pad_slot = layer_group.num_blocks * spec.block_size

    def keep_from(self, rows: np.ndarray, first_query: np.ndarray, block_size: int) -> np.ndarray:
        """First logical block any query at or after ``first_query`` can still see."""
        if self.window is None:
            return self.table.first_block[rows].astype(np.int64)
        return np.maximum(np.maximum(first_query - self.window + 1, 0) // block_size, self.table.first_block[rows])


class KVCacheManager:
    """Maps each sequence's token positions to blocks of the device pages.

    ``append`` and ``step_metadata`` take many sequences at once and do their work
    in numpy over the whole batch; the only per-sequence Python is the id lookup.
    Layers with a sliding window form their own group (`CacheSpec.groups`) whose
    blocks behind the window go back to that group's pool as the sequence grows.
    """

    def __init__(self, spec: CacheSpec, prefix_cache: bool = False):
        """``prefix_cache=True`` keeps released full blocks keyed by their token
        prefix for `admit_prompt` to reuse (not with sliding-window layers: a hit
        would need only the blocks inside the window, which this cache does not model)."""
        if prefix_cache and len(spec.groups) > 1:
            raise SpecError(
                f"prefix_cache=True with sliding-window layers {spec.sliding_layers} is not supported: build the "
                "manager without it, or without sliding layers"
            )
        self.spec = spec
        self.groups = [_Group(spec, g, prefix_cache) for g in range(len(spec.groups))]
        self._rows: dict[int, int] = {}
        # Copy-on-write block copies (src, dst) per group made by appends and not yet
        # handed to a step: `step_metadata` moves them into the metadata, once.
        self._pending_copies: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in self.groups]
        # Only a fork shares a partially filled block (the prefix cache shares full
        # ones), so until a fork the copy-on-write check is skipped: appends pay
        # nothing for it. Cleared when the last sequence leaves.
        self._forked = False

    @property
    def pool(self) -> BlockPool:
        """The first group's pool (the only one unless some layers slide)."""
        return self.groups[0].pool

    @property
    def table(self) -> PageTable:
        """The first group's page table; it holds every sequence's length."""
        return self.groups[0].table

    @property
    def pad_slot(self) -> int:
        return self.groups[0].pad_slot

    # ---- queries -------------------------------------------------------------------
    def __contains__(self, seq_id) -> bool:
        # bool and float hash like ints (True == 1.0 == 1): never alias them to an id.
        return not isinstance(seq_id, (bool, float, np.floating)) and seq_id in self._rows

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def seq_ids(self) -> list[int]:
        return list(self._rows)

    @property
    def num_free_blocks(self) -> int:
        """Free blocks of the scarcest group (the one that limits admission)."""
        return min(g.pool.num_free for g in self.groups)

    @property
    def num_used_blocks(self) -> int:
        """Blocks in use, summed over groups."""
        return sum(g.pool.num_used for g in self.groups)

    @property
    def used_bytes(self) -> int:
        """Device bytes of the blocks in use, all groups and layers."""
        return sum(g.pool.num_used * self.spec.group_bytes_per_block(i) for i, g in enumerate(self.groups))

    def kv_len(self, seq_id) -> int:
        return int(self.table.kv_lens[self._row(seq_id)])

    def block_table(self, seq_id, group: int = 0) -> np.ndarray:
        """The blocks ``seq_id`` holds in ``group``, in logical order (a copy)."""
        return self.groups[group].table.blocks_of(self._row(seq_id)).copy()

    def num_tokens_stored(self) -> int:
        return int(self.table.kv_lens.sum())

    # ---- predicates ----------------------------------------------------------------
    def can_admit(self, num_tokens: int) -> bool:
        """Whether ``admit(new_id, num_tokens)`` would succeed now."""
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, (int, np.integer)):
            return False
        blocks = self.spec.blocks_for(num_tokens)
        return (
            num_tokens >= 1
            and blocks <= self.spec.max_blocks_per_seq
            and all(g.pool.can_allocate(blocks) for g in self.groups)
        )

    def can_append(self, seq_ids: Sequence[int], num_tokens=1) -> bool:
        """Whether ``append(seq_ids, num_tokens)`` would succeed now."""
        try:
            seq_ids = _id_list(seq_ids)
            rows, counts = self._rows_and_counts(seq_ids, num_tokens)
        except (UnknownSequenceError, DuplicateSequenceError, InvalidTokenCountError):
            return False
        try:
            self._plan(rows, counts, seq_ids)
        except (SequenceTooLongError, OutOfBlocksError):
            return False
        return True

    # ---- actions -------------------------------------------------------------------
    def admit(self, seq_id, num_tokens: int) -> np.ndarray:
        """Register ``seq_id`` holding its first ``num_tokens`` tokens (the prompt).

        Returns the flat page slot of each of those tokens, in order, for the prefill
        write: ``[num_groups, num_tokens]`` (one row per layer group). Raises `DuplicateSequenceError`, `InvalidTokenCountError`,
        `SequenceTooLongError` or `OutOfBlocksError`, changing nothing.
        """
        seq_id = _check_seq_id(seq_id)
        if seq_id in self._rows:
            raise DuplicateSequenceError(f"seq_id={seq_id} is already admitted; release it first or pick a new id")
        n = self._check_count(num_tokens, "num_tokens")
        if n < 1:
            raise InvalidTokenCountError(f"admit(seq_id={seq_id}, num_tokens={n}): a sequence starts with >= 1 token")
        blocks = self.spec.blocks_for(n)
        if blocks > self.spec.max_blocks_per_seq:
            raise SequenceTooLongError(
                f"seq_id={seq_id} with {n} tokens needs {blocks} blocks > max_blocks_per_seq="
                f"{self.spec.max_blocks_per_seq} (max_seq_len={self.spec.max_seq_len})"
            )
        for g in self.groups:
            if not g.pool.can_allocate(blocks):
                raise OutOfBlocksError(blocks, g.pool.num_free, f"admit(seq_id={seq_id}, num_tokens={n})")
        rows = {g.table.add_row() for g in self.groups}
        assert len(rows) == 1, "page-table rows fell out of lockstep"
        row = rows.pop()
        self._rows[seq_id] = row
        return self._grow(np.array([row]), np.array([n]), self._plan(np.array([row]), np.array([n]), [seq_id]))

    def append(self, seq_ids: Sequence[int], num_tokens=1) -> np.ndarray:
        """Grow each sequence by ``num_tokens`` (an int, or one count per sequence).

        Allocates the blocks the batch needs in one call per group; a sliding group
        first returns the blocks behind its window. Returns the flat page slot of
        every new token, sequence by sequence in the order given (the concatenation
        vLLM calls ``slot_mapping``), one row per layer group: ``[num_groups,
        sum(num_tokens)]``. All or nothing.
        """
        seq_ids = _id_list(seq_ids)
        rows, counts = self._rows_and_counts(seq_ids, num_tokens)
        return self._grow(rows, counts, self._plan(rows, counts, seq_ids))

    def release(self, seq_id) -> int:
        """Forget ``seq_id`` and drop its hold on its blocks; returns how many no sequence holds now
        (free, or cached for reuse when the prefix cache keeps them)."""
        row = self._row(seq_id)
        del self._rows[int(seq_id)]
        self._forked &= bool(self._rows)
        # Tail first: the prefix cache then evicts a chain's tail before its parents.
        return sum(int(g.pool.free(g.table.remove_row(row)[::-1]).size) for g in self.groups)

    # ---- prefix cache --------------------------------------------------------------------
    @property
    def prefix_cache(self) -> PrefixCache | None:
        """The prefix cache (stats, events, subscribe), or None when disabled."""
        return self.groups[0].pool.cache

    def _require_prefix_cache(self) -> PrefixCache:
        if self.prefix_cache is None:
            raise SpecError("prefix caching is off: build KVCacheManager(spec, prefix_cache=True)")
        return self.prefix_cache

    def _prompt(self, token_ids, cache_key) -> tuple[np.ndarray, list[int], list[int]]:
        """Validated tokens, their full blocks' keys, and the cached blocks a prompt would reuse."""
        cache = self._require_prefix_cache()
        tokens = np.asarray(token_ids)
        if tokens.ndim != 1 or tokens.size < 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise InvalidTokenCountError(
                f"token_ids must be a non-empty 1-D sequence of integers; got shape {tokens.shape} dtype {tokens.dtype}"
            )
        bs = self.spec.block_size
        blocks = self.spec.blocks_for(tokens.size)
        if blocks > self.spec.max_blocks_per_seq:
            raise SequenceTooLongError(
                f"a prompt of {tokens.size} tokens needs {blocks} blocks > max_blocks_per_seq={self.spec.max_blocks_per_seq}"
            )
        hashes = chain_hashes(tokens, bs, tokens.size // bs, cache_key)
        # The last token is always computed (its logits start decoding), so a hit
        # covers at most the full blocks before it.
        hits = cache.match(hashes[: (tokens.size - 1) // bs])
        return tokens, hashes, hits

    def _prompt_shortfall(self, tokens, hits) -> tuple[int, int]:
        pool = self.groups[0].pool
        revived = sum(1 for b in hits if pool.ref_counts[b] == 0)
        return self.spec.blocks_for(tokens.size) - len(hits), pool.num_free - revived

    def can_admit_prompt(self, token_ids, cache_key=None) -> bool:
        """Whether ``admit_prompt(new_id, token_ids, cache_key)`` would succeed now."""
        try:
            tokens, _, hits = self._prompt(token_ids, cache_key)
        except (SpecError, InvalidTokenCountError, SequenceTooLongError):
            return False
        need, free = self._prompt_shortfall(tokens, hits)
        return need <= free

    def admit_prompt(self, seq_id, token_ids, cache_key=None) -> int:
        """Admit ``seq_id`` with prompt ``token_ids``, reusing the longest cached chain of
        full blocks with the same tokens (and the same ``cache_key``: an adapter name,
        a tenant salt). Returns how many leading tokens are cached; compute the rest:
        ``step_metadata([seq_id], len(token_ids) - cached)``. The prompt's other full
        blocks are keyed at once, so requests in the same step can share them.
        All or nothing: `DuplicateSequenceError`, `InvalidTokenCountError`,
        `SequenceTooLongError`, `OutOfBlocksError`, `SpecError` (cache off)."""
        seq_id = _check_seq_id(seq_id)
        if seq_id in self._rows:
            raise DuplicateSequenceError(f"seq_id={seq_id} is already admitted; release it first or pick a new id")
        tokens, hashes, hits = self._prompt(token_ids, cache_key)
        need, free = self._prompt_shortfall(tokens, hits)
        if need > free:
            raise OutOfBlocksError(need, free, f"admit_prompt(seq_id={seq_id}, {tokens.size} tokens, {len(hits)} cached blocks)")
        g = self.groups[0]
        cache, table = g.pool.cache, g.table
        row = table.add_row()
        self._rows[seq_id] = row
        h = len(hits)
        g.pool.revive(np.asarray(hits, dtype=np.int32))
        total = self.spec.blocks_for(tokens.size)
        table.block_tables[row, :h] = hits
        table.block_tables[row, h:total] = g.pool.allocate(need)
        table.kv_lens[row], table.num_blocks[row], table.first_block[row] = tokens.size, total, 0
        self._key_blocks(row, hashes, start=h)
        cache.queries += 1
        cache.query_tokens += int(tokens.size)
        cache.hit_tokens += h * self.spec.block_size
        cache.blocks_reused += h
        return h * self.spec.block_size

    def cache_tokens(self, seq_id, token_ids, cache_key=None) -> int:
        """Key ``seq_id``'s full blocks by its tokens so far (prompt and output), so a
        later prompt that continues this conversation hits them after release (multi-
        turn chat). ``token_ids`` must be the sequence's tokens, ``kv_len`` of them.
        Returns how many blocks were newly keyed."""
        row = self._row(seq_id)
        tokens = np.asarray(token_ids)
        n = int(self.table.kv_lens[row])
        if tokens.ndim != 1 or tokens.size != n or not np.issubdtype(tokens.dtype, np.integer):
            raise InvalidTokenCountError(
                f"cache_tokens(seq_id={seq_id}): token_ids has shape {tokens.shape} dtype {tokens.dtype}; "
                f"need the sequence's {n} integer tokens"
            )
        self._require_prefix_cache()
        hashes = chain_hashes(tokens, self.spec.block_size, n // self.spec.block_size, cache_key)
        return self._key_blocks(row, hashes, start=0)

    def _key_blocks(self, row: int, hashes: list[int], start: int) -> int:
        cache, table = self.prefix_cache, self.table
        stored = 0
        for i in range(start, len(hashes)):
            parent = hashes[i - 1] if i else NO_HASH
            stored += cache.store(int(table.block_tables[row, i]), hashes[i], parent)
        return stored

    def fork(self, parent, child) -> None:
        """Register ``child`` sharing every block ``parent`` holds (parallel sampling,
        beam search). No block is allocated or copied now: the first write into a
        shared, partially filled last block copies that block (see `append`), and a
        block returns to the pool when its last holder is released.
        Raises `UnknownSequenceError` / `DuplicateSequenceError`, changing nothing."""
        prow = self._row(parent)
        child = _check_seq_id(child)
        if child in self._rows:
            raise DuplicateSequenceError(f"fork(parent={parent}, child={child}): seq_id={child} is already admitted")
        rows = {g.table.add_row() for g in self.groups}
        assert len(rows) == 1, "page-table rows fell out of lockstep"
        row = rows.pop()
        self._rows[child] = row
        self._forked = True
        for g in self.groups:
            t = g.table
            t.block_tables[row] = t.block_tables[prow]
            t.kv_lens[row], t.num_blocks[row], t.first_block[row] = t.kv_lens[prow], t.num_blocks[prow], t.first_block[prow]
            g.pool.incref(t.blocks_of(row))

    @property
    def num_pending_copies(self) -> int:
        """Copy-on-write block copies waiting for the next `step_metadata`."""
        return sum(src.size for pending in self._pending_copies for src, _ in pending)

    def _take_copies(self, g: int) -> tuple[np.ndarray, np.ndarray]:
        pending = self._pending_copies[g]
        if not pending:
            return np.zeros(0, np.int32), np.zeros(0, np.int32)
        src = np.concatenate([s for s, _ in pending]).astype(np.int32)
        dst = np.concatenate([d for _, d in pending]).astype(np.int32)
        pending.clear()
        # Bucketed so the step compiles once per bucket; padding copies the null block
        # to an out-of-range id, which the scatter drops.
        n = bucket(src.size, max(self.spec.max_batch_slots, src.size))
        pad = n - src.size
        return (np.concatenate([src, np.full(pad, NULL_BLOCK, np.int32)]),
                np.concatenate([dst, np.full(pad, self.spec.groups[g].num_blocks, np.int32)]))

    # ---- swapping (host side; `paged_kv.swap` moves the bytes) --------------------------
    def swap_record(self, seq_id) -> SwapRecord:
        """What `swap_out` would return, without releasing anything: the blocks to copy."""
        row = self._row(seq_id)
        return SwapRecord(
            seq_id=int(seq_id),
            num_tokens=int(self.table.kv_lens[row]),
            first_blocks=tuple(int(g.table.first_block[row]) for g in self.groups),
            blocks=tuple(g.table.blocks_of(row).copy() for g in self.groups),
        )

    def swap_out(self, seq_id) -> SwapRecord:
        """Release ``seq_id`` and return the record `swap_in` needs to bring it back.

        Host bookkeeping only: copy the record's blocks off the device before anything
        else is written to the pool (`paged_kv.swap.swap_out` does both in order).
        """
        record = self.swap_record(seq_id)
        self.release(seq_id)
        return record

    def can_swap_in(self, record: SwapRecord) -> bool:
        """Whether ``swap_in(record)`` would succeed now."""
        return record.seq_id not in self._rows and all(
            g.pool.can_allocate(n) for g, n in zip(self.groups, record.num_blocks)
        )

    def swap_in(self, record: SwapRecord) -> tuple[np.ndarray, ...]:
        """Re-admit a swapped-out sequence into fresh blocks, one set per group.

        Returns the new block ids per group, in logical order, for the copy back in.
        The sequence resumes with its length, and a sliding group with the same first
        block as before. Raises `DuplicateSequenceError` or `OutOfBlocksError`,
        changing nothing.
        """
        if not isinstance(record, SwapRecord) or len(record.blocks) != len(self.groups):
            raise InvalidTokenCountError(f"swap_in needs a SwapRecord from a manager with {len(self.groups)} groups; got {record!r}")
        if record.seq_id in self._rows:
            raise DuplicateSequenceError(f"seq_id={record.seq_id} is admitted again; release it before swapping the old one in")
        total = self.spec.blocks_for(record.num_tokens)
        if total > self.spec.max_blocks_per_seq or any(
            n != total - first for n, first in zip(record.num_blocks, record.first_blocks)
        ):
            raise InvalidTokenCountError(
                f"swap_in(seq_id={record.seq_id}): {record.num_tokens} tokens need blocks "
                f"{record.first_blocks}..{total} per group, the record holds {record.num_blocks}"
            )
        for g, n in zip(self.groups, record.num_blocks):
            if not g.pool.can_allocate(n):
                raise OutOfBlocksError(n, g.pool.num_free, f"swap_in(seq_id={record.seq_id})")
        row = {g.table.add_row() for g in self.groups}.pop()
        self._rows[record.seq_id] = row
        new = []
        for g, first, n in zip(self.groups, record.first_blocks, record.num_blocks):
            ids = g.pool.allocate(n)
            g.table.block_tables[row, first:total] = ids
            g.table.first_block[row] = first
            g.table.num_blocks[row] = total
            g.table.kv_lens[row] = record.num_tokens
            new.append(ids)
        return tuple(new)

    # ---- step metadata ----------------------------------------------------------------
    def step_metadata(self, seq_ids: Sequence[int], num_new_tokens=1) -> StepMetadata:
        """Describe a forward pass over ``seq_ids`` whose last ``num_new_tokens`` tokens
        (already added by `admit`/`append`) are written this step.

        Pure: reads the tables, changes nothing. Shapes are bucketed (see `bucket`).
        """
        seq_ids = _id_list(seq_ids)
        rows, q = self._rows_and_counts(seq_ids, num_new_tokens)
        n = rows.size
        if n > self.spec.max_batch_slots:
            raise BatchTooLargeError(f"{n} sequences in one step > max_batch_slots={self.spec.max_batch_slots}")
        kv = self.table.kv_lens[rows]
        if np.any(q > kv):
            i = int(np.flatnonzero(q > kv)[0])
            raise InvalidTokenCountError(
                f"seq_id={seq_ids[i]} has {int(kv[i])} tokens, fewer than num_new_tokens={int(q[i])}; "
                "admit or append them first"
            )
        B = bucket(n, self.spec.max_batch_slots)
        T = bucket(int(q.max(initial=1)), self.spec.max_seq_len)
        kv_lens = np.zeros(B, dtype=np.int32)
        kv_lens[:n] = kv
        query_lens = np.zeros(B, dtype=np.int32)
        query_lens[:n] = q
        t = np.arange(T, dtype=np.int32)[None, :]
        valid = t < query_lens[:, None]
        # Padding tokens sit at the row's last real position so a causal mask built
        # from `positions` never leaves a padding query with nothing to attend to.
        positions = np.where(valid, (kv_lens - query_lens)[:, None] + t, np.maximum(kv_lens[:, None] - 1, 0))
        positions = positions.astype(np.int32)
        groups = tuple(
            self._group_metadata(g, rows, kv - q, positions[:n], valid[:n], B, *self._take_copies(i))
            for i, g in enumerate(self.groups)
        )
        return StepMetadata(kv_lens, query_lens, positions, groups)

    def _group_metadata(self, g: _Group, rows, first_query, positions, valid, B, copy_src, copy_dst) -> GroupMetadata:
        """The tables one group's views need: the blocks from the first one this
        step's queries can see to the last one held."""
        bs = self.spec.block_size
        n = rows.size
        table = g.table
        first = g.keep_from(rows, first_query, bs) if g.window is not None else np.zeros(n, np.int64)
        width = table.num_blocks[rows] - first
        W = bucket(int(width.max(initial=1)), self.spec.max_blocks_per_seq)
        # Index only the columns used (W per row, T per row), never whole rows of
        # max_blocks_per_seq: the step's host cost stays O(batch x (W + T)).
        block_tables = np.full((B, W), NULL_BLOCK, dtype=np.int32)
        if g.window is None:
            # Rows are already null past their last block (check_integrity holds the
            # table to it), so the first W columns are the answer: one row gather
            # instead of building [B, W] index arrays, which dominated the step.
            block_tables[:n] = table.block_tables[rows, :W]
        else:
            cols = first[:, None] + np.arange(W)[None, :]
            held = cols < table.num_blocks[rows][:, None]
            picked = table.block_tables[rows[:, None], np.minimum(cols, table.max_blocks_per_seq - 1)]
            block_tables[:n] = np.where(held, picked, NULL_BLOCK)
        blk = table.block_tables[rows[:, None], positions // bs].astype(np.int64)
        slot_mapping = np.full((B, positions.shape[1]), g.pad_slot, dtype=np.int32)
        slot_mapping[:n] = np.where(valid, blk * bs + positions % bs, g.pad_slot)
        start = np.zeros(B, dtype=np.int32)
        start[:n] = first * bs
        return GroupMetadata(block_tables, slot_mapping, start, copy_src, copy_dst)

    # ---- integrity -----------------------------------------------------------------
    def check_integrity(self) -> None:
        """Raise AssertionError if any invariant is broken. Tests call it after every operation.

        Invariants: every usable block is free xor referenced; ref counts equal the
        number of table entries naming the block; each row holds exactly
        ceil(len / block_size) blocks and null padding after them; rows in use are the
        rows of admitted sequences.
        """
        rows = np.array(sorted(self._rows.values()), dtype=np.int64)
        bs = self.spec.block_size
        for i, g in enumerate(self.groups):
            g.pool.check_integrity()
            g.table.check_integrity(bs)
            if not np.array_equal(rows, np.flatnonzero(g.table.in_use)):
                raise AssertionError(f"group {i}: admitted sequences and page-table rows in use disagree")
            if not np.array_equal(g.table.kv_lens, self.table.kv_lens):
                raise AssertionError(f"group {i}: lengths differ from group 0")
            held = np.concatenate([g.table.blocks_of(r) for r in rows]) if rows.size else np.empty(0, np.int32)
            refs = np.bincount(held, minlength=g.pool.num_blocks).astype(np.int32)
            if not np.array_equal(refs, g.pool.ref_counts):
                bad = np.flatnonzero(refs != g.pool.ref_counts)
                raise AssertionError(
                    f"group {i} blocks {bad.tolist()}: table references {refs[bad].tolist()} "
                    f"!= ref counts {g.pool.ref_counts[bad].tolist()}"
                )
            if g.window is not None and rows.size:
                # Never trimmed a block the next query (at position kv_len) can still see.
                limit = np.maximum(g.table.kv_lens[rows] - g.window, 0) // bs
                if np.any(g.table.first_block[rows] > limit):
                    raise AssertionError(f"group {i}: a block inside the window was returned to the pool")

    def snapshot(self) -> tuple:
        """A comparable copy of all host state (tests check a failed call left it unchanged)."""
        rows = sorted(self._rows.items())
        return (
            tuple(rows),
            tuple(
                (sid, int(self.table.kv_lens[r]), tuple(g.table.block_tables[r].tobytes() for g in self.groups))
                for sid, r in rows
            ),
            tuple((g.pool.ref_counts.tobytes(), g.pool.num_free) for g in self.groups),
            tuple(
                (tuple(sorted(g.pool.cache.block_of.items())), tuple(g.pool.cache.evictable))
                for g in self.groups if g.pool.cache is not None
            ),
        )

    # ---- internals -----------------------------------------------------------------
    def _row(self, seq_id) -> int:
        # True == 1 == 1.0 hash alike: without this check release(True) or kv_len(1.0)
        # would silently act on seq 1.
        if isinstance(seq_id, bool) or not isinstance(seq_id, (int, np.integer)):
            raise UnknownSequenceError(
                f"seq_id={seq_id!r} is not admitted: sequence ids are integers, not {type(seq_id).__name__}"
            )
        try:
            return self._rows[seq_id]
        except (KeyError, TypeError):
            raise UnknownSequenceError(f"seq_id={seq_id!r} is not admitted (held: {len(self._rows)} sequences)") from None

    def _check_count(self, value, name: str) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise InvalidTokenCountError(f"{name}={value!r} must be an integer")
        if value < 0:
            raise InvalidTokenCountError(f"{name}={value} must be >= 0")
        if value > 2**31 - 1:
            raise InvalidTokenCountError(f"{name}={value} exceeds any cache's token slots (< 2**31)")
        return int(value)

    def _rows_and_counts(self, seq_ids: Iterable[int], num_tokens) -> tuple[np.ndarray, np.ndarray]:
        seq_ids = _id_list(seq_ids)
        if not set(map(type, seq_ids)) <= {int, np.int64, np.int32}:
            for s in seq_ids:
                self._row(s)  # bool/float ids hash like ints (True == 1.0 == 1): reject, never alias
        try:
            # map over the dict's bound __getitem__ runs the lookups in C: 3x faster
            # than calling _row per id, which matters at hundreds of ids per step.
            rows = np.fromiter(map(self._rows.__getitem__, seq_ids), dtype=np.int64, count=len(seq_ids))
        except (KeyError, TypeError):
            for s in seq_ids:
                self._row(s)  # raises UnknownSequenceError naming the first bad id
            raise
        ordered = np.sort(rows)
        if np.any(ordered[1:] == ordered[:-1]):
            dup = int(ordered[1:][ordered[1:] == ordered[:-1]][0])
            raise DuplicateSequenceError(
                f"seq_id={next(s for s in seq_ids if self._rows[s] == dup)} appears twice in one call of {len(seq_ids)} ids"
            )
        try:
            counts = np.asarray(num_tokens)
        except (ValueError, TypeError):  # a ragged nested list
            raise InvalidTokenCountError(f"num_tokens={num_tokens!r} is not an int or one count per sequence") from None
        if counts.ndim == 0:
            counts = np.full(rows.size, self._check_count(num_tokens, "num_tokens"), dtype=np.int64)
        else:
            if counts.shape != rows.shape or not np.issubdtype(counts.dtype, np.integer):
                raise InvalidTokenCountError(
                    f"num_tokens has shape {counts.shape} dtype {counts.dtype}; need {rows.size} integers"
                )
            if np.any(counts < 0):
                raise InvalidTokenCountError(f"num_tokens={counts.tolist()} has negative counts")
            if np.any(counts > 2**31 - 1):
                raise InvalidTokenCountError(f"num_tokens={counts.tolist()} has counts >= 2**31, more than any cache holds")
            counts = counts.astype(np.int64)
        return rows, counts

    def _plan(self, rows: np.ndarray, counts: np.ndarray, seq_ids: list) -> list:
        """Per group: (first block kept, logical blocks after, blocks to allocate).

        Raises `SequenceTooLongError` / `OutOfBlocksError` without changing anything.
        Blocks a sliding group returns in the same call count as free.
        """
        bs = self.spec.block_size
        old = self.table.kv_lens[rows].astype(np.int64)
        new_blocks = -(-(old + counts) // bs)
        too_long = new_blocks > self.spec.max_blocks_per_seq
        if np.any(too_long):
            i = int(np.flatnonzero(too_long)[0])
            raise SequenceTooLongError(
                f"seq_id={seq_ids[i]} would hold {int(old[i] + counts[i])} tokens = {int(new_blocks[i])} "
                f"blocks > max_blocks_per_seq={self.spec.max_blocks_per_seq}"
            )
        plan = []
        for g in self.groups:
            # Appending no tokens to a row changes nothing for it: no trim either.
            first = g.table.first_block[rows]
            keep = np.where(counts > 0, np.minimum(g.keep_from(rows, old, bs), new_blocks), first)
            needed = new_blocks - g.table.num_blocks[rows]
            cow = self._copy_on_write_rows(g, rows, counts, old)
            trimmed = 0
            drop = keep - first
            if drop.any():
                # A trimmed block is freed only if every holder drops it in this call.
                drop_rows, drop_cols = _expand(rows, drop, first)
                ids, times = np.unique(g.table.block_tables[drop_rows, drop_cols], return_counts=True)
                trimmed = int(np.count_nonzero(g.pool.ref_counts[ids] == times))
            total = int(needed.sum()) + int(cow.sum())
            if total > g.pool.num_free + trimmed:
                raise OutOfBlocksError(total, g.pool.num_free + trimmed, f"append to {len(rows)} sequences")
            plan.append((keep, new_blocks, needed, cow))
        return plan

    def _copy_on_write_rows(self, g: _Group, rows, counts, old) -> np.ndarray:
        """Rows whose write lands in a shared, partially filled last block: each gets a
        copy of that block first. Full shared blocks are never written, so never copied.

        When every holder of a block writes in the same call, the last of them keeps
        the original (nobody else needs it), so k writers of a block held k times make
        k - 1 copies.
        """
        bs = self.spec.block_size
        cow = np.zeros(rows.size, dtype=bool)
        if not self._forked:
            return cow
        partial = (counts > 0) & (old % bs != 0)
        if not partial.any():
            return cow
        idx = np.flatnonzero(partial)
        last = g.table.block_tables[rows[idx], old[idx] // bs]
        shared = g.pool.ref_counts[last] > 1
        if not shared.any():
            return cow
        idx, last = idx[shared], last[shared]
        order = np.argsort(last, kind="stable")
        blocks, starts, writers = np.unique(last[order], return_index=True, return_counts=True)
        copies = np.where(writers >= g.pool.ref_counts[blocks], writers - 1, writers)
        rank = np.arange(idx.size) - np.repeat(starts, writers)
        cow[idx[order[rank < np.repeat(copies, writers)]]] = True
        return cow

    def _grow(self, rows: np.ndarray, counts: np.ndarray, plan: list) -> np.ndarray:
        """Apply a validated `_plan`: trim, allocate, record; return slots per group."""
        bs = self.spec.block_size
        old_lens = self.table.kv_lens[rows].astype(np.int64)
        tok_rows, pos = _expand(rows, counts, old_lens)
        slots = np.empty((len(self.groups), pos.size), dtype=np.int32)
        for i, (g, (keep, new_blocks, needed, cow)) in enumerate(zip(self.groups, plan)):
            table = g.table
            drop = keep - table.first_block[rows]
            if drop.any():
                drop_rows, drop_cols = _expand(rows, drop, table.first_block[rows])
                g.pool.free(table.block_tables[drop_rows, drop_cols])
                table.block_tables[drop_rows, drop_cols] = NULL_BLOCK
                table.first_block[rows] = keep
            if cow.any():
                cow_rows, cow_cols = rows[cow], old_lens[cow] // bs
                src = table.block_tables[cow_rows, cow_cols].copy()
                dst = g.pool.allocate(src.size)
                table.block_tables[cow_rows, cow_cols] = dst
                g.pool.free(src)  # drops this row's reference; other holders keep the block
                self._pending_copies[i].append((src, dst))
            ids = g.pool.allocate(int(needed.sum()))
            if ids.size:
                block_rows, block_cols = _expand(rows, needed, table.num_blocks[rows])
                table.block_tables[block_rows, block_cols] = ids
            table.kv_lens[rows] = old_lens + counts
            table.num_blocks[rows] = new_blocks
            slots[i] = table.block_tables[tok_rows, pos // bs].astype(np.int64) * bs + pos % bs
        return slots


__all__ = ["KVCacheManager", "SeqId"]
