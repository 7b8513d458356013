"""`KVCacheManager`: the scheduler-facing host API, a coordinator over layer groups.

Predicate/action pairs (`can_admit`/`admit`, `can_append`/`append`) over plain numpy
state. Every action validates everything first and mutates last, so a call that
raises leaves the manager exactly as it was: no half-admitted sequence, no leaked
block.

The manager owns what is common to every layer group: sequence id -> page-table row
(rows move in lockstep in every group), what each row has written (the prefix
cache keys only written blocks), which decode slots hold which ids, and the
`StepMetadata` boundary. Everything per group -- pool, table, pending copies,
growth, the group's metadata, integrity, saved state -- belongs to one
`GroupAllocator` per attention kind (`paged_kv.allocator.groups`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, NewType

import numpy as np

from paged_kv.allocator.arguments import check_count, row_of, rows_and_counts
from paged_kv.allocator.block_pool import BlockPool
from paged_kv.allocator.groups import GroupAllocator, GrowthPlan, group_class
from paged_kv.allocator.hot_path import HotPathMixin
from paged_kv.allocator.page_table import PageTable, expand_runs
from paged_kv.allocator.prefix_cache import PrefixCache
from paged_kv.allocator.manager_commit import CommitMixin
from paged_kv.allocator.manager_prompts import PromptsMixin
from paged_kv.allocator.manager_state import StateMixin
from paged_kv.allocator.manager_swap import SwapMixin
from paged_kv.allocator.seq_ids import check_seq_id, id_list, is_seq_id
from paged_kv.allocator.slot_claims import SlotClaims, SlotHolder
from paged_kv.allocator.step_arrays import FRESH, blocks_for, lengths_and_positions
from paged_kv.allocator.steps import StepLog
from paged_kv.allocator.written import WrittenBlocks
from paged_kv.errors import (
    BatchTooLargeError,
    DuplicateSequenceError,
    InvalidArgumentError,
    InvalidTokenCountError,
    OutOfBlocksError,
    PagedKVError,
    SequenceTooLongError,
    SpecError,
)
from paged_kv.metadata import StepMetadata, bucket
from paged_kv.spec import CacheSpec

if TYPE_CHECKING:
    from paged_kv.allocator.manager_base import TierHooks

SeqId = NewType("SeqId", int)
"""The caller's name for a request: any non-negative Python or numpy integer."""


