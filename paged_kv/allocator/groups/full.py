"""Full attention: every query sees every earlier position, so a row keeps all its
blocks and a prefix hit needs the whole chain up to the hit point."""

from __future__ import annotations

from collections.abc import Container

import numpy as np

from paged_kv.allocator.groups.base import GroupAllocator


class FullAttentionGroup(GroupAllocator):
    """A group of full-attention layers (`LayerGroup.kind` ``"full"``)."""

    kind = "full"
    local = False

    def keep_from(self, rows: np.ndarray, first_query: np.ndarray) -> np.ndarray:
        """Block 0 (rows of a full group always start there)."""
        keep: np.ndarray = self.table.first_block[rows].astype(np.int64)
        return keep

    def _step_tables(self, rows: np.ndarray, first: np.ndarray, width: int) -> np.ndarray:
        # Rows are already null past their last block (check_integrity holds the table
        # to it), so the first `width` columns are the answer: one row gather instead of
        # [B, W] index arrays, which dominated the step.
        return self.table.block_tables[rows, :width]

    def longest_hit(self, hashes: list[int], limit: int, present: Container[int] | None = None) -> int:
        """The longest cached prefix of the chain, at most ``limit`` blocks (a hit needs all of it;
        ``present``: what counts as cached, see `GroupAllocator.longest_hit`)."""
        block_of = self.cache.block_of if present is None else present  # type: ignore[union-attr]  # called with the prefix cache on
        for i, h in enumerate(hashes[:limit]):
            if h not in block_of:
                return i
        return min(limit, len(hashes))


__all__ = ["FullAttentionGroup"]
