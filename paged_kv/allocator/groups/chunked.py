"""Chunked local attention (Llama 4's ``attention_chunk_size``): a query at position
``p`` sees, causally, only its own chunk ``[p // C * C, p]``. When a sequence enters a
new chunk the blocks of earlier chunks go back to the pool; a block straddling a chunk
edge (C not a multiple of the block size) is kept while its chunk is current. A prefix
hit at ``p`` needs the blocks of ``p``'s chunk before ``p``: none at a chunk edge."""

from __future__ import annotations

from paged_kv.allocator.groups.base import GroupAllocator


class ChunkedLocalGroup(GroupAllocator):
    """A group of chunked-local layers (`LayerGroup.kind` ``"chunked"``, chunk ``C``)."""

    kind = "chunked"
    local = True


__all__ = ["ChunkedLocalGroup"]
