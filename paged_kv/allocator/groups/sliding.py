"""Sliding-window attention: a query at position ``p`` sees positions ``p - W + 1 ..
p``. Blocks wholly behind that go back to the pool as the sequence grows, and a prefix
hit at ``p`` needs only the blocks covering the ``W - 1`` positions before it."""

from __future__ import annotations

from paged_kv.allocator.groups.base import GroupAllocator


class SlidingWindowGroup(GroupAllocator):
    """A group of sliding-window layers (`LayerGroup.kind` ``"sliding"``, window ``W``)."""

    kind = "sliding"
    local = True


__all__ = ["SlidingWindowGroup"]
