"""`SwapRecord`: what the host must remember of a sequence swapped out of the pool."""

from __future__ import annotations

import attrs
import numpy as np


@attrs.frozen(eq=False)
class SwapRecord:
    """A sequence's place in every layer group at the moment it left the device.

    ``blocks[g]`` are the device blocks it held in group ``g`` (logical blocks
    ``first_blocks[g]`` onward; a sliding group has already returned the ones
    before): the blocks to copy out, and how many to allocate again on the way
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
