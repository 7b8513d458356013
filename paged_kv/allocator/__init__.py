"""Host side: block pool, page table and the scheduler-facing manager (numpy, no jit)."""

from paged_kv.allocator.block_pool import BlockId, BlockPool
from paged_kv.allocator.decode_slots import DecodeSlots, slot_step_metadata
from paged_kv.allocator.manager import KVCacheManager, SeqId
from paged_kv.allocator.page_table import PageTable
from paged_kv.allocator.step_batch import StepBatch

__all__ = ["BlockId", "BlockPool", "DecodeSlots", "KVCacheManager", "PageTable", "SeqId", "StepBatch", "slot_step_metadata"]
