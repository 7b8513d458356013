"""`PendingCopies`: copy-on-write block copies of one layer group, kept until committed.

After a fork, the first write into a shared, partially filled block gives the
writer a fresh block that must first receive the shared block's tokens. The host
cannot copy device bytes, so the copy rides in the step metadata and every layer's
write performs it before its scatter.

Why copies stay pending until `KVCacheManager.commit` rather than being handed out
once: a step can be described twice (a retry) or abandoned; a copy handed to a step
that never ran would be lost and the writer would read whatever its fresh block
held. So every step carries every pending copy, and copies are made *idempotent*:
a copy writes only the ``length`` token slots that were shared (``dst[:length] =
src[:length]``), never the slots the writer has since filled, so running it again
changes nothing. The source's first ``length`` slots never change either (every
holder writes only past its own length, which is at least ``length``), and the
copy keeps the writer's reference on the source block (a *pin*) so the block
cannot be freed and reused while the copy may still run. Copies run in the order
they were made, so a copy out of a block that is itself a pending copy's
destination sees that block's bytes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from paged_kv.spec import NULL_BLOCK


class PendingCopies:
    """Ordered pending copies ``(src, dst, length, issued_at, owners)`` of one group.

    ``issued_at`` is the number of the first step description that carried the copy
    (0: none yet). Every description carries every pending copy, so when a step
    described at ``t`` has run, every copy with ``0 < issued_at <= t`` has run:
    `retire` drops those and returns their pinned sources to unpin.

    ``owners``: the ``(row, logical block)`` entries the copy was made for (the
    writer's, and those of sequences forked from it since). A copy lives exactly as
    long as one owner still holds ``dst`` there: the moment a trim or a release frees
    it, the copy must die, before any allocation can hand ``dst`` to someone else
    (`drop_dead`; `check` holds every pending copy to this).
    """

    def __init__(self) -> None:
        self._items: list[list[Any]] = []

    def __len__(self) -> int:
        return len(self._items)

    def add(self, src: np.ndarray, dst: np.ndarray, lengths: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> None:
        """Record copies made by one append into ``dst`` at ``(rows, cols)`` (the caller's
        references on ``src`` become pins)."""
        for s, d, n, r, c in zip(src.tolist(), dst.tolist(), lengths.tolist(), rows.tolist(), cols.tolist()):
            self._items.append([s, d, n, 0, {(r, c)}])

    def fork(self, parent: int, child: int) -> None:
        """``child`` now holds ``parent``'s blocks at the same logical positions: it owns its copies too."""
        for item in self._items:
            item[4] |= {(child, c) for r, c in item[4] if r == parent}

    def pins(self, blocks: np.ndarray) -> np.ndarray:
        """How many references on each of ``blocks`` are pins of pending copies (not holders)."""
        if not self._items:
            return np.zeros(len(blocks), np.int32)
        count: dict[int, int] = {}
        for s, *_ in self._items:
            count[s] = count.get(s, 0) + 1
        return np.fromiter((count.get(b, 0) for b in np.asarray(blocks).tolist()), np.int32, len(blocks))

    def pinned(self) -> list[int]:
        """Every pinned source block, once per pin."""
        return [s for s, *_ in self._items]

    def issue(self, step: int, pad_dst: int, min_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(src, dst, length)`` of every pending copy, oldest first, for step description ``step``.

        Padded to a bucket (a power of two, at least ``min_size``) so the step compiles
        once per bucket; padding copies nothing (length 0, from the null block to
        ``pad_dst``, an id past the pool that the write drops).
        """
        n = len(self._items)
        size = 1 << max(n - 1, 0).bit_length() if n else 0
        size = max(size, min_size) if n else 0
        src = np.full(size, NULL_BLOCK, np.int32)
        dst = np.full(size, pad_dst, np.int32)
        length = np.zeros(size, np.int32)
        for i, item in enumerate(self._items):
            src[i], dst[i], length[i] = item[0], item[1], item[2]
            item[3] = item[3] or step
        return src, dst, length

    def retire(self, step: int) -> list[int]:
        """Drop the copies a step described at ``step`` carried (it ran); return their sources to unpin."""
        done = [item for item in self._items if 0 < item[3] <= step]
        if done:
            self._items = [item for item in self._items if not 0 < item[3] <= step]
        return [item[0] for item in done]

    def drop_dead(self, block_tables: np.ndarray, in_use: np.ndarray) -> list[int]:
        """Forget owners that no longer hold a copy's ``dst`` where it was made, and drop
        copies that nobody needs any more (the copy must never land in a block handed to
        someone else); return their sources to unpin. Called right after every free and
        copy-on-write. A copy with no owner left is still needed while a later copy
        reads its ``dst`` (a chain: the writer forked again and copied the copy), so
        dropping one copy can free an earlier one: repeated until nothing changes."""
        for item in self._items:
            item[4] = {(r, c) for r, c in item[4] if in_use[r] and block_tables[r, c] == item[1]}
        unpin: list[int] = []
        while True:
            read = {item[0] for item in self._items}
            dead = [item for item in self._items if not item[4] and item[1] not in read]
            if not dead:
                return unpin
            self._items = [item for item in self._items if item[4] or item[1] in read]
            unpin += [item[0] for item in dead]

    def check(self, block_tables: np.ndarray, in_use: np.ndarray) -> None:
        """AssertionError unless every pending copy's destination sits where it was made,
        in rows still in use, or is read by a later copy (`check_integrity`)."""
        read = {item[0] for item in self._items}
        for s, d, n, _, owners in self._items:
            for r, c in owners:
                if not in_use[r] or block_tables[r, c] != d:
                    raise AssertionError(f"pending copy {s}->{d} was made for row {r} block {c}, which now "
                                         f"holds {int(block_tables[r, c])}: the copy would land in another block's bytes")
            if not owners and d not in read:
                raise AssertionError(f"pending copy {s}->{d}: no sequence needs it, yet it would still run")

    def touches(self, blocks: np.ndarray) -> bool:
        """Whether a pending copy writes into any of ``blocks``."""
        held = set(np.asarray(blocks).tolist())
        return any(item[1] in held for item in self._items)

    def snapshot(self) -> tuple[tuple[int, ...], ...]:
        """A comparable copy (for `KVCacheManager.snapshot`): ``(src, dst, length)`` in order."""
        return tuple(tuple(item[:3]) for item in self._items)


__all__ = ["PendingCopies"]
