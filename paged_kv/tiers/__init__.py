"""Tiers below the device pool: a prefix cache that outlives device memory.

Host side (numpy, no JAX): `CacheTiers` -- per layer group a host-memory tier and a
disk tier of keyed blocks, LRU or ARC each, write-back or write-through, lookups
that span every tier (`KVCacheManager.admit_prompt` asks it), a warm restart from
the disk tier, events that carry the medium. Device side (imported on first use):
`flush` runs the pending moves, one jitted call each way.

    tiers = CacheTiers(manager, host_bytes=2**30, disk_dir="/var/cache/kv", disk_bytes=2**34)
    cached = manager.admit_prompt(seq_id, token_ids)   # hits may come from host or disk
    cache = flush(cache, tiers)                        # before the step: moves down, then up
"""

from paged_kv.tiers.policy import ARC, LRU, POLICIES
from paged_kv.tiers.retention import DEFAULT_PRIORITY, Retention
from paged_kv.tiers.tiers import CacheTiers, TierStats, WRITE_POLICIES

_DEVICE_NAMES = {"flush": "paged_kv.tiers.movement", "finish": "paged_kv.tiers.movement",
                 "persist": "paged_kv.tiers.persistence"}  # a module named persist would shadow the function once imported


def __getattr__(name: str) -> object:
    module = _DEVICE_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'paged_kv.tiers' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = ["ARC", "CacheTiers", "DEFAULT_PRIORITY", "LRU", "POLICIES", "Retention", "TierStats", "WRITE_POLICIES", "finish",
           "flush", "persist"]
