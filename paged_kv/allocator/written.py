"""`WrittenBlocks`: which of a sequence's tokens are on the device, and which of its
full blocks may therefore be offered to other requests by the prefix cache.

Why this exists: allocating a block and writing it are separate events. The host
allocates at `admit_prompt`/`append`; the device writes when the step runs, which
may be later or never (the request is cancelled or preempted first). A block keyed
in the prefix cache before its bytes are written would let the next request with the
same prompt "hit" it and read whatever the block held before: another tenant's keys
and values, inside its own length, where zeroing past the length cannot hide them.

So a block becomes hittable only when the step that wrote it is committed:
`KVCacheManager.step_metadata` notes how many tokens of each row it described
(``issued``), `KVCacheManager.commit` turns that into ``written``, and the row's
full blocks below ``written`` are keyed then, from the chain hashes recorded when
the prompt was admitted (or given by `cache_tokens`). A request released before its
step is committed keys nothing. This is vLLM's rule too: its scheduler caches a
block only once it reports the block's tokens computed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from paged_kv.allocator.prefix_cache import from_u128, to_u128
from paged_kv.allocator.saved_state import check_captured, take
from paged_kv.errors import CheckpointError


class WrittenBlocks:
    """Per page-table row: tokens described by the last step, tokens committed, the chain
    hashes of its full blocks, and how many leading blocks are keyed (or were hits)."""

    def __init__(self) -> None:
        self.issued: dict[int, int] = {}
        self.written: dict[int, int] = {}
        self.hashes: dict[int, list[int]] = {}
        self.keyed: dict[int, int] = {}

    def start(self, row: int, hashes: list[int], cached_blocks: int, block_size: int) -> None:
        """A row admitted with ``cached_blocks`` leading blocks hit (written already)."""
        self.hashes[row] = hashes
        self.keyed[row] = cached_blocks
        self.written[row] = cached_blocks * block_size

    def fork(self, parent: int, child: int, length: int, block_size: int) -> None:
        """``child`` shares ``parent``'s blocks: the same bytes are written, and only the hashes
        of blocks full at the fork are the child's too (it continues with its own tokens)."""
        self.written[child] = min(self.written.get(parent, 0), length)
        self.hashes[child] = list(self.hashes.get(parent, ()))[: length // block_size]
        self.keyed[child] = min(self.keyed.get(parent, 0), len(self.hashes[child]))

    def forget(self, row: int) -> None:
        for table in (self.issued, self.written, self.hashes, self.keyed):
            table.pop(row, None)

    def describe(self, rows: Sequence[int], lengths: Sequence[int]) -> None:
        """A step's metadata describes ``rows`` holding ``lengths`` tokens."""
        self.issued.update(zip(rows, lengths))

    def commit(self, row: int, length: int | None) -> None:
        """``length`` (default: what the last step described) tokens of ``row`` are on the device."""
        if length is None:
            length = self.issued.pop(row, None)
            if length is None:
                return
        self.written[row] = max(self.written.get(row, 0), length)

    def keyable(self, row: int, block_size: int) -> tuple[int, int]:
        """Blocks ``[start, stop)`` of ``row`` that are full, written, hashed and not yet keyed."""
        start = self.keyed.get(row, 0)
        stop = min(len(self.hashes.get(row, ())), self.written.get(row, 0) // block_size)
        return start, max(start, stop)

    def rehash(self, row: int, hashes: list[int]) -> None:
        """``row``'s chain is now ``hashes`` (`KVCacheManager.cache_tokens`); keying restarts
        at block 0 (blocks keyed before keep their keys: the cache skips them)."""
        self.hashes[row] = hashes
        self.keyed[row] = 0

    def mark_keyed(self, row: int, stop: int) -> None:
        """``row``'s first ``stop`` blocks are keyed (or were hits)."""
        self.keyed[row] = stop

    def keyed_end(self, row: int) -> int:
        """Blocks of ``row``'s chain keyed (or hit)."""
        return self.keyed.get(row, 0)

    def keyed_ends(self, rows: np.ndarray) -> np.ndarray:
        """Blocks keyed per row, for ``rows`` (the retention rule's chain ends)."""
        get = self.keyed.get
        return np.fromiter((get(r, 0) for r in rows.tolist()), np.int64, len(rows))

    def snapshot(self) -> tuple[object, ...]:
        """A comparable copy (for `KVCacheManager.snapshot`); ``issued`` is a note, not allocation state."""
        return (tuple(sorted(self.written.items())), tuple(sorted((r, tuple(h)) for r, h in self.hashes.items())),
                tuple(sorted(self.keyed.items())))

    # ---- saved state (paged_kv.checkpoint) ------------------------------------------
    SAVED_ATTRS = frozenset({"issued", "written", "hashes", "keyed"})
    """Attributes `state` covers. ``issued`` (what the last step described but nobody
    committed) is dropped: a restored manager keys those blocks at their next commit."""

    def state(self) -> dict[str, np.ndarray]:
        """Per row: tokens committed, blocks keyed, and the chain hashes (128-bit, as pairs)."""
        check_captured(self, self.SAVED_ATTRS)
        chains = [(row, i, h) for row, chain in self.hashes.items() for i, h in enumerate(chain)]
        return {
            "lengths": np.array(sorted(self.written.items()), np.int64).reshape(-1, 2),
            "keyed": np.array(sorted(self.keyed.items()), np.int64).reshape(-1, 2),
            "hash_index": np.array([(r, i) for r, i, _ in chains], np.int64).reshape(-1, 2),
            "hash_value": to_u128([h for *_, h in chains]),
        }

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray], live_rows: set[int]) -> "WrittenBlocks":
        """Inverse of `state`, every row checked to be one of ``live_rows`` and named once
        (`CheckpointError`); how the values fit the page table is `restore_checks`' work."""
        lengths, keyed = take(state, "lengths", np.int64, (None, 2)), take(state, "keyed", np.int64, (None, 2))
        index, values = take(state, "hash_index", np.int64, (None, 2)), take(state, "hash_value", np.uint64, (None, 2))
        if index.shape[0] != values.shape[0]:
            raise CheckpointError("written.hash_index and written.hash_value differ in length")
        rows = set(lengths[:, 0].tolist()) | set(keyed[:, 0].tolist()) | set(index[:, 0].tolist())
        if not rows <= live_rows:
            raise CheckpointError(f"written.* names rows {sorted(rows - live_rows)} no sequence holds")
        for name, pairs in (("lengths", lengths), ("keyed", keyed)):
            if np.unique(pairs[:, 0]).size != pairs.shape[0]:  # a dict would keep the last silently
                raise CheckpointError(f"written.{name} names a row twice")
        written = cls()
        written.written = {int(r): int(n) for r, n in lengths.tolist()}
        written.keyed = {int(r): int(n) for r, n in keyed.tolist()}
        for (row, i), h in zip(index.tolist(), from_u128(values)):
            chain = written.hashes.setdefault(int(row), [])
            if i != len(chain):
                raise CheckpointError(f"written.hash_index row {row} skips to index {i}")
            chain.append(h)
        return written


__all__ = ["WrittenBlocks"]
