"""Chunked local attention (Llama 4's ``attention_chunk_size``): a query at position
``p`` sees, causally, only its own chunk ``[p // C * C, p]``. When a sequence enters a
new chunk the blocks of earlier chunks go back to the pool; a block straddling a chunk
edge (C not a multiple of the block size) is kept while its chunk is current. A prefix
hit at ``p`` needs the blocks of ``p``'s chunk before ``p``: none at a chunk edge."""

from __future__ import annotations

from paged_kv.allocator.groups.base import GroupAllocator
from paged_kv.spec import LayerGroup


class ChunkedLocalGroup(GroupAllocator):
    """A group of chunked-local layers (`LayerGroup.kind` ``"chunked"``, chunk ``C``)."""

    kind = "chunked"
    local = True

    @classmethod
    def visible_from(cls, layer_group: LayerGroup, positions, block_size: int):
        """The block holding the first position of ``p``'s chunk."""
        chunk = layer_group.chunk
        return positions // chunk * chunk // block_size


__all__ = ["ChunkedLocalGroup"]
