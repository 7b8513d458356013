"""Group allocators: one class per attention kind, the unit `KVCacheManager` coordinates.

A kind is one file here (`base.GroupAllocator` explains what a kind decides); adding
one means a subclass and an entry in `KINDS`.
"""

from __future__ import annotations

from paged_kv.allocator.groups.base import GroupAllocator, GrowthPlan
from paged_kv.allocator.groups.chunked import ChunkedLocalGroup
from paged_kv.allocator.groups.full import FullAttentionGroup
from paged_kv.allocator.groups.sliding import SlidingWindowGroup
from paged_kv.spec import LayerGroup

KINDS: dict[str, type[GroupAllocator]] = {
    "full": FullAttentionGroup,
    "sliding": SlidingWindowGroup,
    "chunked": ChunkedLocalGroup,
}
"""`LayerGroup.kind` -> the class that allocates for it."""


def group_class(layer_group: LayerGroup) -> type[GroupAllocator]:
    """The allocator class of ``layer_group``'s attention kind."""
    return KINDS[layer_group.kind]


__all__ = ["ChunkedLocalGroup", "FullAttentionGroup", "GroupAllocator", "GrowthPlan", "KINDS", "SlidingWindowGroup",
           "group_class"]
