"""Sliding-window attention: a query at position ``p`` sees positions ``p - W + 1 ..
p``. Blocks wholly behind that go back to the pool as the sequence grows, and a prefix
hit at ``p`` needs only the blocks covering the ``W - 1`` positions before it."""

from __future__ import annotations

import numpy as np

from paged_kv.allocator.groups.base import GroupAllocator
from paged_kv.spec import LayerGroup


class SlidingWindowGroup(GroupAllocator):
    """A group of sliding-window layers (`LayerGroup.kind` ``"sliding"``, window ``W``)."""

    kind = "sliding"
    local = True

    @classmethod
    def visible_from(cls, layer_group: LayerGroup, positions, block_size: int):
        """The block holding position ``p - W + 1`` (block 0 while ``p < W``)."""
        return np.maximum(positions - layer_group.window + 1, 0) // block_size


__all__ = ["SlidingWindowGroup"]
