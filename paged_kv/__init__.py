"""paged_kv: a paged-block KV cache manager for LLM serving on JAX.

Host side (numpy): `KVCacheManager` decides which blocks each sequence holds and
hands the device one `StepMetadata` per step; `DecodeSlots` keeps a fixed decode
batch. Device side (jitted JAX): `PagedKVCache` holds one view per layer, whose
``attention`` writes the step's keys/values into the pages and attends to them in
place (`paged_attention`), and whose ``concatenate_to_cache`` (the seed-compatible
path) gives attention contiguous keys/values instead. `swap_out`/`swap_in` and
`save_checkpoint`/`load_checkpoint` move a sequence's or the whole cache's bytes.

Submodules: `paged_kv.sim` replays request traces through the allocator (and
through contiguous caches at equal memory) to measure utilization, concurrency
and preemptions without running a model (``paged-kv simulate`` on the command
line); `paged_kv.sharding` places pages on a device mesh; `paged_kv.attention`
holds the attention over the pages and the Pallas kernel adapters.
"""

from typing import TYPE_CHECKING

from paged_kv.allocator import BlockPool, KVCacheManager, PageTable
from paged_kv.batch import DecodeSlots, StepBatch, slot_step_metadata
from paged_kv.allocator.prefix_cache import PrefixCache, PrefixEvent, PrefixStats
from paged_kv.allocator.steps import Step
from paged_kv.allocator.swap_record import SwapRecord
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
    StaleStepError,
    StateError,
    StepError,
    TraceError,
    UnknownSequenceError,
)
from paged_kv.metadata import GroupMetadata, StepMetadata, bucket
from paged_kv.spec import NULL_BLOCK, CacheSpec, LayerGroup

# Device-side names import JAX (about a second, more on a loaded machine). A host-only
# user -- a scheduler process, the simulator -- never touches them, so they are
# imported on first use (PEP 562 module __getattr__) instead of with the package.
_DEVICE_NAMES = {
    "PagedKVCache": "paged_kv.cache",
    "Checkpoint": "paged_kv.checkpoint",
    "load_checkpoint": "paged_kv.checkpoint",
    "save_checkpoint": "paged_kv.checkpoint",
    "insert_prefill": "paged_kv.insertion",
    "insert_prefill_slot": "paged_kv.insertion",
    "SwappedSequence": "paged_kv.swap",
    "swap_in": "paged_kv.swap",
    "swap_out": "paged_kv.swap",
    "AttentionMask": "paged_kv.views",
    "SlidingWindowCacheView": "paged_kv.views",
    "TransformerCacheView": "paged_kv.views",
    "UnifiedCacheView": "paged_kv.views",
    "paged_attention": "paged_kv.attention",
}


if TYPE_CHECKING:
    # What a type checker sees of the lazy names: the names themselves, typed (and no
    # module ``__getattr__``, which would make every misspelt attribute pass).
    from paged_kv.attention import paged_attention
    from paged_kv.cache import PagedKVCache
    from paged_kv.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
    from paged_kv.insertion import insert_prefill, insert_prefill_slot
    from paged_kv.swap import SwappedSequence, swap_in, swap_out
    from paged_kv.views import AttentionMask, SlidingWindowCacheView, TransformerCacheView, UnifiedCacheView
else:
    def __getattr__(name: str) -> object:
        module = _DEVICE_NAMES.get(name)
        if module is None:
            raise AttributeError(f"module 'paged_kv' has no attribute {name!r}")
        import importlib

        value = getattr(importlib.import_module(module), name)
        globals()[name] = value  # later lookups skip this hook
        return value


def __dir__() -> list[str]:
    # What a user may reach: the public names (lazy ones included) and the dunders;
    # not this module's own helpers such as the lazy-import table.
    own = {name for name in globals() if not name.startswith("_") or name.startswith("__")}
    return sorted(own | set(_DEVICE_NAMES))


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
    "StaleStepError",
    "StateError",
    "StepError",
    "SlidingWindowCacheView",
    "PrefixCache",
    "PrefixEvent",
    "PrefixStats",
    "Step",
    "StepBatch",
    "StepMetadata",
    "SwapRecord",
    "SwappedSequence",
    "TraceError",
    "TransformerCacheView",
    "UnifiedCacheView",
    "UnknownSequenceError",
    "bucket",
    "insert_prefill",
    "insert_prefill_slot",
    "load_checkpoint",
    "paged_attention",
    "save_checkpoint",
    "slot_step_metadata",
    "swap_in",
    "swap_out",
]
