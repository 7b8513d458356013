"""Full attention: every query sees every earlier position, so a row keeps all its
blocks and a prefix hit needs the whole chain up to the hit point."""

from __future__ import annotations

import numpy as np

from paged_kv.allocator.groups.base import GroupAllocator
from paged_kv.spec import LayerGroup


class FullAttentionGroup(GroupAllocator):
    """A group of full-attention layers (`LayerGroup.kind` ``"full"``)."""

    kind = "full"
    local = False

    @classmethod
    def visible_from(cls, layer_group: LayerGroup, positions, block_size: int):
        """Block 0, whatever the position."""
        return positions * 0

    def keep_from(self, rows: np.ndarray, first_query: np.ndarray) -> np.ndarray:
        """Block 0 (rows of a full group always start there)."""
        return self.table.first_block[rows].astype(np.int64)

    def _step_tables(self, rows: np.ndarray, first: np.ndarray, width: int) -> np.ndarray:
        # Rows are already null past their last block (check_integrity holds the table
        # to it), so the first `width` columns are the answer: one row gather instead of
        # [B, W] index arrays, which dominated the step.
        return self.table.block_tables[rows, :width]

    def longest_hit(self, hashes: list[int], limit: int) -> int:
        """The longest cached prefix of the chain, at most ``limit`` blocks (a hit needs all of it)."""
        return len(self.cache.match(hashes[:limit]))


__all__ = ["FullAttentionGroup"]
