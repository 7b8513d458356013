"""`KVCacheManager`: the scheduler-facing host API.

Predicate/action pairs (`can_admit`/`admit`, `can_append`/`append`) over plain numpy
state. Every action validates everything first and mutates last, so a call that
raises leaves the manager exactly as it was: no half-admitted sequence, no leaked
block.
"""

from __future__ import annotations

import weakref
from collections.abc import Hashable, Iterable, Sequence
from typing import NewType

import numpy as np

from paged_kv.allocator.block_pool import BlockPool
from paged_kv.allocator.hot_path import fast_admit, fast_append, fast_release, fill_new_row, nothing_to_commit, plain
from paged_kv.allocator.step_batch import plain_step_metadata
from paged_kv.allocator.page_table import PageTable
from paged_kv.allocator.prefix_cache import NO_HASH, PrefixCache, chain_hashes
from paged_kv.allocator.pending_copies import PendingCopies
from paged_kv.allocator.swap_record import SwapRecord, check_record
from paged_kv.allocator.written import WrittenBlocks
from paged_kv.errors import (
    PagedKVError,
    BatchTooLargeError,
    DuplicateSequenceError,
    InvalidArgumentError,
    InvalidSequenceIdError,
    InvalidTokenCountError,
    InvalidTokenIdError,
    OutOfBlocksError,
    SequenceTooLongError,
    SlotError,
    SpecError,
    StateError,
    UnknownSequenceError,
)
from paged_kv.metadata import GroupMetadata, StepMetadata, bucket
from paged_kv.spec import NULL_BLOCK, CacheSpec

SeqId = NewType("SeqId", int)
"""The caller's name for a request: any non-negative Python or numpy integer."""

MAX_TOKEN_ID = 2**63 - 1
"""Largest token id a prompt may hold: keys hash ids as int64, so a larger (or a
negative) id would alias another and two different prompts could share a key."""


def _check_seq_id(seq_id) -> int:
    if isinstance(seq_id, bool) or not isinstance(seq_id, (int, np.integer)):
        raise InvalidSequenceIdError(f"seq_id={seq_id!r} must be an integer (got {type(seq_id).__name__})")
    if seq_id < 0:
        raise InvalidSequenceIdError(f"seq_id={seq_id} must be >= 0")
    return int(seq_id)


