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


class WrittenBlocks:
    """Per page-table row: tokens described by the last step, tokens committed, the chain
    hashes of its full blocks, and how many leading blocks are keyed (or were hits)."""

    def __init__(self):
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

    def describe(self, rows: list[int], lengths: list[int]) -> None:
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

    def state(self) -> tuple:
        """A comparable copy (for snapshots); ``issued`` is a note, not allocation state."""
        return (tuple(sorted(self.written.items())), tuple(sorted((r, tuple(h)) for r, h in self.hashes.items())),
                tuple(sorted(self.keyed.items())))


__all__ = ["WrittenBlocks"]
