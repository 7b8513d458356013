"""`DecodeSlots`: a fixed-size decode batch that sequences move in and out of.

Continuous batching keeps a decode batch of ``B`` slots running while requests
finish at different times: a finished sequence leaves its slot, a freshly
prefilled one takes it. With a paged cache a sequence's keys and values never
move: it keeps its page-table row from `KVCacheManager.admit` to
`KVCacheManager.release`, so binding it to a slot only records *which row is in
which slot* (host bookkeeping, no device copy). EasyDeL's contiguous
``TransformerCache.insert(other, slot)`` copies ``other``'s whole cache into the
slot's ``max_seq_len`` rows instead.

Every step's `StepMetadata` has exactly ``B`` rows, row ``b`` being slot ``b``;
an empty slot is a padding row (``kv_len`` 0, null block tables, dropped write
slots), which attends to nothing and writes nothing. The batch shape is therefore
fixed and a jitted decode step compiles once per block-table-width bucket, never
once per number of running sequences.

Every action validates first and mutates last: a call that raises leaves the slots
(and the manager) exactly as they were.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from paged_kv.allocator.saved_state import check_captured, take
from paged_kv.errors import (
    CheckpointError,
    DuplicateSequenceError,
    InvalidTokenCountError,
    PagedKVError,
    SlotError,
    SpecError,
    UnknownSequenceError,
)
from paged_kv.allocator.seq_ids import check_seq_id, is_seq_id
from paged_kv.allocator.step_arrays import FRESH, in_slots
from paged_kv.allocator.steps import Step
from paged_kv.batch.step_batch import StepBatch
from paged_kv.metadata import StepMetadata, pad_slot

if TYPE_CHECKING:  # annotations only: both import this module
    from paged_kv.allocator.manager import KVCacheManager
    from paged_kv.spec import CacheSpec


def slot_step_metadata(manager: KVCacheManager, slot_seq_ids: Sequence[int | None],
                       num_new_tokens: int | Sequence[int] | np.ndarray = 1) -> StepMetadata:
    """`StepMetadata` with one row per slot: row ``b`` describes ``slot_seq_ids[b]``.

    ``slot_seq_ids`` has one entry per slot, ``None`` for an empty slot (a padding
    row: ``kv_len`` 0, ``query_len`` 0, null block tables, write slots the scatter
    drops). ``num_new_tokens``: an int for every occupied slot, or one count per
    slot (entries of empty slots are ignored). The batch size is ``len(slot_seq_ids)``
    whatever the number of occupied slots; the token count ``T`` and each group's
    table width ``W`` are bucketed from the occupied rows exactly as
    `KVCacheManager.step_metadata` buckets them (it builds the occupied rows; they
    are then placed in slot order). Pure: reads the manager, changes nothing.
    """
    from paged_kv.allocator.manager import KVCacheManager

    if not isinstance(manager, KVCacheManager):
        raise SpecError(f"slot_step_metadata needs a KVCacheManager; got {type(manager).__name__}")
    spec = manager.spec
    if isinstance(slot_seq_ids, (str, bytes)) or not hasattr(slot_seq_ids, "__iter__"):
        raise SlotError(f"slot_seq_ids={slot_seq_ids!r} must be one entry per slot: a sequence id or None")
    slot_seq_ids = list(slot_seq_ids)
    num_slots = len(slot_seq_ids)
    if num_slots < 1:
        raise SlotError("slot_step_metadata needs at least one slot")
    occupied = [b for b, s in enumerate(slot_seq_ids) if s is not None]
    ids: list[int] = [slot_seq_ids[b] for b in occupied]  # type: ignore[misc]  # the occupied slots: no None
    try:
        per_slot = np.asarray(num_new_tokens)
    except (ValueError, TypeError):  # a ragged nested list
        raise InvalidTokenCountError(f"num_new_tokens={num_new_tokens!r} is not an int or one count per slot") from None
    if per_slot.ndim == 0:
        counts = num_new_tokens
    else:
        if per_slot.shape != (num_slots,):
            raise InvalidTokenCountError(
                f"num_new_tokens has shape {per_slot.shape}; need one count per slot ({num_slots},) or an int"
            )
        counts = per_slot[occupied]
    meta = manager.step_metadata(ids, counts) if ids else None
    return in_slots(FRESH, meta, occupied, num_slots, _pads(spec), spec.pool_signature(),
                    None if meta is None else meta.step, manager.steps.tag)


def _pads(spec: CacheSpec) -> list[int]:
    """Each layer group's padding slot."""
    return [pad_slot(spec, g) for g in range(len(spec.groups))]


