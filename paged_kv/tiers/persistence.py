"""`persist`: every keyed block of the device and the host tier written down to the
disk tier, for a shutdown. Write-back moves a block down only when it is evicted, so
without this a process that exits loses everything above the disk; the next process
on the same directory (a warm restart) then hits what was persisted.

Device side (it gathers device pages): imported on first use, like `movement`.
"""

from __future__ import annotations

from paged_kv.cache import PagedKVCache
from paged_kv.errors import TierError
from paged_kv.tiers.movement import _check, flush
from paged_kv.tiers.records import Download
from paged_kv.tiers.tiers import CacheTiers


def persist(cache: PagedKVCache, tiers: CacheTiers) -> PagedKVCache:
    """Write every keyed block of the device pool and the host tier that the disk tier
    lacks to disk (blocks under ``drop_below`` excepted), then wait for the files;
    returns the cache (donated: keep the one returned). Pending moves run first. When
    the disk tier is smaller than what is written, its policy keeps the most recent:
    the host's least recently used first, then the device's evictable blocks, then the
    ones in use. `TierError` (nothing written) without a disk directory."""
    _check(cache, tiers)
    if tiers.directory is None or not any(d.capacity for d in tiers.disk):
        raise TierError("persist writes to the disk tier: build CacheTiers(..., disk_dir=..., disk_bytes=...) with "
                        "room on disk")
    cache = flush(cache, tiers, wait=True)  # uploads written, copies down landed: every key's bytes settled
    keep = tiers.priorities.of
    for g, host in enumerate(tiers.host):
        for key in host.policy.keys():  # first to go first: the disk's LRU then keeps the later ones
            if key in host.ready and key not in tiers.disk[g] and keep(key) >= tiers.drop_below:
                tiers._to_disk(g, key, host.parent_of[key], host.read(key))
    for g, group in enumerate(tiers.manager.groups):
        pc, pool, host = group.cache, group.pool, tiers.host[g]
        assert pc is not None  # tiers attach only to a manager with a prefix cache
        idle = [*pc.behind, *pc.evictable]
        held = [b for b in pc.block_of.values() if not pc.is_evictable(b)]
        for b in idle + held:
            key = pc.hash_of[b]
            # Keys the host holds were written above; those left off it did not fit.
            if key in tiers.disk[g] or key in host.slot_of or keep(key) < tiers.drop_below:
                continue
            tiers.downloads.append(Download(g, b, int(pool.generation[b]), key, pc.parent_of[b]))
    return flush(cache, tiers, wait=True)  # one gather; each copy lands on disk (not in the host tier)


__all__ = ["persist"]
