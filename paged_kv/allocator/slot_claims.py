"""`SlotClaims`: which `DecodeSlots` holds which sequence id, as the manager sees it.

Why the manager must know: releasing or swapping out a sequence that sits in a
decode slot would leave the slot naming an id the manager no longer holds, and the
next decode step would act for whoever reuses that id. So `DecodeSlots` claims the
ids it holds and the manager refuses to release them behind its back. Claims are
weak references: slots the caller dropped pin nothing.
"""

from __future__ import annotations

import weakref
from typing import Protocol

from paged_kv.errors import DuplicateSequenceError, SlotError


class SlotHolder(Protocol):
    """What a claim names: a `paged_kv.DecodeSlots` (which imports the allocator)."""

    def slot_of(self, seq_id: int) -> int: ...


class SlotClaims:
    """seq_id -> a weak reference to the `DecodeSlots` whose slot holds it."""

    def __init__(self) -> None:
        self._owners: dict[int, weakref.ref[SlotHolder]] = {}

    def __contains__(self, seq_id: object) -> bool:
        """Whether ``seq_id`` may be claimed (a dead owner counts: `owner` then clears it)."""
        return seq_id in self._owners

    def __len__(self) -> int:
        return len(self._owners)

    def owner(self, seq_id: int) -> SlotHolder | None:
        """The live `DecodeSlots` holding ``seq_id``, or None (a dropped DecodeSlots holds nothing)."""
        ref = self._owners.get(seq_id)
        owner = ref() if ref is not None else None
        if owner is None and ref is not None:
            del self._owners[seq_id]
        return owner

    def claim(self, seq_id: int, owner: SlotHolder) -> None:
        """``owner`` puts ``seq_id`` in one of its slots; `DuplicateSequenceError` if other slots hold it."""
        held = self.owner(seq_id)
        if held is not None and held is not owner:
            raise DuplicateSequenceError(f"seq_id={seq_id} already occupies a slot of another DecodeSlots")
        self._owners[seq_id] = weakref.ref(owner)

    def unclaim(self, seq_id: int) -> None:
        """The slots no longer hold ``seq_id``."""
        self._owners.pop(seq_id, None)

    def check_free(self, seq_id: int, what: str) -> None:
        """`SlotError` naming the slot if ``seq_id`` sits in a live decode slot."""
        owner = self.owner(int(seq_id))
        if owner is not None:
            slot = owner.slot_of(int(seq_id))
            raise SlotError(
                f"{what}(seq_id={seq_id}): it occupies decode slot {slot}; use slots.release({slot}) "
                f"(or slots.remove({slot}) first) so the slot does not keep a dangling id"
            )

    def snapshot(self) -> tuple[int, ...]:
        """The ids live slots hold, sorted (for `KVCacheManager.snapshot`)."""
        return tuple(sorted(s for s in list(self._owners) if self.owner(s) is not None))


__all__ = ["SlotClaims"]
