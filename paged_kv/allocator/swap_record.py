"""`SwapRecord`: what the host must remember of a sequence swapped out of the pool."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs
import numpy as np

from paged_kv.allocator.seq_ids import check_seq_id
from paged_kv.errors import InvalidArgumentError, InvalidTokenCountError, SequenceTooLongError

if TYPE_CHECKING:
    from paged_kv.spec import CacheSpec


@attrs.frozen(eq=False)
class SwapRecord:
    """A sequence's place in every layer group at the moment it left the device.

    ``blocks[g]`` are the device blocks it held in group ``g`` (logical blocks
    ``first_blocks[g]`` onward; a sliding or chunked group has already returned the
    ones before): the blocks to copy out, and how many to allocate again on the way
    back in. The ids themselves are stale once the sequence is released.
    """

    seq_id: int
    num_tokens: int
    first_blocks: tuple[int, ...]
    blocks: tuple[np.ndarray, ...]

    @property
    def num_blocks(self) -> tuple[int, ...]:
        """Blocks per group that swapping in must allocate."""
        return tuple(int(b.size) for b in self.blocks)


__all__ = ["SwapRecord"]


def _record_int(value: object, name: str, record: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidArgumentError(f"SwapRecord {name}={value!r} must be an integer (record {record!r})")
    return int(value)


def check_record(record: Any, spec: CacheSpec) -> tuple[int, int, tuple[int, ...], tuple[int, ...]]:
    """``(seq_id, num_tokens, first_blocks, num_blocks)`` of a record that fits ``spec``.

    A record is untrusted input: a caller can build one by hand or bring one from a
    manager of another spec. Everything `KVCacheManager.swap_in` relies on is checked
    here, before it changes anything: the id, the length, one first block and one
    block array per layer group, first blocks a group could really have (0 for full
    attention; no further than its window or chunk allows for a sliding or chunked group), and block
    counts that cover exactly the tokens from the first block on.
    """
    if not isinstance(record, SwapRecord):
        raise InvalidArgumentError(f"swap_in needs a SwapRecord (from swap_out or swap_record); got {type(record).__name__}")
    seq_id = check_seq_id(record.seq_id, "SwapRecord ")
    num_tokens = record.num_tokens
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, (int, np.integer)) or not 1 <= num_tokens < 2**31:
        raise InvalidTokenCountError(f"SwapRecord num_tokens={num_tokens!r} must be an integer in [1, 2**31)")
    total = spec.blocks_for(num_tokens)
    if total > spec.max_blocks_per_seq:
        raise SequenceTooLongError(
            f"SwapRecord seq_id={seq_id}: {num_tokens} tokens need {total} blocks > max_blocks_per_seq={spec.max_blocks_per_seq}"
        )
    groups = spec.groups
    if not isinstance(record.first_blocks, (tuple, list)) or len(record.first_blocks) != len(groups):
        raise InvalidArgumentError(
            f"SwapRecord seq_id={seq_id}: first_blocks={record.first_blocks!r} needs one entry per layer group "
            f"({len(groups)}); was the record made by a manager of another spec?"
        )
    if not isinstance(record.blocks, (tuple, list)) or len(record.blocks) != len(groups):
        raise InvalidArgumentError(
            f"SwapRecord seq_id={seq_id}: blocks has {len(record.blocks) if hasattr(record.blocks, '__len__') else '?'} "
            f"arrays; this spec has {len(groups)} layer groups"
        )
    firsts, counts = [], []
    for g, (group, first, blocks) in enumerate(zip(groups, record.first_blocks, record.blocks)):
        first = _record_int(first, f"first_blocks[{g}]", record)
        # Its last token (a step may still query it) sees from first_visible on.
        limit = int(group.first_visible(num_tokens - 1)) // spec.block_size
        if not 0 <= first <= limit:
            kind = {"full": "a full-attention group starts at block 0",
                    "sliding": f"a window of {group.window} keeps every block from {limit} on",
                    "chunked": f"a chunk of {group.chunk} keeps every block from {limit} on"}[group.kind]
            raise InvalidArgumentError(
                f"SwapRecord seq_id={seq_id}: first_blocks[{g}]={first} is impossible for {num_tokens} tokens: {kind}"
            )
        arr = np.asarray(blocks) if isinstance(blocks, np.ndarray) else None
        if arr is None or arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer) or arr.size != total - first:
            raise InvalidArgumentError(
                f"SwapRecord seq_id={seq_id}: blocks[{g}] must be a 1-D integer array of {total - first} block ids "
                f"(blocks {first}..{total} of {num_tokens} tokens); got {blocks!r}"
            )
        firsts.append(first)
        counts.append(total - first)
    return int(seq_id), int(num_tokens), tuple(firsts), tuple(counts)


__all__ += ["check_record"]