class _SlotSeqIds(list[int | None]):
    """`DecodeSlots.seq_ids`: a plain list that can also be called, as the method it was."""

    def __call__(self) -> list[int | None]:
        warnings.warn("DecodeSlots.seq_ids is a property now; write slots.seq_ids, not slots.seq_ids()",
                      DeprecationWarning, stacklevel=2)
        return list(self)


class DecodeSlots:
    """Which admitted sequence occupies each of the ``num_slots`` decode-batch slots.

    ``num_slots`` defaults to ``spec.max_batch_slots`` (and may not exceed it). The
    manager stays the owner of every sequence's blocks: `insert` and `remove` never
    allocate or free; `release` is `remove` followed by `KVCacheManager.release`.
    """

    def __init__(self, manager: KVCacheManager, num_slots: int | None = None) -> None:
        from paged_kv.allocator.manager import KVCacheManager

        if not isinstance(manager, KVCacheManager):
            raise SpecError(f"DecodeSlots needs a KVCacheManager; got {type(manager).__name__}")
        cap = manager.spec.max_batch_slots
        if num_slots is None:
            num_slots = cap
        if isinstance(num_slots, bool) or not isinstance(num_slots, (int, np.integer)) or not 1 <= num_slots <= cap:
            raise SpecError(f"num_slots={num_slots!r} must be an integer in [1, max_batch_slots={cap}]")
        self.manager = manager
        self._seqs: list[int | None] = [None] * int(num_slots)
        self._slot_of: dict[int, int] = {}
        self._batch = StepBatch(manager)  # transient: the decode step's persistent rows
        self._pads = _pads(manager.spec)  # each group's padding slot

    # ---- queries -------------------------------------------------------------------
    @property
    def num_slots(self) -> int:
        """Rows of every decode step's metadata, occupied or not."""
        return len(self._seqs)

    def __len__(self) -> int:
        """Number of occupied slots."""
        return len(self._slot_of)

    def __contains__(self, seq_id: object) -> bool:
        return is_seq_id(seq_id) and seq_id in self._slot_of

    def free_slots(self) -> list[int]:
        """Empty slots, lowest first."""
        return [b for b, s in enumerate(self._seqs) if s is None]

    def occupied(self) -> list[tuple[int, int]]:
        """``(slot, seq_id)`` of every occupied slot, in slot order."""
        return [(b, s) for b, s in enumerate(self._seqs) if s is not None]

    @property
    def seq_ids(self) -> list[int | None]:
        """One entry per slot: its sequence, or ``None`` (the row layout of `step_metadata`).

        A property, like `KVCacheManager.seq_ids`; a fresh list each time. The old
        method form ``slots.seq_ids`` still works and warns (`DeprecationWarning`).
        """
        return _SlotSeqIds(self._seqs)

    def active_mask(self) -> np.ndarray:
        """bool ``[num_slots]``: True where a slot holds a sequence."""
        return np.array([s is not None for s in self._seqs], dtype=bool)

    def seq_at(self, slot: int) -> int | None:
        """The sequence in ``slot``, or ``None`` if it is empty."""
        return self._seqs[self._check_slot(slot)]

    def slot_of(self, seq_id: int) -> int:
        """The slot ``seq_id`` occupies; `UnknownSequenceError` if it is in none."""
        try:
            if not is_seq_id(seq_id):  # True == 1.0 == 1 hash alike: never alias seq 1
                raise KeyError(seq_id)
            return self._slot_of[seq_id]
        except (KeyError, TypeError):
            raise UnknownSequenceError(
                f"seq_id={seq_id!r} is in no decode slot (occupied: {self.occupied()})"
            ) from None

    # ---- predicates ----------------------------------------------------------------
    def can_insert(self, seq_id: int, slot: int | None = None) -> bool:
        """Whether ``insert(seq_id, slot)`` would succeed now."""
        try:
            self._check_insert(seq_id, slot)
        except PagedKVError:
            return False
        return True

    def can_decode(self) -> bool:
        """Whether `decode_step` would succeed now (every occupied sequence can grow by one)."""
        ids = [s for s in self._seqs if s is not None]
        return not ids or self.manager.can_append(ids, 1)

    # ---- actions -------------------------------------------------------------------
    def insert(self, seq_id: int, slot: int | None = None) -> int:
        """Bind admitted ``seq_id`` to ``slot`` (default: the lowest free slot); returns the slot.

        No keys or values move: the sequence keeps its page-table row. Raises
        `SlotError` (slot out of range, taken, or no slot free),
        `UnknownSequenceError` (not admitted) or `DuplicateSequenceError` (already
        in a slot), changing nothing.
        """
        seq_id, slot = self._check_insert(seq_id, slot)
        self.manager._claim(seq_id, self)
        self._seqs[slot] = seq_id
        self._slot_of[seq_id] = slot
        return slot

    def _occupant(self, slot: int) -> tuple[int, int]:
        """The checked slot and the sequence in it; `SlotError` if it is empty."""
        slot = self._check_slot(slot)
        seq_id = self._seqs[slot]
        if seq_id is None:
            raise SlotError(f"slot={slot} is empty; occupied slots: {[b for b, _ in self.occupied()]}")
        return slot, seq_id

    def remove(self, slot: int) -> int:
        """Empty ``slot`` and return the sequence that was in it.

        Only the slot changes: the sequence stays admitted with its blocks and its
        length, so it can be inserted again, swapped out or released with
        `KVCacheManager.release`. To finish a sequence, use `release` instead."""
        slot, seq_id = self._occupant(slot)
        self._seqs[slot] = None
        del self._slot_of[seq_id]
        self.manager._unclaim(seq_id)
        return seq_id

    def release(self, slot: int) -> int:
        """Empty ``slot`` and release its sequence: `remove` then `KVCacheManager.release`,
        which forgets the sequence and frees its blocks. Returns the sequence id."""
        slot, seq_id = self._occupant(slot)
        if seq_id not in self.manager:
            raise UnknownSequenceError(
                f"slot={slot} holds seq_id={seq_id}, which the manager no longer holds; remove({slot}) it instead"
            )
        self.remove(slot)
        self.manager.release(seq_id)
        return seq_id

    def step_metadata(self, num_new_tokens: int | Sequence[int] | np.ndarray = 1) -> StepMetadata:
        """Metadata for a step over all slots (row ``b`` = slot ``b``) whose last
        ``num_new_tokens`` tokens per occupied slot are already appended. Pure."""
        return slot_step_metadata(self.manager, self._seqs, num_new_tokens)

    def decode_step(self) -> StepMetadata:
        """Append one token to every occupied slot's sequence and describe the step.

        One batched `KVCacheManager.append` (all or nothing: `OutOfBlocksError` or
        `SequenceTooLongError` leave everything unchanged), then `step_metadata`:
        ``num_slots`` rows whatever the number of running sequences, so the decode
        step's shapes change only with the table-width bucket. Feed row ``b`` the
        next token of ``seq_at(b)`` (anything for an empty slot).
        """
        occupied = [b for b, s in enumerate(self._seqs) if s is not None]
        if not occupied:
            return self.step_metadata(1)
        # The persistent batch appends and describes the occupied rows in one pass
        # (in place while the same sequences decode); they are then spread over the slots.
        batch = self._batch
        meta = batch.decode([self._seqs[b] for b in occupied])  # type: ignore[misc]  # occupied: no None
        # The batch's rows placed in their slots, in fresh arrays: the caller may hand them
        # to a jitted call as they are (on CPU, jit reads numpy arguments in place and
        # later: reused buffers would be overwritten under it).
        return in_slots(FRESH, meta, occupied, len(self._seqs), self._pads, meta.built_for, batch.last_step,
                        self.manager.steps.tag)

    def commit(self, step: Step | StepMetadata | None = None) -> None:
        """`KVCacheManager.commit` of ``step`` (by default the occupied slots' last
        described step): call it after the step ran (it retires copy-on-write copies and
        lets the prefix cache key what was written). With steps in flight, pass the
        ``meta.step`` of the step that ran."""
        if step is None:
            self.manager.commit([s for s in self._seqs if s is not None])
        else:
            self.manager.commit(step)

    def slot_for(self, seq_id: int, slot: int | None = None) -> int:
        """The slot ``insert(seq_id, slot)`` would take once ``seq_id`` is admitted (for a
        caller that admits and writes it first, e.g. `paged_kv.insertion.insert_prefill_slot`):
        `SlotError` / `InvalidSequenceIdError` / `DuplicateSequenceError`, changing nothing."""
        slot = self._check_free_slot(slot)
        check_seq_id(seq_id)
        if seq_id in self._slot_of:
            raise DuplicateSequenceError(f"seq_id={seq_id} already occupies slot {self._slot_of[seq_id]}")
        return slot

    # ---- integrity -----------------------------------------------------------------
    def check_integrity(self) -> None:
        """Raise AssertionError unless every occupied slot holds a distinct admitted sequence
        and the slot -> sequence and sequence -> slot maps agree."""
        occupied = self.occupied()
        seqs = [s for _, s in occupied]
        if len(set(seqs)) != len(seqs):
            raise AssertionError(f"a sequence occupies two slots: {occupied}")
        if dict((s, b) for b, s in occupied) != self._slot_of:
            raise AssertionError(f"slot map {occupied} and sequence map {self._slot_of} disagree")
        missing = [(b, s) for b, s in occupied if s not in self.manager]
        if missing:
            raise AssertionError(f"slots hold sequences the manager does not hold: {missing}")
        unclaimed = [(b, s) for b, s in occupied if self.manager._slot_owner(s) is not self]
        if unclaimed:
            raise AssertionError(f"the manager does not know these slots hold {unclaimed}: it could release them")

    def snapshot(self) -> tuple[int | None, ...]:
        """A comparable copy of the slot state."""
        return tuple(self._seqs)

    # ---- saved state (paged_kv.checkpoint) ------------------------------------------
    SAVED_ATTRS = frozenset({"manager", "_seqs", "_slot_of", "_batch", "_pads"})
    """Attributes `state` covers (``manager`` is the one restored alongside; ``_batch``
    is transient: a restored one starts empty; ``_pads`` follow from the spec)."""

    def state(self) -> dict[str, np.ndarray]:
        """``slot_of``: ``(seq_id, slot)`` pairs in insertion order (``num_slots`` is the caller's to keep)."""
        check_captured(self, self.SAVED_ATTRS)
        return {"slot_of": np.array(list(self._slot_of.items()), np.int64).reshape(-1, 2)}

    @classmethod
    def from_state(cls, manager: KVCacheManager, num_slots: int, state: dict[str, np.ndarray]) -> DecodeSlots:
        """Slots over ``manager`` as `state` describes them, checked by `check_integrity`;
        `CheckpointError` for a malformed or inconsistent state."""
        if isinstance(num_slots, bool) or not isinstance(num_slots, int):
            # Never fall back to the default size: that would change the batch shape.
            raise CheckpointError(f"num_slots={num_slots!r} is not an integer")
        try:
            slots = cls(manager, num_slots)
        except PagedKVError as exc:
            raise CheckpointError(f"saved slots num_slots={num_slots!r} are invalid: {exc}") from exc
        for seq_id, slot in take(state, "slot_of", np.int64, (None, 2)).tolist():
            if not 0 <= slot < slots.num_slots or slots._seqs[slot] is not None or seq_id in slots._slot_of:
                raise CheckpointError(f"slot_of puts seq_id={seq_id} in slot {slot}, which is out of range "
                                      f"[0, {slots.num_slots}), taken, or a second slot of that sequence")
            try:
                slots.insert(seq_id, slot)
            except PagedKVError as exc:
                raise CheckpointError(f"slot_of cannot be restored: {exc}") from exc
        try:
            slots.check_integrity()
        except AssertionError as exc:
            raise CheckpointError(f"the restored decode slots are inconsistent: {exc}") from exc
        return slots

    # ---- internals -----------------------------------------------------------------
    def _check_slot(self, slot: object) -> int:
        if isinstance(slot, bool) or not isinstance(slot, (int, np.integer)):
            raise SlotError(f"slot={slot!r} must be an integer (got {type(slot).__name__})")
        if not 0 <= slot < len(self._seqs):
            raise SlotError(f"slot={slot} is out of range [0, {len(self._seqs)})")
        return int(slot)

    def _check_free_slot(self, slot: int | None) -> int:
        if slot is None:
            free = self.free_slots()
            if not free:
                raise SlotError(f"all {len(self._seqs)} slots are occupied; remove or release one first")
            return free[0]
        slot = self._check_slot(slot)
        if self._seqs[slot] is not None:
            raise SlotError(
                f"slot={slot} is taken by seq_id={self._seqs[slot]}; free slots: {self.free_slots()}"
            )
        return slot

    def _check_insert(self, seq_id: int, slot: int | None) -> tuple[int, int]:
        if slot is not None:
            self._check_slot(slot)
        if not is_seq_id(seq_id) or seq_id not in self.manager:
            raise UnknownSequenceError(f"seq_id={seq_id!r} is not admitted; admit (and prefill) it before insert")
        seq_id = int(seq_id)
        if seq_id in self._slot_of:
            raise DuplicateSequenceError(f"seq_id={seq_id} already occupies slot {self._slot_of[seq_id]}")
        return seq_id, self._check_free_slot(slot)


__all__ = ["DecodeSlots", "SlotError", "slot_step_metadata"]
