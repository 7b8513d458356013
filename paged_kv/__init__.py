"""paged_kv: a paged-block KV cache manager for LLM serving on JAX.

Host side (numpy): `KVCacheManager` decides which blocks each sequence holds and
hands the device one `StepMetadata` per step; `DecodeSlots` keeps a fixed decode
batch. Device side (jitted JAX): `PagedKVCache` holds one view per layer, whose
``concatenate_to_cache`` writes the step's keys/values into the pages and gives
attention contiguous keys/values. `swap_out`/`swap_in` and
`save_checkpoint`/`load_checkpoint` move a sequence's or the whole cache's bytes.

Submodules: `paged_kv.sim` replays request traces through the allocator (and
through contiguous caches at equal memory) to measure utilization, concurrency
and preemptions without running a model (``paged-kv simulate`` on the command
line); `paged_kv.sharding` places pages on a device mesh.
"""

from paged_kv.allocator import BlockPool, DecodeSlots, KVCacheManager, PageTable, slot_step_metadata
from paged_kv.cache import PagedKVCache
from paged_kv.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from paged_kv.errors import (
    BatchTooLargeError,
    CheckpointError,
    DuplicateSequenceError,
    InvalidArgumentError,
    InvalidSequenceIdError,
    InvalidTokenCountError,
    InvalidTokenIdError,
    OutOfBlocksError,
    PagedKVError,
    SequenceTooLongError,
    ShapeError,
    SlotError,
    SpecError,
    StateError,
    TraceError,
    UnknownSequenceError,
)
from paged_kv.insertion import insert_prefill
from paged_kv.allocator.prefix_cache import PrefixCache, PrefixEvent, PrefixStats
from paged_kv.allocator.swap_record import SwapRecord
from paged_kv.swap import SwappedSequence, swap_in, swap_out
from paged_kv.metadata import GroupMetadata, StepMetadata, bucket
from paged_kv.spec import NULL_BLOCK, CacheSpec, LayerGroup
from paged_kv.views import AttentionMask, SlidingWindowCacheView, TransformerCacheView, UnifiedCacheView

__version__ = "0.1.0"

__all__ = [
    "AttentionMask",
    "BatchTooLargeError",
    "BlockPool",
    "CacheSpec",
    "Checkpoint",
    "CheckpointError",
    "DecodeSlots",
    "DuplicateSequenceError",
    "GroupMetadata",
    "InvalidArgumentError",
    "InvalidSequenceIdError",
    "InvalidTokenCountError",
    "InvalidTokenIdError",
    "KVCacheManager",
    "LayerGroup",
    "NULL_BLOCK",
    "OutOfBlocksError",
    "PageTable",
    "PagedKVCache",
    "PagedKVError",
    "SequenceTooLongError",
    "ShapeError",
    "SlotError",
    "SpecError",
    "StateError",
    "SlidingWindowCacheView",
    "PrefixCache",
    "PrefixEvent",
    "PrefixStats",
    "StepMetadata",
    "SwapRecord",
    "SwappedSequence",
    "TraceError",
    "TransformerCacheView",
    "UnifiedCacheView",
    "UnknownSequenceError",
    "bucket",
    "insert_prefill",
    "load_checkpoint",
    "save_checkpoint",
    "slot_step_metadata",
    "swap_in",
    "swap_out",
]