def check_token_ids(token_ids, what: str) -> np.ndarray:
    """``token_ids`` as a non-empty 1-D int64 array of ids in ``[0, 2**63)``, or `InvalidTokenIdError`."""
    try:
        tokens = np.asarray(token_ids)
    except (ValueError, TypeError):  # ragged nesting
        raise InvalidTokenIdError(f"{what}: token_ids={token_ids!r} is not a 1-D sequence of integers") from None
    if tokens.ndim != 1 or tokens.size < 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise InvalidTokenIdError(
            f"{what}: token_ids must be a non-empty 1-D sequence of integers; got shape {tokens.shape} dtype {tokens.dtype}"
        )
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high > MAX_TOKEN_ID:
        bad = low if low < 0 else high
        raise InvalidTokenIdError(f"{what}: token id {bad} is outside [0, 2**63); token ids are vocabulary indices")
    return tokens.astype(np.int64, copy=False)


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
        self.spec_group = layer_group  # its kind: full, sliding or chunked (`LayerGroup.first_visible`)
        self.window = layer_group.window
        self.pool = BlockPool(layer_group.num_blocks, prefix_cache=prefix_cache)
        self.table = PageTable(spec.max_blocks_per_seq)
        # Flat slot the write drops: one past the last token slot of this group's pages.
        self.pad_slot = layer_group.num_blocks * spec.block_size
        self.block_size = spec.block_size
        self.offsets = np.arange(spec.block_size, dtype=np.int32)  # slot offsets inside a block

    @property
    def local(self) -> bool:
        """Sliding or chunked: the group returns blocks no query can see any more."""
        return self.spec_group.local

    def keep_from(self, rows: np.ndarray, first_query: np.ndarray, block_size: int) -> np.ndarray:
        """First logical block any query at or after ``first_query`` can still see. A
        block straddling the edge (of a window, or of a chunk not a multiple of the
        block size) holds a visible position, so it is kept."""
        if not self.local:
            return self.table.first_block[rows].astype(np.int64)
        return np.maximum(self.spec_group.first_visible(first_query) // block_size, self.table.first_block[rows])


class KVCacheManager:
    """Maps each sequence's token positions to blocks of the device pages.

    ``append`` and ``step_metadata`` take many sequences at once and do their work
    in numpy over the whole batch; the only per-sequence Python is the id lookup.
    Layers with a sliding window, and chunked layers, form their own groups
    (`CacheSpec.groups`) whose blocks no query can see any more (behind the window,
    in earlier chunks: `LayerGroup.first_visible`) go back to that group's pool as the
    sequence grows.
    """

    def __init__(self, spec: CacheSpec, prefix_cache: bool = False):
        """``prefix_cache=True`` keeps released full blocks keyed by their token
        prefix for `admit_prompt` to reuse. Not for models mixing full and sliding
        layers (one group would need the whole chain, the other only its window tail,
        which this cache does not model yet); a model whose layers all slide is one
        group and shares whole chains."""
        if not isinstance(spec, CacheSpec):
            raise SpecError(f"KVCacheManager needs a paged_kv.CacheSpec; got {type(spec).__name__} {spec!r:.80}")
        if not isinstance(prefix_cache, (bool, np.bool_)):
            raise InvalidArgumentError(f"prefix_cache={prefix_cache!r} must be True or False")
        if prefix_cache and spec.chunked_layers:
            raise SpecError(
                f"prefix_cache=True with chunked layers {spec.chunked_layers} is not supported yet: a hit would need "
                "only the blocks of the current chunk, which this cache does not model; build the manager without it"
            )
        if prefix_cache and len(spec.groups) > 1:
            raise SpecError(
                f"prefix_cache=True with sliding-window layers {spec.sliding_layers} mixed with full layers is not "
                "supported yet: build the manager without it, or with every layer full or every layer sliding"
            )
        self.spec = spec
        self.groups = [_Group(spec, g, prefix_cache) for g in range(len(spec.groups))]
        self._rows: dict[int, int] = {}
        # Copy-on-write copies per group, carried by every step until committed.
        self._copies = [PendingCopies() for _ in self.groups]
        # Step descriptions so far, and the last one that carried copies for each row:
        # committing that row's step retires exactly the copies it carried.
        self._descriptions = 0
        self._described: dict[int, int] = {}
        # What each row has on the device, so the prefix cache keys only written blocks.
        self._written = WrittenBlocks()
        # seq_id -> (a weak reference to) the DecodeSlots whose slot holds it: releasing
        # it under the slots would leave a dangling slot that later decodes whoever
        # reuses the id.
        self._slotted: dict[int, weakref.ref] = {}
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
        """The flat slot padding tokens write to: one past the first group's last slot (dropped)."""
        return self.groups[0].pad_slot

    @property
    def membership_epoch(self) -> int:
        """Changes whenever a sequence is added or removed (admit, fork, swap in, release)."""
        return self.groups[0].table.epoch

    # ---- queries -------------------------------------------------------------------
    def __contains__(self, seq_id) -> bool:
        # bool and float hash like ints (True == 1.0 == 1): never alias them to an id.
        return not isinstance(seq_id, (bool, float, np.floating)) and seq_id in self._rows

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def seq_ids(self) -> list[int]:
        """Every admitted sequence, in admission order (a fresh list)."""
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

    def kv_len(self, seq_id: int) -> int:
        """Tokens ``seq_id`` holds: its prompt and output so far."""
        return int(self.table.kv_lens[self._row(seq_id)])

    def block_table(self, seq_id: int, group: int = 0) -> np.ndarray:
        """The blocks ``seq_id`` holds in ``group``, in logical order (a copy)."""
        g = self._check_group(group)
        return self.groups[g].table.blocks_of(self._row(seq_id)).copy()

    def _check_group(self, group) -> int:
        if isinstance(group, bool) or not isinstance(group, (int, np.integer)) or not 0 <= group < len(self.groups):
            raise InvalidArgumentError(
                f"group={group!r} is not a layer-group index: this spec has groups 0..{len(self.groups) - 1} "
                "(see CacheSpec.groups)"
            )
        return int(group)

    def num_tokens_stored(self) -> int:
        """Tokens held by all admitted sequences together."""
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

    def can_append(self, seq_ids: Sequence[int], num_tokens: int | Sequence[int] | np.ndarray = 1) -> bool:
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
    def admit(self, seq_id: int, num_tokens: int) -> np.ndarray:
        """Register ``seq_id`` holding its first ``num_tokens`` tokens (the prompt).

        Returns the flat page slot of each of those tokens, in order, for the prefill
        write: ``[num_groups, num_tokens]`` (one row per layer group). Raises `DuplicateSequenceError`, `InvalidTokenCountError`,
        `SequenceTooLongError` or `OutOfBlocksError`, changing nothing.
        """
        slots = fast_admit(self, seq_id, num_tokens)  # one group, no cache; None: not that case
        if slots is not None:
            return slots
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
        return fill_new_row(self, row, n, blocks)

    def append(self, seq_ids: Sequence[int], num_tokens: int | Sequence[int] | np.ndarray = 1) -> np.ndarray:
        """Grow each sequence by ``num_tokens`` (an int, or one count per sequence).

        Allocates the blocks the batch needs in one call per group; a sliding or chunked
        group first returns the blocks its new tokens cannot see. Returns the flat page slot of
        every new token, sequence by sequence in the order given (the concatenation
        vLLM calls ``slot_mapping``), one row per layer group: ``[num_groups,
        sum(num_tokens)]``. All or nothing.
        """
        slots = fast_append(self, seq_ids, num_tokens)  # the common decode step; None: not that case
        if slots is not None:
            return slots
        seq_ids = _id_list(seq_ids)
        rows, counts = self._rows_and_counts(seq_ids, num_tokens)
        return self._grow(rows, counts, self._plan(rows, counts, seq_ids))

    def release(self, seq_id: int) -> int:
        """Forget ``seq_id`` and drop its hold on its blocks; returns how many no sequence holds now
        (free, or cached for reuse when the prefix cache keeps them). A sequence in a
        decode slot is released through its `DecodeSlots` (`SlotError` here)."""
        freed = fast_release(self, seq_id)  # nothing shared: no counting; None: not that case
        if freed is not None:
            return freed
        row = self._row(seq_id)
        self._check_not_slotted(seq_id, "release")
        del self._rows[int(seq_id)]
        self._forked &= bool(self._rows)
        self._written.forget(row)
        self._described.pop(row, None)
        # Tail first: the prefix cache then evicts a chain's tail before its parents.
        freed = sum(int(g.pool.free_distinct(g.table.remove_row(row)[::-1]).size) for g in self.groups)
        self._drop_dead_copies()
        return freed

    def _check_not_slotted(self, seq_id, what: str) -> None:
        owner = self._slot_owner(int(seq_id))
        if owner is not None:
            slot = owner.slot_of(int(seq_id))
            raise SlotError(
                f"{what}(seq_id={seq_id}): it occupies decode slot {slot}; use slots.release({slot}) "
                f"(or slots.remove({slot}) first) so the slot does not keep a dangling id"
            )

    def _slot_owner(self, seq_id: int):
        """The live `DecodeSlots` holding ``seq_id``, or None (a dropped DecodeSlots holds nothing)."""
        ref = self._slotted.get(seq_id)
        owner = ref() if ref is not None else None
        if owner is None and ref is not None:
            del self._slotted[seq_id]
        return owner

    def _claim(self, seq_id: int, owner) -> None:
        """`DecodeSlots` registers a sequence it puts in a slot (see `_check_not_slotted`).
        Held weakly: slots the caller dropped do not pin their sequences forever."""
        held = self._slot_owner(seq_id)
        if held is not None and held is not owner:
            raise DuplicateSequenceError(f"seq_id={seq_id} already occupies a slot of another DecodeSlots")
        self._slotted[seq_id] = weakref.ref(owner)

    def _unclaim(self, seq_id: int) -> None:
        self._slotted.pop(seq_id, None)

    # ---- commit: the device has run a step ------------------------------------------------
    def commit(self, seq_ids: Sequence[int], num_tokens: int | Sequence[int] | np.ndarray | None = None) -> None:
        """Tell the manager the step last described for ``seq_ids`` (by `step_metadata`
        or `DecodeSlots`) has run: their keys and values are in the pages.

        Call it after every forward pass. It retires that step's copy-on-write copies
        and, with the prefix cache, makes the sequences' newly written full blocks
        hittable: no block is ever offered to another request before it is written.
        Skipping it is safe but wasteful (copies are re-run, nothing gets cached).
        ``num_tokens`` (an int or one per sequence) instead says how many leading
        tokens are written, for pages filled outside a step (your own kernel, a
        contiguous prefill). `UnknownSequenceError` / `InvalidTokenCountError`,
        changing nothing.
        """
        if num_tokens is None and nothing_to_commit(self, seq_ids):
            return  # no copy pending, no prefix cache: a valid commit changes nothing
        seq_ids = _id_list(seq_ids)
        rows = [self._row(s) for s in seq_ids]
        lengths = [None] * len(rows)
        if num_tokens is not None:
            _, counts = self._rows_and_counts(seq_ids, num_tokens)
            kv = self.table.kv_lens[np.asarray(rows, np.int64)] if rows else np.zeros(0, np.int32)
            if np.any(counts > kv):
                i = int(np.flatnonzero(counts > kv)[0])
                raise InvalidTokenCountError(
                    f"commit(seq_id={seq_ids[i]}, num_tokens={int(counts[i])}): it holds only {int(kv[i])} tokens"
                )
            lengths = counts.tolist()
        # Explicit lengths say what some writer put in the pages, not that the last
        # described step (and its copies) ran: only a plain commit retires copies.
        ran = max((self._described.pop(row, 0) for row in rows), default=0) if num_tokens is None else 0
        for g, copies in zip(self.groups, self._copies):
            unpin = copies.retire(ran) if ran else None
            if unpin:
                g.pool.free(np.asarray(unpin, np.int32))
        if self.prefix_cache is not None:
            for row, length in zip(rows, lengths):
                self._written.commit(row, length)
                self._key_written(row)

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
        tokens = check_token_ids(token_ids, "admit_prompt")
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

    def _prompt_plan(self, tokens, hits, chunk) -> tuple[int, int, int]:
        """(tokens to hold now, blocks to allocate, blocks an allocation can take)."""
        cached = len(hits) * self.spec.block_size
        if chunk is None:
            hold = tokens.size
        else:
            chunk = self._check_count(chunk, "chunk")
            if chunk < 1:
                raise InvalidTokenCountError(f"chunk={chunk}: a prefill chunk computes at least 1 token")
            hold = cached + min(chunk, tokens.size - cached)
        pool = self.groups[0].pool
        revived = sum(1 for b in hits if pool.ref_counts[b] == 0)
        return hold, self.spec.blocks_for(hold) - len(hits), pool.num_free - revived

    def can_admit_prompt(self, token_ids: Sequence[int] | np.ndarray, cache_key: Hashable | None = None,
                         chunk: int | None = None) -> bool:
        """Whether ``admit_prompt(new_id, token_ids, cache_key, chunk)`` would succeed now."""
        try:
            tokens, _, hits = self._prompt(token_ids, cache_key)
            _, need, free = self._prompt_plan(tokens, hits, chunk)
        except (SpecError, InvalidTokenCountError, SequenceTooLongError):
            return False
        return need <= free

    def admit_prompt(self, seq_id: int, token_ids: Sequence[int] | np.ndarray, cache_key: Hashable | None = None,
                     chunk: int | None = None) -> int:
        """Admit ``seq_id`` with prompt ``token_ids``, reusing the longest cached chain of
        full blocks with the same tokens (and the same ``cache_key``: an adapter name,
        a tenant salt). Returns how many leading tokens are cached; compute the rest:
        ``step_metadata([seq_id], kv_len(seq_id) - cached)``, then `commit`.

        Only blocks whose writing step was committed are ever hit, and this prompt's
        own full blocks become hittable when its step is committed (see
        `paged_kv.allocator.written`). ``chunk``: hold only the cached tokens plus the
        next ``chunk`` prompt tokens now and `append` the rest later (chunked
        prefill); the prompt's keys are kept, so each committed chunk's full blocks are
        cached. All or nothing: `DuplicateSequenceError`, `InvalidTokenIdError`,
        `InvalidTokenCountError`, `SequenceTooLongError`, `OutOfBlocksError`,
        `SpecError` (cache off)."""
        seq_id = _check_seq_id(seq_id)
        if seq_id in self._rows:
            raise DuplicateSequenceError(f"seq_id={seq_id} is already admitted; release it first or pick a new id")
        tokens, hashes, hits = self._prompt(token_ids, cache_key)
        hold, need, free = self._prompt_plan(tokens, hits, chunk)
        if need > free:
            raise OutOfBlocksError(need, free, f"admit_prompt(seq_id={seq_id}, {tokens.size} tokens, {len(hits)} cached blocks)")
        g = self.groups[0]
        cache, table = g.pool.cache, g.table
        row = table.add_row()
        self._rows[seq_id] = row
        h = len(hits)
        g.pool.revive(np.asarray(hits, dtype=np.int32))
        total = self.spec.blocks_for(hold)
        table.block_tables[row, :h] = hits
        table.block_tables[row, h:total] = g.pool.allocate(need)
        table.kv_lens[row], table.num_blocks[row], table.first_block[row] = hold, total, 0
        self._written.start(row, hashes, h, self.spec.block_size)
        cache.queries += 1
        cache.query_tokens += int(tokens.size)
        cache.hit_tokens += h * self.spec.block_size
        cache.blocks_reused += h
        return h * self.spec.block_size

    def cache_tokens(self, seq_id: int, token_ids: Sequence[int] | np.ndarray, cache_key: Hashable | None = None) -> int:
        """Key ``seq_id``'s full blocks by its tokens so far (prompt and output), so a
        later prompt that continues this conversation hits them after release (multi-
        turn chat). ``token_ids`` must be the sequence's tokens, ``kv_len`` of them.
        Blocks already written (committed) are keyed now, the rest when their step is
        committed. Returns how many blocks were newly keyed now."""
        row = self._row(seq_id)
        self._require_prefix_cache()
        n = int(self.table.kv_lens[row])
        tokens = check_token_ids(token_ids, f"cache_tokens(seq_id={seq_id})")
        if tokens.size != n:
            raise InvalidTokenCountError(
                f"cache_tokens(seq_id={seq_id}): token_ids holds {tokens.size} tokens; need the sequence's {n} tokens "
                "(append generated tokens with manager.append before caching them)"
            )
        self._written.hashes[row] = chain_hashes(tokens, self.spec.block_size, n // self.spec.block_size, cache_key)
        self._written.keyed[row] = 0  # blocks keyed before keep their keys: store() skips them
        return self._key_written(row)

    def _key_written(self, row: int) -> int:
        """Key ``row``'s full, written, hashed blocks not keyed yet; returns how many were new."""
        start, stop = self._written.keyable(row, self.spec.block_size)
        if stop <= start:
            return 0
        cache, table, hashes = self.prefix_cache, self.table, self._written.hashes[row]
        stored = 0
        # A sliding window may already have returned the first blocks (their entries are
        # the null block): those cannot be keyed now, and a chain missing its head is
        # never matched, so the rest are keyed only for their own record.
        for i in range(max(start, int(table.first_block[row])), stop):
            parent = hashes[i - 1] if i else NO_HASH
            stored += cache.store(int(table.block_tables[row, i]), hashes[i], parent)
        self._written.keyed[row] = stop
        return stored

    def fork(self, parent: int, child: int) -> None:
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
        if self.prefix_cache is not None:
            self._written.fork(prow, row, int(self.table.kv_lens[prow]), self.spec.block_size)

    @property
    def num_pending_copies(self) -> int:
        """Copy-on-write block copies not yet committed (every step carries them until then)."""
        return sum(len(c) for c in self._copies)

    def _drop_dead_copies(self) -> None:
        """Forget copies into blocks nobody holds any more (see `PendingCopies.drop_dead`)."""
        for g, copies in zip(self.groups, self._copies):
            if len(copies):
                unpin = copies.drop_dead(g.pool.ref_counts)
                if unpin:
                    g.pool.free(np.asarray(unpin, np.int32))

    # ---- swapping (host side; `paged_kv.swap` moves the bytes) --------------------------
    def swap_record(self, seq_id: int) -> SwapRecord:
        """What `swap_out` would return, without releasing anything: the blocks to copy.
        `SlotError` while it is in a decode slot; `StateError` while a copy-on-write
        copy into one of its blocks has not been committed (the pages do not hold
        those tokens yet)."""
        row = self._row(seq_id)
        self._check_not_slotted(seq_id, "swap_out")
        for g, copies in zip(self.groups, self._copies):
            if len(copies) and copies.touches(g.table.blocks_of(row)):
                raise StateError(
                    f"swap(seq_id={seq_id}): a copy-on-write copy into its blocks has not run yet; run and commit "
                    "the step that carries it (manager.commit) before swapping it out"
                )
        return SwapRecord(
            seq_id=int(seq_id),
            num_tokens=int(self.table.kv_lens[row]),
            first_blocks=tuple(int(g.table.first_block[row]) for g in self.groups),
            blocks=tuple(g.table.blocks_of(row).copy() for g in self.groups),
        )

    def swap_out(self, seq_id: int) -> SwapRecord:
        """Release ``seq_id`` and return the record `swap_in` needs to bring it back.

        Host bookkeeping only: copy the record's blocks off the device before anything
        else is written to the pool (`paged_kv.swap.swap_out` does both in order).
        """
        record = self.swap_record(seq_id)
        self.release(seq_id)
        return record

    def can_swap_in(self, record: SwapRecord) -> bool:
        """Whether ``swap_in(record)`` would succeed now."""
        try:
            seq_id, _, _, counts = check_record(record, self.spec)
        except PagedKVError:
            return False
        return seq_id not in self._rows and all(g.pool.can_allocate(n) for g, n in zip(self.groups, counts))

    def swap_in(self, record: SwapRecord) -> tuple[np.ndarray, ...]:
        """Re-admit a swapped-out sequence into fresh blocks, one set per group.

        Returns the new block ids per group, in logical order, for the copy back in.
        The sequence resumes with its length, and a sliding or chunked group with the
        same first block as before. The record is checked against this manager's spec first
        (`check_record`: `InvalidArgumentError`, `InvalidSequenceIdError`,
        `InvalidTokenCountError`, `SequenceTooLongError`); then `DuplicateSequenceError`
        or `OutOfBlocksError`. Any failure changes nothing. The blocks count as written
        once the bytes are back: `paged_kv.swap_in` commits them; a caller copying
        the bytes itself calls ``commit([seq_id], num_tokens)``.
        """
        seq_id, num_tokens, firsts, counts = check_record(record, self.spec)
        if seq_id in self._rows:
            raise DuplicateSequenceError(f"seq_id={seq_id} is admitted again; release it before swapping the old one in")
        for g, n in zip(self.groups, counts):
            if not g.pool.can_allocate(n):
                raise OutOfBlocksError(n, g.pool.num_free, f"swap_in(seq_id={seq_id})")
        row = {g.table.add_row() for g in self.groups}.pop()
        self._rows[seq_id] = row
        total = self.spec.blocks_for(num_tokens)
        new = []
        for g, first, n in zip(self.groups, firsts, counts):
            ids = g.pool.allocate(n)
            g.table.block_tables[row, first:total] = ids
            g.table.first_block[row] = first
            g.table.num_blocks[row] = total
            g.table.kv_lens[row] = num_tokens
            new.append(ids)
        return tuple(new)

    # ---- step metadata ----------------------------------------------------------------
    def step_metadata(self, seq_ids: Sequence[int], num_new_tokens: int | Sequence[int] | np.ndarray = 1) -> StepMetadata:
        """Describe a forward pass over ``seq_ids`` whose last ``num_new_tokens`` tokens
        (already added by `admit`/`append`) are written this step.

        Changes no allocation: calling it twice (a retried step) describes the same
        step, and it carries every copy-on-write copy not yet committed. It notes what
        it described, so that `commit` after the step knows which tokens are on the
        device. Shapes are bucketed (see `bucket`).
        """
        if plain(self):  # the common case, in fewer passes (same arrays; see `StepBatch` to reuse them)
            meta = plain_step_metadata(self, seq_ids, num_new_tokens)
            if meta is not None:
                return meta
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
        self._descriptions += 1
        if self.num_pending_copies:
            self._described.update(dict.fromkeys(rows.tolist(), self._descriptions))
        groups = tuple(
            self._group_metadata(g, rows, kv - q, positions[:n], valid[:n], B, *self._issue_copies(i))
            for i, g in enumerate(self.groups)
        )
        if self.prefix_cache is not None:
            self._written.describe(rows.tolist(), kv.tolist())
        return StepMetadata(kv_lens, query_lens, positions, groups, self.spec.pool_signature())

    def _issue_copies(self, g: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every pending copy of group ``g`` (bucketed; see `PendingCopies.issue`)."""
        copies = self._copies[g]
        if not len(copies):
            empty = np.zeros(0, np.int32)
            return empty, empty, empty
        return copies.issue(self._descriptions, self.spec.groups[g].num_blocks, 1)

    def _group_metadata(self, g: _Group, rows, first_query, positions, valid, B, copy_src, copy_dst,
                        copy_len) -> GroupMetadata:
        """The tables one group's views need: the blocks from the first one this
        step's queries can see to the last one held."""
        bs = self.spec.block_size
        n = rows.size
        table = g.table
        first = g.keep_from(rows, first_query, bs) if g.local else np.zeros(n, np.int64)
        width = table.num_blocks[rows] - first
        W = bucket(int(width.max(initial=1)), self.spec.max_blocks_per_seq)
        # Index only the columns used (W per row, T per row), never whole rows of
        # max_blocks_per_seq: the step's host cost stays O(batch x (W + T)).
        block_tables = np.full((B, W), NULL_BLOCK, dtype=np.int32)
        if not g.local:
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
        return GroupMetadata(block_tables, slot_mapping, start, copy_src, copy_dst, copy_len)

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
            # A pending copy keeps its writer's reference on the source block (a pin).
            held = np.concatenate([held, np.asarray(self._copies[i].pinned(), np.int32)])
            refs = np.bincount(held, minlength=g.pool.num_blocks).astype(np.int32)
            if not np.array_equal(refs, g.pool.ref_counts):
                bad = np.flatnonzero(refs != g.pool.ref_counts)
                raise AssertionError(
                    f"group {i} blocks {bad.tolist()}: table references {refs[bad].tolist()} "
                    f"!= ref counts {g.pool.ref_counts[bad].tolist()}"
                )
            for src, dst, length in self._copies[i].state():
                if g.pool.ref_counts[dst] < 1 or g.pool.ref_counts[src] < 1 or not 0 < length < bs:
                    raise AssertionError(f"group {i}: pending copy {src}->{dst} ({length} slots) is stale")
            if g.local and rows.size:
                # Never trimmed a block the last token held (a step may still describe
                # it as a query) can see: inside its window or its chunk.
                limit = g.spec_group.first_visible(np.maximum(g.table.kv_lens[rows].astype(np.int64) - 1, 0)) // bs
                if np.any(g.table.first_block[rows] > limit):
                    raise AssertionError(f"group {i}: a block a {g.spec_group.kind} query can see was returned to the pool")

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
            tuple(c.state() for c in self._copies),
            self._written.state(),
            tuple(sorted(s for s in list(self._slotted) if self._slot_owner(s) is not None)),
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
        Blocks a sliding or chunked group returns in the same call count as free.
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
            cow = self._copy_on_write_rows(len(plan), rows, counts, old)
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

    def _copy_on_write_rows(self, gi: int, rows, counts, old) -> np.ndarray:
        """Rows whose write lands in a shared, partially filled last block: each gets a
        copy of that block first. Full shared blocks are never written, so never copied.

        When every holder of a block writes in the same call, the last of them keeps
        the original (nobody else needs it), so k writers of a block held k times make
        k - 1 copies. Pins of pending copies are references but not holders: a block
        whose only other reference is a pin is the writer's own.
        """
        g = self.groups[gi]
        bs = self.spec.block_size
        cow = np.zeros(rows.size, dtype=bool)
        if not self._forked:
            return cow
        partial = (counts > 0) & (old % bs != 0)
        if not partial.any():
            return cow
        idx = np.flatnonzero(partial)
        last = g.table.block_tables[rows[idx], old[idx] // bs]
        holders = g.pool.ref_counts[last] - self._copies[gi].pins(last)
        shared = holders > 1
        if not shared.any():
            return cow
        idx, last = idx[shared], last[shared]
        order = np.argsort(last, kind="stable")
        blocks, starts, writers = np.unique(last[order], return_index=True, return_counts=True)
        holders = g.pool.ref_counts[blocks] - self._copies[gi].pins(blocks)
        copies = np.where(writers >= holders, writers - 1, writers)
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
                # The row's reference on src becomes the copy's pin (released at commit).
                self._copies[i].add(src, dst, old_lens[cow] % bs)
            ids = g.pool.allocate(int(needed.sum()))
            if ids.size:
                block_rows, block_cols = _expand(rows, needed, table.num_blocks[rows])
                table.block_tables[block_rows, block_cols] = ids
            table.kv_lens[rows] = old_lens + counts
            table.num_blocks[rows] = new_blocks
            slots[i] = table.block_tables[tok_rows, pos // bs].astype(np.int64) * bs + pos % bs
        self._drop_dead_copies()  # a local group's trim may have freed a pending copy's destination
        return slots


__all__ = ["KVCacheManager", "SeqId"]
