"""`CacheTiers`: the host bookkeeping of the tiers below a manager's device pool.

Which key lives in which tier, and which moves are pending; never a device array
(`paged_kv.tiers.movement` moves the bytes). Per layer group, a `HostTier` and a
`DiskTier`, keyed by the same chain hashes as the group's device `PrefixCache`, so
a salt's keys are the same in every tier and tenants stay apart there as on the
device (a key never names another salt's tokens).

Moves down. Write-back (``write="back"``): a keyed block the device evicts goes to
the host tier, and one the host evicts goes to disk; write-through (``"through"``):
a block is copied down when it is keyed (host and disk at once), so evictions move
nothing. A block a local group evicts from its behind-the-window tier is dropped:
only a window's tail is ever needed by a hit there. The device's bytes of an evicted
block stay until the block's next owner writes it, so the copy down is queued with
the block's generation and `movement.flush` gathers it before the step that reuses
the block runs. If a caller runs a step first, the device sees a newer generation
on the block and the copy is refused (dropped), never stored as someone else's.

Moves up. `prepare` (called by `KVCacheManager.admit_prompt`, or ahead of it as a
prefetch) finds the longest hit every group serves counting every tier, allocates
fresh device blocks for the keys below the device, keys them in the device cache
and queues their upload; `movement.flush` writes them all in one jitted call, each
stamped with its new generation (as `swap_in` stamps), before the step that reads
them. A read of a block whose upload has not run sees the null block (binding), not
a previous owner's bytes. Tiers are inclusive: a block brought up stays below, so
evicting it again moves nothing.

Without bytes (``keep_bytes=False``, the simulator) every move completes at once
and only keys and byte counts are kept.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from paged_kv.allocator.arguments import check_token_ids
from paged_kv.allocator.manager import KVCacheManager
from paged_kv.allocator.prefix_cache import NO_HASH, PrefixEvent, chain_hashes
from paged_kv.allocator.prompts import common_hit
from paged_kv.errors import InvalidArgumentError, SpecError, TierError
from paged_kv.tiers.disk import DiskDirectory
from paged_kv.tiers.disk_tier import DiskTier
from paged_kv.tiers.host import HostTier, Pages
from paged_kv.tiers.moves_down import MovesDown
from paged_kv.tiers.policy import POLICIES
from paged_kv.tiers.records import Download, TierStats, Upload, split_bytes
from paged_kv.tiers.retention import DEFAULT_PRIORITY, Priorities, Retention
from paged_kv.tiers.sequences import SequenceRetention

if TYPE_CHECKING:
    from collections import Counter
    from collections.abc import Container

    from paged_kv.allocator.groups import GroupAllocator
    from paged_kv.allocator.prefix_cache import PrefixCache

WRITE_POLICIES = ("back", "through")
LAYOUTS = ("split", "unified")


class CacheTiers(MovesDown):
    """Host and disk tiers for ``manager``'s keyed blocks, attached to it (module doc).

    ``host_bytes``/``disk_bytes``: capacity of each tier in bytes, split between layer
    groups as their device pools are. ``disk_dir``: where the disk tier's files live;
    an existing tier there is adopted (a warm restart) if it was written under the
    same page spec and ``layout`` (the cache's page layout), else `TierError`, as for
    a corrupt file, with nothing loaded; its blocks keep the priorities they were
    written with. ``policy``: "lru" or "arc", per tier.
    ``write``: "back" (move down on eviction) or "through" (copy down when keyed).
    ``keep_bytes=False``: bookkeeping only (the simulator). Priorities (`retention`):
    ``default_priority`` (0-100) of blocks no `Retention` names, ``drop_below``: blocks
    under it are dropped when evicted instead of moved down (0: none), ``clock``: the
    seconds that `Retention.duration_s` counts. ``copy_threads``: threads that copy a
    move's bytes between a pool in host memory and the host tier (`copies`: the caller
    and ``copy_threads - 1`` workers, each taking the next copy; 1: the caller alone)."""

    def __init__(self, manager: KVCacheManager, *, host_bytes: int = 0, disk_bytes: int = 0,
                 disk_dir: str | None = None, policy: str = "lru", write: str = "back", layout: str = "split",
                 keep_bytes: bool = True, default_priority: int = DEFAULT_PRIORITY, drop_below: int = 0,
                 clock: Callable[[], float] = time.monotonic, copy_threads: int = 1):
        if not isinstance(manager, KVCacheManager):
            raise SpecError(f"CacheTiers needs a KVCacheManager; got {type(manager).__name__}")
        if manager.prefix_cache is None:
            raise SpecError("tiers keep prefix-cached blocks: build KVCacheManager(spec, prefix_cache=True)")
        if manager.tiers is not None:
            raise InvalidArgumentError("this manager already has tiers attached; detach() them first")
        for name, value in (("host_bytes", host_bytes), ("disk_bytes", disk_bytes)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise InvalidArgumentError(f"{name}={value!r} must be a non-negative integer (bytes)")
        for name, choice, allowed in (("policy", policy, POLICIES), ("write", write, WRITE_POLICIES),
                                      ("layout", layout, LAYOUTS)):
            if choice not in allowed:
                raise InvalidArgumentError(f"{name}={choice!r} is not one of {allowed}")
        priorities = Priorities(default_priority, clock)  # InvalidArgumentError naming a bad default
        if isinstance(drop_below, bool) or not isinstance(drop_below, (int, np.integer)) or not 0 <= drop_below <= 101:
            raise InvalidArgumentError(f"drop_below={drop_below!r} must be an integer priority in [0, 101] (0: drop none)")
        if isinstance(copy_threads, bool) or not isinstance(copy_threads, (int, np.integer)) or \
                not 1 <= copy_threads <= 64:
            raise InvalidArgumentError(f"copy_threads={copy_threads!r} must be an integer in [1, 64] (threads that "
                                       "copy a host move's bytes; 1: the calling thread alone)")
        if disk_dir is not None and not keep_bytes:
            raise InvalidArgumentError("disk_dir holds page bytes: leave it out with keep_bytes=False")
        if disk_bytes and keep_bytes and disk_dir is None:  # a disk tier of page bytes needs a place on disk
            raise InvalidArgumentError(f"disk_bytes={disk_bytes!r} needs disk_dir= (a directory for the page files), "
                                       "or leave disk_bytes out")
        spec = self.spec = manager.spec
        self.manager, self.write, self.layout, self.keep_bytes = manager, write, layout, bool(keep_bytes)
        self.copy_threads = int(copy_threads)
        weights = [g.num_blocks * spec.group_bytes_per_block(i) for i, g in enumerate(spec.groups)]
        host_caps, disk_caps = split_bytes(int(host_bytes), spec, weights), split_bytes(int(disk_bytes), spec, weights)
        directory = None
        found: list[list[tuple[int, int, int, float | None]]] = [[] for _ in spec.groups]
        if disk_dir is not None:
            directory = DiskDirectory(disk_dir, spec, layout, budget=int(disk_bytes))
            found = directory.scan(len(spec.groups))  # all verified, or TierError: nothing attached yet
        self.directory = directory
        self.priorities, self.drop_below = priorities, int(drop_below)
        self.host = [HostTier(c, policy, self.keep_bytes, priorities, self.copy_threads) for c in host_caps]
        self.disk = [DiskTier(c, policy, g, directory, priorities) for g, c in enumerate(disk_caps)]
        for g, entries in enumerate(found):
            keep = entries[len(entries) - disk_caps[g]:] if disk_caps[g] else []
            for key, *_ in entries[: len(entries) - len(keep)]:
                directory.forget(g, key)  # type: ignore[union-attr]  # entries come only from a directory; more than the tier holds now: the oldest go
            for key, parent, priority, expiry in keep:
                priorities.restore(key, priority, expiry)  # first: the tier's policy ranks it as it enters
                self.disk[g].adopt(key, parent)
        if directory is not None:
            directory.dirty.clear()  # the priorities just restored are the ones on disk
        self.sequences = SequenceRetention(priorities, spec.block_size, manager.__contains__,
                                           lambda key: any(self.where(g, key) for g in range(len(spec.groups))),
                                           sum(g.num_blocks for g in spec.groups) + sum(host_caps) + sum(disk_caps))
        self.stats = TierStats()
        self.downloads: list[Download] = []
        self.uploads: dict[tuple[int, int], Upload] = {}
        self.in_flight: list[Any] | None = None  # downloads dispatched, not landed (`movement`)
        self.staging: list[list[np.ndarray]] = []  # upload staging rows, kept between flushes (`movement`)
        self.staging_busy: Any = None  # a result of the last upload: ready once it read the staging rows
        for g, group in enumerate(manager.groups):
            cache: PrefixCache = group.cache  # type: ignore[assignment]  # not None: the manager has a prefix cache (checked above)
            self.host[g].on_evict = lambda key, parent, pages, g=g: self._host_evicted(g, key, parent, pages)
            cache.on_evict = lambda b, key, parent, behind, g=g: self._device_evicted(g, b, key, parent, behind)
            cache.choose = priorities.choose(cache.hash_of)  # lower priorities evicted first
            cache.on_store = (lambda b, key, parent, g=g: self._keyed(g, b, key, parent)) \
                if write == "through" else None
        manager.tiers = self

    def detach(self) -> None:
        """Stop serving ``manager`` (pending moves are dropped: call `movement.flush` first)."""
        for group in self.manager.groups:
            del group.cache.on_evict, group.cache.on_store, group.cache.choose  # type: ignore[union-attr]  # every group has a cache (checked in __init__); back to the class's None
        del self.manager.tiers
        self.sync_disk()  # blocks staged for the disk are written (a restart finds them)

    # ---- lookups -----------------------------------------------------------------------
    def where(self, group: int, key: int) -> str | None:
        """The highest medium holding ``key`` in ``group``: "device", "host", "disk" or None."""
        if key in self.manager.groups[group].cache.block_of:  # type: ignore[union-attr]  # the manager has a prefix cache (checked in __init__)
            return "device"
        return "host" if key in self.host[group] else "disk" if key in self.disk[group] else None

    def _present(self, g: int) -> Container[int]:
        block_of, host, disk = self.manager.groups[g].cache.block_of, self.host[g], self.disk[g]  # type: ignore[union-attr]  # the manager has a prefix cache (checked in __init__)

        class Present:
            def __contains__(self, key: object) -> bool:
                return key in block_of or key in host or key in disk

        return Present()

    def prepare(self, token_ids: Sequence[int] | np.ndarray, cache_key: bytes | str | int | None = None,
                chunk: int | None = None) -> int:
        """Bring this prompt's hits below the device into fresh device blocks, keyed in
        the device cache (their bytes land at the next `movement.flush`); returns the
        blocks brought up in group 0. Nothing is brought up when the prompt would not
        fit with them (admission then fails as it would without tiers). Bad tokens or
        salt: the manager's typed errors, nothing changed."""
        m, bs = self.manager, self.spec.block_size
        tokens = check_token_ids(token_ids, "prepare")
        hashes = chain_hashes(tokens, bs, tokens.size // bs, cache_key)
        limit = min((tokens.size - 1) // bs, self.spec.max_blocks_per_seq)
        while True:
            hit = common_hit(m.groups, hashes, limit, [self._present(g) for g in range(len(m.groups))])
            if hit <= common_hit(m.groups, hashes, limit):
                return 0
            below = [[j for j in range(g.hit_start(hit), hit) if hashes[j] not in g.cache.block_of] for g in m.groups]  # type: ignore[union-attr]  # the manager has a prefix cache (checked in __init__)
            try:
                disk_pages = self._read_disk(below, hashes)
            except _Corrupt:
                continue  # that key is gone now: plan again without it
            break
        hold = tokens.size if chunk is None else min(hit * bs + int(chunk), tokens.size)
        rest = self.spec.blocks_for(hold) - hit
        for g, js in zip(m.groups, below):
            pool, cache = g.pool, g.cache
            resident = [cache.block_of[hashes[j]] for j in range(g.hit_start(hit), hit) if hashes[j] in cache.block_of]  # type: ignore[union-attr]  # the manager has a prefix cache (checked in __init__)
            idle = sum(1 for b in resident if pool.ref_counts[b] == 0)
            if len(js) + rest > pool.num_free - idle:
                return 0
        for gi, (g, js) in enumerate(zip(m.groups, below)):
            self._bring_up(gi, g, js, hashes, hit, disk_pages[gi])
        return len(below[0])

    def _read_disk(self, below: list[list[int]], hashes: list[int]) -> list[dict[int, Pages]]:
        """Verified pages of the keys only the disk holds (with bytes kept), per group."""
        out: list[dict[int, Pages]] = [{} for _ in below]
        for g, js in enumerate(below):
            for j in js:
                key = hashes[j]
                if key in self.host[g] or not self.keep_bytes:
                    continue
                try:
                    out[g][key] = self.disk[g].read(key)
                except TierError:
                    self.stats.corrupt += 1
                    self.disk[g].remove(key)
                    self._emit(g, "removed", key, NO_HASH, -1, "disk")
                    raise _Corrupt() from None
        return out

    def _bring_up(self, gi: int, group: GroupAllocator, js: list[int], hashes: list[int], hit: int,
                  disk_pages: dict[int, Pages]) -> None:
        cache: PrefixCache
        cache, pool = group.cache, group.pool  # type: ignore[assignment]  # the manager has a prefix cache (checked in __init__)
        # The device hits of this prompt go to the back of eviction first, so the
        # allocation below evicts other blocks.
        # They are held out of eviction while this allocation runs: with priorities a
        # low one of them would otherwise go before other blocks.
        revived = []
        for j in range(group.hit_start(hit), hit):
            b = cache.block_of.get(hashes[j])
            if b is not None and cache.is_evictable(b):
                cache.revive(b)
                revived.append(b)
        if not js:
            cache.evictable.update((b, None) for b in revived)
            return
        # The allocation may evict device blocks into the host tier, whose evictions must
        # not take the keys being brought up: pinned until their upload is staged.
        host = self.host[gi]
        mediums = ["host" if hashes[j] in host else "disk" for j in js]
        for j, medium in zip(js, mediums):
            if medium == "host":
                host.pin(hashes[j])
        ids = pool.allocate(len(js))
        cache.evictable.update((b, None) for b in revived)
        for b, j, medium in zip(ids.tolist(), js, mediums):
            key, parent = hashes[j], hashes[j - 1] if j else NO_HASH
            cache.store(b, key, parent)
            if medium == "host" and not self.keep_bytes:
                host.unpin(key)
            if gi == 0:
                self.stats.hit_blocks[medium] += 1
            nbytes = self.spec.group_bytes_per_block(gi)
            self.stats.blocks_up += 1
            self.stats.bytes_up += nbytes
            up = Upload(gi, b, int(pool.generation[b]), key)
            if medium == "host":
                host.touch(key)
            else:
                if key in self.disk[gi]:  # a spill from the host tier may have pushed it out meanwhile
                    self.disk[gi].touch(key)
                self.stats.bytes_from_disk += nbytes
                if self.keep_bytes:
                    up.pages = disk_pages[key]
                    if self._to_host(gi, key, parent, up.pages):
                        up.pages = None  # now in a host slot: uploaded from there
            if self.keep_bytes:
                if up.pages is None and medium == "disk":
                    host.pin(key)  # staged into a host slot: read from there at the flush
                self.uploads[(gi, b)] = up
        pool.free(ids)  # keyed, so kept as evictable (most recently used) until admit_prompt revives them

    # ---- priorities (`sequences`) ----------------------------------------------------------
    def retention_plan(self, retention: object, num_tokens: int) -> dict[int, int]:
        """Block index -> priority that ``retention`` gives ``num_tokens`` tokens;
        `InvalidArgumentError` naming a bad value (the manager asks before it changes
        anything)."""
        return self.sequences.plan(retention, num_tokens)

    def retain(self, seq_id: int, hashes: Sequence[int], num_tokens: int, plan: dict[int, int] | None,
               retention: Retention | None, previous: Sequence[int] | None) -> None:
        """``seq_id``'s chain is ``hashes`` (admitted: ``previous`` None; `cache_tokens`:
        the chain it replaces): its blocks take their priorities (`sequences`)."""
        self.sequences.retain(seq_id, hashes, num_tokens, plan, retention, previous)

    # ---- events and checks -------------------------------------------------------------
    def _emit(self, g: int, kind: str, key: int, parent: int, slot: int, medium: str) -> None:
        self.manager.groups[g].cache._emit(PrefixEvent(kind, key, parent, slot, medium))  # type: ignore[union-attr]  # the manager has a prefix cache (checked in __init__)

    def _emit_all(self, g: int, events: list[PrefixEvent]) -> None:
        """`_emit` of events already made, in order."""
        emit = self.manager.groups[g].cache._emit  # type: ignore[union-attr]  # the manager has a prefix cache (checked in __init__)
        for event in events:
            emit(event)

    def hit_tokens(self) -> dict[str, int]:
        """Prompt tokens served per medium so far (the device's: the prefix cache's hits
        less those brought up from below)."""
        bs = self.spec.block_size
        below = {k: v * bs for k, v in self.stats.hit_blocks.items()}
        return {"device": self.manager.prefix_cache.hit_tokens - sum(below.values()), **below}  # type: ignore[union-attr]  # the manager has a prefix cache (checked in __init__)

    def check_integrity(self) -> None:
        """Raise AssertionError unless every tier's index agrees with itself, pins match
        the moves pending, and each pending upload's block is keyed with its key."""
        from collections import Counter

        pins: Counter[tuple[int, int]] = Counter()
        for d in self.downloads:
            if d.key in self.host[d.group].slot_of:
                pins[(d.group, d.key)] += 1
        for up in self.uploads.values():
            if up.pages is None:
                pins[(up.group, up.key)] += 1
            cache = self.manager.groups[up.group].cache
            if cache.hash_of[up.block] != up.key:  # type: ignore[union-attr]  # the manager has a prefix cache (checked in __init__)
                raise AssertionError(f"pending upload into block {up.block} of group {up.group}: the block is not "
                                     "keyed with its key any more")
        for g, (host, disk) in enumerate(zip(self.host, self.disk)):
            host.check_integrity()
            disk.check_integrity()
            if disk.directory is not None and g == 0:
                disk.directory.check_integrity()
            have = {(g, k): n for k, n in host.pins.items()}
            want = {k: n for k, n in pins.items() if k[0] == g}
            if self.in_flight is None and have != want:
                raise AssertionError(f"group {g}: host pins {have} != moves pending {want}")


class _Corrupt(Exception):
    """A disk page failed verification during `prepare` (it was dropped)."""


__all__ = ["CacheTiers", "Download", "TierStats", "Upload", "WRITE_POLICIES"]
