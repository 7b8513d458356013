"""Batches over a `KVCacheManager` (host, numpy): `StepBatch`, a persistent batch whose
step metadata is rewritten only where a step changed it, and `DecodeSlots`, a fixed
decode batch that sequences move in and out of (continuous batching).

One layer above `paged_kv.allocator` (they drive the manager's public API and its
step numbers) and below the device layer: nothing here imports JAX. Writing a
prefilled sequence into a slot's blocks is the device's job
(`paged_kv.insertion.insert_prefill_slot`)."""

from paged_kv.batch.decode_slots import DecodeSlots, slot_step_metadata
from paged_kv.batch.step_batch import StepBatch

__all__ = ["DecodeSlots", "StepBatch", "slot_step_metadata"]
