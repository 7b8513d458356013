"""Host side: block pool, page table and the scheduler-facing manager (numpy, no jit).

The persistent batch and decode slots sit one layer above, in `paged_kv.batch`."""

from paged_kv.allocator.block_pool import BlockId, BlockPool
from paged_kv.allocator.manager import KVCacheManager, SeqId
from paged_kv.allocator.page_table import PageTable

__all__ = ["BlockId", "BlockPool", "KVCacheManager", "PageTable", "SeqId"]