class KVCacheManager(HotPathMixin, CommitMixin, PromptsMixin, SwapMixin, StateMixin):
    """Maps each sequence's token positions to blocks of the device pages.

    ``append`` and ``step_metadata`` take many sequences at once and do their work
    in numpy over the whole batch; the only per-sequence Python is the id lookup.
    Layers of each attention kind form a group (`CacheSpec.groups`) with its own pool
    and table; a sliding-window or chunked group returns blocks no query can see any
    more to its pool as the sequence grows.
    """

    SAVED_ATTRS = frozenset({"spec", "signature", "groups", "_rows", "_copies", "_forked", "_written", "_slotted",
                             "steps", "_described", "tiers"})
    """Attributes `state` covers. Copies must be committed before saving; ``_forked`` is
    derived on restore; slot claims are rebuilt by restoring the slots; step numbers
    order pending copies and steps in flight, and a restored manager starts with
    none of either (a step described before the save cannot be committed after it).
    ``tiers`` (the `paged_kv.tiers.CacheTiers` attached, if any) belongs to the running
    process: a restored manager has none until tiers are attached again."""

    tiers: TierHooks | None = None
    """The host and disk tiers below the device pool (`paged_kv.tiers.CacheTiers`
    attaches itself), which `admit_prompt` asks for hits the device no longer holds."""

    def __init__(self, spec: CacheSpec, prefix_cache: bool = False):
        """``prefix_cache=True`` keeps released full blocks keyed by their token prefix
        for `admit_prompt` to reuse, in every layer group (see `admit_prompt` for what a
        hit needs in each kind of group)."""
        if not isinstance(spec, CacheSpec):
            raise SpecError(f"KVCacheManager needs a paged_kv.CacheSpec; got {type(spec).__name__} {spec!r:.80}")
        if not isinstance(prefix_cache, (bool, np.bool_)):
            raise InvalidArgumentError(f"prefix_cache={prefix_cache!r} must be True or False")
        self.spec = spec
        self.signature = spec.pool_signature()  # what its metadata is built for (the spec is immutable)
        self.groups: list[GroupAllocator] = [group_class(lg)(spec, i, bool(prefix_cache))
                                             for i, lg in enumerate(spec.groups)]
        self._rows: dict[int, int] = {}
        self._copies = tuple(g.copies for g in self.groups)  # each group's own, listed for the hot path
        # Step numbers (`paged_kv.allocator.steps`), and per row the last step that
        # carried copies: a plain ``commit(seq_ids)`` of that row retires exactly those.
        self.steps = StepLog(self.groups[0].table)
        self._described: dict[int, int] = {}
        # What each row has on the device, so the prefix cache keys only written blocks.
        self._written = WrittenBlocks()
        # Which DecodeSlots hold which ids (releasing one under its slot is refused).
        self._slotted = SlotClaims()
        # Only a fork shares a partially filled block (the prefix cache shares full
        # ones), so until a fork the copy-on-write check is skipped: appends pay
        # nothing for it. Cleared when the last sequence leaves.
        self._forked = False

    @property
    def pool(self) -> BlockPool:
        """The first group's pool (the only one unless some layers are local)."""
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

    @property
    def prefix_cache(self) -> PrefixCache | None:
        """The first group's prefix cache (stats, events, subscribe), or None when disabled.
        Every group keeps its own, keyed by the same chain hashes; query counts agree."""
        return self.groups[0].pool.cache

    # ---- queries -------------------------------------------------------------------
    def __contains__(self, seq_id: object) -> bool:
        return is_seq_id(seq_id) and seq_id in self._rows

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
        if isinstance(group, bool) or not isinstance(group, (int, np.integer)) or not 0 <= group < len(self.groups):
            raise InvalidArgumentError(f"group={group!r} is not a layer-group index: this spec has groups "
                                       f"0..{len(self.groups) - 1} (see CacheSpec.groups)")
        return self.groups[int(group)].table.blocks_of(self._row(seq_id)).copy()

    def num_tokens_stored(self) -> int:
        """Tokens held by all admitted sequences together."""
        return int(self.table.kv_lens.sum())

    # ---- admit, append, release ------------------------------------------------------
    def can_admit(self, num_tokens: int) -> bool:
        """Whether ``admit(new_id, num_tokens)`` would succeed now (False, never an error,
        for a count that is not a positive integer or too long: a predicate answers)."""
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, (int, np.integer)) or num_tokens < 1:
            return False
        try:
            blocks = self.spec.blocks_for(num_tokens)
        except PagedKVError:  # past what a count may be (2**80): admit would refuse it too
            return False
        return blocks <= self.spec.max_blocks_per_seq and all(g.pool.can_allocate(blocks) for g in self.groups)

    def can_append(self, seq_ids: Sequence[int], num_tokens: int | Sequence[int] | np.ndarray = 1) -> bool:
        """Whether ``append(seq_ids, num_tokens)`` would succeed now."""
        try:
            seq_ids = id_list(seq_ids)
            rows, counts = self._rows_and_counts(seq_ids, num_tokens)
            self._plan(rows, counts, seq_ids)
        except PagedKVError:  # unknown or repeated ids, bad counts, too long, out of blocks
            return False
        return True

    def admit(self, seq_id: int, num_tokens: int) -> np.ndarray:
        """Register ``seq_id`` holding its first ``num_tokens`` tokens (the prompt).

        Returns the flat page slot of each of those tokens, in order, for the prefill
        write: ``[num_groups, num_tokens]`` (one row per layer group). Raises `DuplicateSequenceError`, `InvalidTokenCountError`,
        `SequenceTooLongError` or `OutOfBlocksError`, changing nothing.
        """
        slots = self._fast_admit(seq_id, num_tokens)  # one group, no cache; None: not that case
        if slots is not None:
            return slots
        seq_id = self._new_id(seq_id)
        n = check_count(num_tokens, "num_tokens")
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
        return self._fill_new_row(self._add_row(seq_id), n, blocks)

    def append(self, seq_ids: Sequence[int], num_tokens: int | Sequence[int] | np.ndarray = 1) -> np.ndarray:
        """Grow each sequence by ``num_tokens`` (an int, or one count per sequence).

        Allocates the blocks the batch needs in one call per group; a local group
        first returns the blocks no query can see any more. Returns the flat page slot
        of every new token, sequence by sequence in the order given (the concatenation
        vLLM calls ``slot_mapping``), one row per layer group: ``[num_groups,
        sum(num_tokens)]``. All or nothing.
        """
        slots = self._fast_append(seq_ids, num_tokens)  # the common decode step; None: not that case
        if slots is not None:
            return slots
        seq_ids = id_list(seq_ids)
        rows, counts = self._rows_and_counts(seq_ids, num_tokens)
        return self._grow(rows, counts, self._plan(rows, counts, seq_ids))

    def release(self, seq_id: int) -> int:
        """Forget ``seq_id`` and drop its hold on its blocks; returns how many no sequence holds now
        (free, or cached for reuse when the prefix cache keeps them). A sequence in a
        decode slot is released through its `DecodeSlots` (`SlotError` here)."""
        freed = self._fast_release(seq_id)  # nothing shared: no counting; None: not that case
        if freed is not None:
            return freed
        row = self._row(seq_id)
        self._check_not_slotted(seq_id, "release")
        del self._rows[int(seq_id)]
        self._forked &= bool(self._rows)
        end = self._written.keyed_end(row)  # the chain's keyed end: the retention rule
        self._written.forget(row)
        self._described.pop(row, None)
        freed = sum(g.release_row(row, end) for g in self.groups)
        for g in self.groups:
            g.drop_dead_copies()
        return freed

    def fork(self, parent: int, child: int) -> None:
        """Register ``child`` sharing every block ``parent`` holds (parallel sampling,
        beam search). No block is allocated or copied now: the first write into a
        shared, partially filled last block copies that block (see `append`), and a
        block returns to the pool when its last holder is released.
        Raises `UnknownSequenceError` / `DuplicateSequenceError`, changing nothing."""
        prow = self._row(parent)
        child = check_seq_id(child)
        if child in self._rows:
            raise DuplicateSequenceError(f"fork(parent={parent}, child={child}): seq_id={child} is already admitted")
        row = self._add_row(child)
        self._forked = True
        for g in self.groups:
            g.fork_row(prow, row)
        if self.prefix_cache is not None:
            self._written.fork(prow, row, int(self.table.kv_lens[prow]), self.spec.block_size)

    @property
    def num_pending_copies(self) -> int:
        """Copy-on-write block copies not yet committed (every step carries them until then)."""
        return sum(len(c) for c in self._copies)

    # ---- step metadata ----------------------------------------------------------------
    def step_metadata(self, seq_ids: Sequence[int], num_new_tokens: int | Sequence[int] | np.ndarray = 1) -> StepMetadata:
        """Describe a forward pass over ``seq_ids`` whose last ``num_new_tokens`` tokens
        (already added by `admit`/`append`) are written this step.

        Changes no allocation: calling it twice (a retried step) describes the same
        step, and it carries every copy-on-write copy not yet committed. It notes what
        it described, so that `commit` after the step knows which tokens are on the
        device. Shapes are bucketed (see `bucket`).
        """
        if self.plain:  # the common case, in fewer passes (same arrays; see `StepBatch` to reuse them)
            meta = self._plain_step_metadata(seq_ids, num_new_tokens)
            if meta is not None:
                return meta
        seq_ids = id_list(seq_ids)
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
        for g in self.groups:  # a local group may have dropped what an older query needs
            g.check_visible(seq_ids, rows, kv - q)
        B, T = bucket(n, self.spec.max_batch_slots), bucket(int(q.max(initial=1)), self.spec.max_seq_len)
        kv_lens, query_lens, positions = lengths_and_positions(FRESH, kv, q, B, T)  # the one builder's
        step_id = self.steps.next_id()
        if self.num_pending_copies:
            self._described.update(dict.fromkeys(rows.tolist(), step_id))
        groups = tuple(g.metadata(FRESH, rows, kv, q, positions, B, step_id) for g in self.groups)
        step = self.note_step(step_id, list(seq_ids), rows, kv)
        return StepMetadata(kv_lens, query_lens, positions, groups, self.signature, step, self.steps.tag,
                            query_len=T)

    # ---- decode-slot claims (`DecodeSlots` registers the ids it holds) ----------------
    def _check_not_slotted(self, seq_id: int, what: str) -> None:
        self._slotted.check_free(seq_id, what)

    def _slot_owner(self, seq_id: int) -> SlotHolder | None:
        return self._slotted.owner(seq_id)

    def _claim(self, seq_id: int, owner: SlotHolder) -> None:
        self._slotted.claim(seq_id, owner)

    def _unclaim(self, seq_id: int) -> None:
        self._slotted.unclaim(seq_id)

    # ---- internals -----------------------------------------------------------------
    def _row(self, seq_id: object) -> int:
        return row_of(self._rows, seq_id)

    def _new_id(self, seq_id: object) -> int:
        seq_id = check_seq_id(seq_id)
        if seq_id in self._rows:
            raise DuplicateSequenceError(f"seq_id={seq_id} is already admitted; release it first or pick a new id")
        return seq_id

    def _add_row(self, seq_id: int) -> int:
        """A new row, the same in every group's table (rows move in lockstep)."""
        rows = {g.table.add_row() for g in self.groups}
        assert len(rows) == 1, "page-table rows fell out of lockstep"
        self._rows[seq_id] = row = rows.pop()
        return row

    def _rows_and_counts(self, seq_ids: Iterable[int],
                         num_tokens: int | Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return rows_and_counts(self._rows, seq_ids, num_tokens)

    def _plan(self, rows: np.ndarray, counts: np.ndarray, seq_ids: list[int]) -> list[GrowthPlan]:
        """Every group's `GrowthPlan`; `SequenceTooLongError` / `OutOfBlocksError` change nothing."""
        old = self.table.kv_lens[rows].astype(np.int64)
        new_blocks = blocks_for(old + counts, self.spec.block_size)
        too_long = new_blocks > self.spec.max_blocks_per_seq
        if np.any(too_long):
            i = int(np.flatnonzero(too_long)[0])
            raise SequenceTooLongError(
                f"seq_id={seq_ids[i]} would hold {int(old[i] + counts[i])} tokens = {int(new_blocks[i])} "
                f"blocks > max_blocks_per_seq={self.spec.max_blocks_per_seq}"
            )
        return [g.plan(rows, counts, old, new_blocks, self._forked) for g in self.groups]

    def _grow(self, rows: np.ndarray, counts: np.ndarray, plan: list[GrowthPlan]) -> np.ndarray:
        """Apply a validated `_plan` in every group; return slots per group."""
        old = self.table.kv_lens[rows].astype(np.int64)
        tok_rows, pos = expand_runs(rows, counts, old)
        keyed = self.prefix_cache is not None and any(g.local for g in self.groups)
        ends = self._written.keyed_ends(rows) if keyed else None  # for the retention rule
        slots = np.empty((len(self.groups), pos.size), dtype=np.int32)
        for i, (g, p) in enumerate(zip(self.groups, plan)):
            slots[i] = g.grow(rows, counts, old, p, tok_rows, pos, ends)
        return slots


__all__ = ["KVCacheManager", "SeqId"]
