"""`CacheTiers`' moves down, a part of the class (a mixin it inherits) in its own file so
that each file holds one idea: a block the device evicts (write-back) or keys
(write-through) queued as a copy down, the copies landed into the host tier or staged
for the disk, the host's evictions spilled to disk, and the disk's segment writes
submitted and collected (`disk`). `tiers.py`'s module doc has the rules.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from paged_kv.allocator.prefix_cache import PrefixEvent
from paged_kv.tiers.host import Pages
from paged_kv.tiers.records import Download, Upload

if TYPE_CHECKING:
    from paged_kv.allocator.manager import KVCacheManager
    from paged_kv.spec import CacheSpec
    from paged_kv.tiers.disk import DiskDirectory
    from paged_kv.tiers.disk_tier import DiskTier
    from paged_kv.tiers.host import HostTier
    from paged_kv.tiers.records import TierStats
    from paged_kv.tiers.retention import Priorities


class MovesDown:
    """The moves down of `CacheTiers` (module doc); the state is the class's."""

    spec: CacheSpec
    manager: KVCacheManager
    write: str
    keep_bytes: bool
    drop_below: int
    priorities: Priorities
    directory: DiskDirectory | None
    host: list[HostTier]
    disk: list[DiskTier]
    stats: TierStats
    downloads: list[Download]
    uploads: dict[tuple[int, int], Upload]

    if TYPE_CHECKING:
        def _emit(self, g: int, kind: str, key: int, parent: int, slot: int, medium: str) -> None: ...

        def _emit_all(self, g: int, events: list[PrefixEvent]) -> None: ...

    # ---- the disk's writes (`disk`: one segment per flush, written in the background) ----
    def submit_disk(self) -> None:
        """What the flush staged for the disk goes to its writer (`movement.flush`)."""
        if self.directory is not None:
            self.directory.submit(self.priorities.record)
            self._lost(self.directory.collect())

    def sync_disk(self) -> None:
        """Wait until every block staged for the disk is in its file."""
        if self.directory is not None:
            self._lost(self.directory.sync(self.priorities.record))

    def _lost(self, keys: list[tuple[int, int]]) -> None:
        """Blocks whose segment failed to write (`DiskDirectory.errors` says why) leave the
        index, as if evicted."""
        for g, key in keys:
            parent = self.disk[g].parent_of.pop(key, None)
            if parent is not None:
                self.disk[g].policy.remove(key)
                self.stats.disk_errors += 1
                self._emit(g, "removed", key, parent, -1, "disk")

    # ---- moves down ----------------------------------------------------------------------
    def _device_evicted(self, g: int, block: int, key: int, parent: int, behind: bool) -> None:
        up = self.uploads.pop((g, block), None)
        if up is not None:  # brought up and evicted before the flush: nothing to write
            if up.pages is None:
                self.host[g].unpin(up.key)
        if key in self.host[g].slot_of or key in self.disk[g]:
            (self.host[g] if key in self.host[g].slot_of else self.disk[g]).touch(key)
            return
        if behind and self.manager.groups[g].local:
            self.stats.dropped += 1  # behind its chain's window: no hit at a chain's end reads it
            return
        if self.priorities.of(key) < self.drop_below:
            self.stats.dropped += 1  # not worth the bytes below (`retention`)
            return
        self._copy_down(g, block, key, parent)

    def _keyed(self, g: int, block: int, key: int, parent: int) -> None:
        """Write-through: a block just keyed is copied down now."""
        if key not in self.host[g].slot_of and key not in self.disk[g] and self.priorities.of(key) >= self.drop_below:
            self._copy_down(g, block, key, parent)

    def _copy_down(self, g: int, block: int, key: int, parent: int) -> None:
        nbytes = self.spec.group_bytes_per_block(g)
        if not self.keep_bytes:
            self.stats.blocks_down += 1
            self.stats.bytes_down += nbytes
            if self.host[g].capacity:
                self.host[g].insert(key, parent, ready=True)
                self._emit(g, "stored", key, parent, self.host[g].slot_of.get(key, -1), "host")
                if self.write == "through":
                    self._to_disk(g, key, parent, None)
            else:
                self._to_disk(g, key, parent, None)
            return
        if self.host[g].capacity and key not in self.host[g].slot_of and self.host[g].insert(key, parent) is not None:
            self.host[g].pin(key)  # its slot is written when the copy lands
        elif not self.disk[g].capacity:
            self.stats.dropped += 1
            return
        gen = int(self.manager.groups[g].pool.generation[block])
        self.downloads.append(Download(g, block, gen, key, parent))

    def land(self, downloads: list[Download], oks: np.ndarray, pages: Pages,
             shapes: list[list[tuple[tuple[int, ...], np.dtype]]] | None = None) -> None:
        """Copies down of one group finished (`movement`): row ``i`` of every
        ``pages[layer][leaf]`` holds ``downloads[i]``'s bytes where ``oks[i]``; elsewhere
        the device refused the copy (the block changed hands before it ran). The bytes
        bound for the host land in one slice copy per run of rows and leaf
        (`HostTier.write_rows`). ``shapes``: the pages' slot shapes as the caller last
        checked them (`HostTier.ensure_buffers`), else read off ``pages``."""
        if not downloads:
            return
        g = downloads[0].group
        host, nbytes = self.host[g], self.spec.group_bytes_per_block(g)
        keys: list[int] = []
        rows: list[int] = []
        # One pass, Python lookups hoisted out of it: at 64 blocks a flush, each
        # attribute lookup or method call per block was ~1% of a 16 MiB move's time.
        slot_of, pins, through, landed = host.slot_of, host.pins, self.write == "through", 0
        for i, (d, ok) in enumerate(zip(downloads, oks.tolist())):
            key = d.key
            in_host = key in slot_of
            if in_host:  # unpinned (`HostTier.unpin`, inline)
                left = pins[key] - 1
                if left > 0:
                    pins[key] = left
                else:
                    del pins[key]
            if not ok:
                self.stats.refused += 1
                if in_host and key not in pins and key not in host.ready:
                    host.remove(key)
                continue
            landed += 1
            if in_host:
                keys.append(key)
                rows.append(i)
            if not in_host or through:
                self._to_disk(g, key, d.parent, [[a[i] for a in layer] for layer in pages])
        self.stats.blocks_down += landed
        self.stats.bytes_down += landed * nbytes
        if keys:
            host.ensure_buffers(shapes if shapes is not None else
                                [[(a.shape[1:], a.dtype) for a in layer] for layer in pages])
            events: list[PrefixEvent] = []

            def make_events() -> None:
                # While workers copy the bytes, or on one thread before them: Python run
                # after a copy of many MiB runs several times slower (its caches
                # flushed). Sent once the bytes are in their slots.
                parent_of = {d.key: d.parent for d in downloads}
                events.extend(PrefixEvent("stored", key, parent_of[key], slot_of[key], "host") for key in keys)

            whole = rows[-1] == len(rows) - 1  # rows 0..k-1: a slice, no temporary
            host.write_rows(keys, pages, slice(0, len(rows)) if whole else np.asarray(rows, np.intp), make_events)
            self._emit_all(g, events)

    def _to_host(self, g: int, key: int, parent: int, pages: Pages) -> bool:
        host = self.host[g]
        if not host.capacity or host.insert(key, parent) is None:
            return False
        host.ensure_buffers([[(a.shape, a.dtype) for a in layer] for layer in pages])
        host.write(key, pages)
        self._emit(g, "stored", key, parent, host.slot_of[key], "host")
        return True

    def _host_evicted(self, g: int, key: int, parent: int, pages: Pages | None) -> None:
        self._emit(g, "removed", key, parent, -1, "host")
        if key not in self.disk[g] and self.priorities.of(key) >= self.drop_below:
            self._to_disk(g, key, parent, pages)

    def _to_disk(self, g: int, key: int, parent: int, pages: Pages | None) -> None:
        disk = self.disk[g]
        if not disk.capacity or key in disk or (self.keep_bytes and pages is None):
            if not disk.capacity:
                self.stats.dropped += 1
            return
        for victim, vparent in disk.insert(key, parent, pages):
            self._emit(g, "removed", victim, vparent, -1, "disk")
        if key not in disk:  # only higher priorities could have made room
            self.stats.dropped += 1
            return
        self.stats.bytes_to_disk += self.spec.group_bytes_per_block(g)
        self._emit(g, "stored", key, parent, -1, "disk")


__all__ = ["MovesDown"]
