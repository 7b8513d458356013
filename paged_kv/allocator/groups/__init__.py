"""Group allocators: one class per attention kind, the unit `KVCacheManager` coordinates.

A kind's rule -- the first position a query can still see -- is
`LayerGroup.first_visible` in the spec, shared with the device mask; everything the
allocator derives from it is in `base.GroupAllocator`. Adding a kind means that rule,
a subclass here (its own file) and an entry in `KINDS`.
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
