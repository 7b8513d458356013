"""The disk tier's directory: keyed pages in segment files in a directory, written atomically,
readable by any process on the host (and by a restarted one: a warm restart).

Layout of the directory::

    tier.json                 what every segment was written under: format, version,
                              the spec's page-defining fields (key offsets, format,
                              shapes), the page layout
    {SEQ:016x}-{ID}.seg       a segment: the blocks one flush moved down, every
                              group's, with their parents, priorities and expiries
                              (`segments` has the layout and the checks)

Moves down are staged (`DiskDirectory.stage`: the block's bytes copied into a reused
buffer, the one copy on the evicting step's critical path) and written by `submit`,
once per flush, as one segment by a background thread (CRC32s, one ``writev``, one
fsync, a rename), so the fsync never stalls a step. Until its segment is on disk a
block is read from its buffer. `sync` waits for every write (``flush(wait=True)``,
`persist`, a shutdown). A write that fails (a full disk) loses its blocks: they leave
the index as if evicted.

A key lives in one segment; a segment whose blocks have all been evicted (or
superseded) is deleted, and one mostly dead is compacted (its live blocks written
again) once the files take twice the tier's bytes. Priorities that change while a
block is on disk are written as updates in the next segment.

Opening a directory either accepts all of it or nothing (`DiskDirectory.scan`):
another spec, layout, format version (version 1's one file per block included) or key
offsets, or any corrupt segment, is a `TierError` before anything is indexed. A block
corrupted later (read at a hit) is dropped and the hit becomes a miss: a hit never
serves bytes it did not verify.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import uuid
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import attrs
import numpy as np

from paged_kv.errors import TierError
from paged_kv.spec import CacheSpec
from paged_kv.tiers import segments
from paged_kv.tiers.host import Pages
from paged_kv.tiers.segments import TIER_FORMAT, TIER_VERSION, Leaves, Segment

MANIFEST = "tier.json"
POOL_SIZES = frozenset({"num_blocks", "sliding_num_blocks", "chunked_num_blocks", "max_batch_slots",
                        "max_blocks_per_seq"})
"""Spec fields a restarted process may change: they size the device pool, not a page."""
_NAME = re.compile(r"^([0-9a-f]{16})-([0-9a-f]{8})\.seg$")
_OLD_NAME = re.compile(r"^g\d+-[0-9a-f]{32}\.npz$")  # format 1: one file per block
IN_FLIGHT = 2  # segments written at once at most: a step that outruns the disk waits for the oldest
MAPS = 32  # segments kept mapped for reads (a map keeps its file open)
FREE_BYTES = 128 * 2**20  # staging buffers kept for reuse (fresh memory faults its pages in every flush)

Where = Callable[[int], "tuple[int, float | None]"]
"""Key -> (priority, expiry as wall-clock time or None): what a segment records."""


def page_fields(spec: CacheSpec, layout: str) -> dict[str, Any]:
    """What a page's bytes mean: the spec's fields but the pool sizes, and the layout."""
    fields = attrs.asdict(spec, filter=lambda a, _: a.init and a.name not in POOL_SIZES)
    return json.loads(json.dumps({"spec": fields, "layout": layout}, sort_keys=True, default=repr))  # type: ignore[no-any-return]  # json.loads is typed Any (a dict here)


class DiskDirectory:
    """A tier directory checked against ``spec`` and ``layout`` (module doc)."""

    def __init__(self, path: str | os.PathLike[str], spec: CacheSpec, layout: str, budget: int = 0):
        self.path = os.fsdecode(os.fspath(path))
        self.fields = page_fields(spec, layout)
        self.tag = hashlib.sha256(json.dumps(self.fields, sort_keys=True).encode()).hexdigest()
        self.budget = budget  # the tier's bytes: files past twice this are compacted
        self.loc: dict[tuple[int, int], tuple[Segment, int]] = {}
        self.update_of: dict[tuple[int, int], Segment] = {}
        self.segments: dict[str, Segment] = {}
        self.staged: list[tuple[int, int, int, np.ndarray]] = []  # (group, key, parent, bytes) of the next segment
        self.staged_leaves: dict[int, Leaves] = {}
        self.dirty: set[tuple[int, int]] = set()  # keys on disk whose priority changed since written
        self.in_flight: list[Segment] = []
        self.lost: list[tuple[int, int]] = []  # keys whose segment failed to write, for `collect`
        self.errors: list[str] = []
        self._free: dict[int, list[np.ndarray]] = {}
        self._maps: OrderedDict[str, mmap.mmap] = OrderedDict()  # segments read from, mapped (`read`), MAPS at most
        self._free_bytes = 0
        self._sizes: dict[int, int] = {}  # bytes of a staged block per group
        self._unlinks: list[Future[None]] = []  # deletions of segment files, run by the writer thread
        self._pool: ThreadPoolExecutor | None = None
        self._next = 0
        manifest = os.path.join(self.path, MANIFEST)
        if os.path.exists(manifest):
            self._check_manifest(manifest)
        else:
            os.makedirs(self.path, exist_ok=True)
            text = json.dumps({"format": TIER_FORMAT, "version": TIER_VERSION, **self.fields}, sort_keys=True)
            tmp = f"{manifest}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, manifest)

    def _check_manifest(self, manifest: str) -> None:
        try:
            with open(manifest) as f:
                saved = json.load(f)
        except (OSError, ValueError) as exc:
            raise TierError(f"disk tier {self.path!r}: {MANIFEST} cannot be read ({exc}); the directory is corrupt: "
                            "delete it (a tier is a cache) or point disk_dir elsewhere") from exc
        if not isinstance(saved, dict) or saved.get("format") != TIER_FORMAT or saved.get("version") != TIER_VERSION:
            what = (saved.get("format"), saved.get("version")) if isinstance(saved, dict) else type(saved).__name__
            raise TierError(f"disk tier {self.path!r} is {what}, not {TIER_FORMAT!r} version {TIER_VERSION}: it was "
                            "written by another paged_kv version; delete it or point disk_dir elsewhere")
        theirs = {"spec": saved.get("spec"), "layout": saved.get("layout")}
        if theirs != self.fields:
            diff = sorted(k for k in set(self.fields["spec"]) | set(theirs["spec"] or {})
                          if (theirs["spec"] or {}).get(k) != self.fields["spec"].get(k))
            if theirs["layout"] != self.fields["layout"]:
                diff.append("layout")
            raise TierError(f"disk tier {self.path!r} was written under another page spec (fields {diff} differ, "
                            "e.g. kv_format, kv_key_offsets or the layout): its pages would be read as other values; "
                            "open it with the spec it was written under, or point disk_dir elsewhere")

    # ---- blocks ----------------------------------------------------------------------
    def __contains__(self, gk: object) -> bool:
        return gk in self.loc

    def stage(self, group: int, key: int, parent: int, pages: Pages) -> None:
        """Copy one block into the next segment (written at `submit`); the key's older
        copy, if any, is superseded."""
        leaves = segments.leaves_of(pages)
        if self.staged_leaves.setdefault(group, leaves) != leaves:
            raise TierError(f"disk tier {self.path!r}: a page of group {group} with leaves {leaves}, where this "
                            f"flush's others have {self.staged_leaves[group]}: the tier was written for other pages")
        n = self._sizes.get(group) or self._sizes.setdefault(group, segments.block_bytes(leaves))
        free = self._free.get(n)
        if free:
            buf = free.pop()
            self._free_bytes -= n
        else:
            buf = np.empty(n, np.uint8)
        segments.pack(pages, buf)
        self.forget(group, key)
        self.staged.append((group, key, parent, buf))
        self.loc[(group, key)] = (_STAGED, len(self.staged) - 1)

    def read(self, group: int, key: int) -> Pages:
        """``key``'s pages, verified (`TierError` naming what is wrong: the caller drops it)."""
        seg, i = self.loc[(group, key)]
        if seg is _STAGED:
            return segments.unpack(self.staged[i][3].copy(), self.staged_leaves[group])
        if not seg.written:
            assert seg.buffers is not None
            return segments.unpack(seg.buffers[i].copy(), seg.leaves[group])
        path = os.path.join(self.path, seg.name)
        n, at = seg.nbytes[group], seg.start + seg.offsets[i]
        try:
            # Mapped, not read: the bytes come from the page cache without a copy or
            # fresh memory (a segment is never rewritten in place; one deleted stays
            # mapped while a view of it lives).
            mapped = self._maps.get(seg.name)
            if mapped is None:
                with open(path, "rb") as f:
                    mapped = self._maps[seg.name] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                if len(self._maps) > MAPS:  # each map holds a file descriptor until no view of it is left
                    self._maps.popitem(last=False)
            else:
                self._maps.move_to_end(seg.name)
            data = memoryview(mapped)[at: at + n]
        except (OSError, ValueError) as exc:
            raise TierError(f"disk tier segment {path!r} cannot be read ({exc})") from exc
        assert seg.crcs is not None
        if len(data) != n or segments.crc(group, key, data) != seg.crcs[i]:
            raise TierError(f"disk tier segment {path!r}: block {key:032x} of group {group} fails its CRC32; it is "
                            "corrupt (dropped: a miss)")
        return segments.unpack(data, seg.leaves[group])

    def forget(self, group: int, key: int) -> None:
        """``key`` left the tier (evicted, corrupt, superseded): its segment may go."""
        gk = (group, key)
        where = self.loc.pop(gk, None)
        self.dirty.discard(gk)
        upd = self.update_of.pop(gk, None)
        if upd is not None:
            upd.updates.discard(gk)
            self._retire_if_dead(upd)
        if where is None:
            return
        seg, i = where
        if seg is _STAGED:  # not written yet: its buffer goes back
            self._give_back(self.staged[i][3])
            self.staged[i] = (group, key, -1, _EMPTY)
            return
        seg.live -= 1
        self._retire_if_dead(seg)

    def reprioritized(self, group: int, key: int) -> None:
        """``key``'s priority changed while on disk: its new one goes in the next segment."""
        if (group, key) in self.loc and self.loc[(group, key)][0] is not _STAGED:
            self.dirty.add((group, key))

    def _retire_if_dead(self, seg: Segment) -> None:
        """Delete ``seg`` once none of its blocks is live; updates it holds for live keys
        are written again (a segment of updates alone waits for those keys to go)."""
        if seg.live or (not seg.meta and seg.updates) or seg.name not in self.segments:
            return
        for gk in seg.updates:
            if self.update_of.get(gk) is seg:
                del self.update_of[gk]
                self.dirty.add(gk)
        seg.updates.clear()
        if seg.written:
            del self.segments[seg.name]
            self._maps.pop(seg.name, None)  # unmapped once no view of it is left
            # Unlinking a file of many MiB takes milliseconds: the writer thread does it.
            self._unlinks.append(self._writer().submit(segments.unlink, os.path.join(self.path, seg.name)))
            self._unlinks = [f for f in self._unlinks if not f.done()]
        # else: deleted when its write is collected (`collect`)

    def _give_back(self, buf: np.ndarray) -> None:
        if buf.size and self._free_bytes + buf.size <= FREE_BYTES:
            self._free.setdefault(buf.size, []).append(buf)
            self._free_bytes += buf.size

    def _writer(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="paged_kv-disk-tier")
        return self._pool

    # ---- writing ---------------------------------------------------------------------
    def submit(self, entry_of: Where) -> None:
        """Write what was staged (and the priorities that changed) as one segment, in the
        background; at most `IN_FLIGHT` at once (else wait for the oldest)."""
        self.collect()
        self._compact()
        staged = [s for s in self.staged if s[3] is not _EMPTY]
        if not staged and not self.dirty:
            self.staged.clear()
            return
        while len(self.in_flight) >= IN_FLIGHT:
            oldest = self.in_flight[0].future
            assert oldest is not None  # in flight: submitted
            oldest.exception()  # waits; an error is collect's to handle
            self.collect()
        name = f"{self._next_seq():016x}-{uuid.uuid4().hex[:8]}.seg"
        offsets, at = [], 0
        for _, _, _, buf in staged:
            offsets.append(at)
            at += buf.size
        buffers = [b for *_, b in staged]
        seg = Segment(name, [(g, k, p) for g, k, p, _ in staged], dict(self.staged_leaves), offsets,
                      live=len(staged), buffers=buffers)
        for i, (g, k, _, _) in enumerate(staged):
            self.loc[(g, k)] = (seg, i)
        blocks = [(g, k, p, *entry_of(k)) for g, k, p, _ in staged]
        updates = [(g, k, *entry_of(k)) for g, k in sorted(self.dirty)]
        for gk in self.dirty:
            old = self.update_of.get(gk)
            if old is not None:
                old.updates.discard(gk)
                self._retire_if_dead(old)
            self.update_of[gk] = seg
            seg.updates.add(gk)
        self.dirty.clear()
        self.staged, self.staged_leaves = [], {}
        self.segments[name] = seg
        seg.future = self._writer().submit(segments.write_segment, self.path, name, self.tag, seg.leaves, blocks,
                                           updates, buffers)
        self.in_flight.append(seg)

    def collect(self) -> list[tuple[int, int]]:
        """Note the segments written since (without waiting); returns the keys lost to
        a failed write (the caller drops them from its index)."""
        while self.in_flight and self.in_flight[0].future is not None and self.in_flight[0].future.done():
            seg = self.in_flight.pop(0)
            assert seg.future is not None and seg.buffers is not None
            try:
                seg.crcs, seg.start = seg.future.result()
            except OSError as exc:
                self.errors.append(f"{seg.name}: {exc}")
                del self.segments[seg.name]
                for i, (g, k, _) in enumerate(seg.meta):
                    if self.loc.get((g, k)) == (seg, i):
                        del self.loc[(g, k)]
                        self.lost.append((g, k))
                for gk in seg.updates:
                    if self.update_of.get(gk) is seg:
                        del self.update_of[gk]
                        if gk in self.loc:
                            self.dirty.add(gk)
            else:
                seg.size = seg.start + sum(b.size for b in seg.buffers)
                self._retire_if_dead(seg)
            for buf in seg.buffers:
                self._give_back(buf)
            seg.buffers, seg.future = None, None
        lost, self.lost = self.lost, []
        return lost

    def sync(self, entry_of: Where) -> list[tuple[int, int]]:
        """Submit what is staged and wait until every segment is on disk; returns the
        keys lost to a failed write."""
        self.submit(entry_of)
        for seg in list(self.in_flight):
            if seg.future is not None:
                seg.future.exception()  # waits; errors are collect's
        for f in self._unlinks:
            f.result()
        self._unlinks.clear()
        return self.collect()

    def _next_seq(self) -> int:
        self._next += 1
        return self._next - 1

    def _compact(self) -> None:
        """Once the files take over twice the tier's bytes, the written segment with the
        fewest live blocks (for its size) has them staged again and goes (one per call)."""
        used = sum(s.size - s.start for s in self.segments.values())  # blocks' bytes: headers are small next to them
        if not self.budget or used <= 2 * self.budget:
            return
        done = [s for s in self.segments.values() if s.written and s.meta]
        if not done:
            return
        seg = min(done, key=lambda s: s.live / len(s.meta))
        for i, (g, k, p) in enumerate(seg.meta):
            if self.loc.get((g, k)) == (seg, i):
                try:
                    pages = self.read(g, k)
                except TierError:
                    self.forget(g, k)
                    self.lost.append((g, k))
                    continue
                self.stage(g, k, p, pages)
        self._retire_if_dead(seg)

    # ---- opening ---------------------------------------------------------------------
    def scan(self, num_groups: int) -> list[list[tuple[int, int, int, float | None]]]:
        """Per group, ``(key, parent, priority, expiry)`` of every block on disk, oldest
        first, each verified (a later segment's copy or update wins); `TierError` at the
        first bad segment or foreign file, with nothing indexed (all or nothing)."""
        names = []
        for name in sorted(os.listdir(self.path)):
            if name == MANIFEST or name.startswith("."):  # temporary files of writes in flight
                continue
            if _OLD_NAME.match(name):
                raise TierError(f"disk tier {self.path!r} holds {name!r}, a page file of tier format 1; this is "
                                f"format {TIER_VERSION}: delete the directory (a tier is a cache) or point disk_dir "
                                "elsewhere")
            if _NAME.match(name) is None:
                raise TierError(f"disk tier {self.path!r} holds {name!r}, which is not a segment of this tier; "
                                "remove it")
            names.append(name)
        found: dict[tuple[int, int], tuple[Segment, int, int, float | None]] = {}
        segs = []
        for name in names:
            path = os.path.join(self.path, name)
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError as exc:
                raise TierError(f"disk tier segment {path!r} cannot be read ({exc})") from exc
            leaves, blocks, updates, start = segments.parse(path, data, self.tag, num_groups)
            offsets, at, crcs = [], 0, []
            view = memoryview(data)
            for g, k, _, _, _, n, c in blocks:
                if segments.crc(g, k, view[start + at: start + at + n]) != c:
                    raise TierError(f"disk tier segment {path!r}: block {k:032x} of group {g} fails its CRC32; the "
                                    "file is corrupt: delete it (or the directory: a tier is a cache)")
                offsets.append(at)
                crcs.append(c)
                at += n
            seg = Segment(name, [(g, k, p) for g, k, p, *_ in blocks], leaves, offsets, crcs, start, size=len(data))
            segs.append((seg, blocks, updates))
        for seg, blocks, updates in segs:  # all verified: now indexed
            self.segments[seg.name] = seg
            for i, (g, k, _, priority, expiry, _, _) in enumerate(blocks):
                old = found.pop((g, k), None)  # a later copy: this key's recency is now this one's
                if old is not None:
                    old[0].live -= 1
                found[(g, k)] = (seg, i, priority, expiry)
                seg.live += 1
                upd = self.update_of.pop((g, k), None)  # the block's own record is later
                if upd is not None:
                    upd.updates.discard((g, k))
            for g, k, priority, expiry in updates:
                if (g, k) in found:
                    s, i, _, _ = found[(g, k)]
                    found[(g, k)] = (s, i, priority, expiry)
                    old_upd = self.update_of.get((g, k))
                    if old_upd is not None:
                        old_upd.updates.discard((g, k))
                    self.update_of[(g, k)] = seg
                    seg.updates.add((g, k))
        self._next = max((int(_NAME.match(s.name).group(1), 16) + 1 for s in self.segments.values()), default=0)  # type: ignore[union-attr]  # every name matched _NAME above
        out: list[list[tuple[int, int, int, float | None]]] = [[] for _ in range(num_groups)]
        for (g, k), (seg, i, priority, expiry) in found.items():
            self.loc[(g, k)] = (seg, i)
            out[g].append((k, seg.meta[i][2], priority, expiry))
        for seg in list(self.segments.values()):
            self._retire_if_dead(seg)
        return out

    def check_integrity(self) -> None:
        for (g, k), (seg, i) in self.loc.items():
            if seg is _STAGED:
                if self.staged[i][:2] != (g, k):
                    raise AssertionError(f"disk tier: staged block {i} is not group {g} key {k:032x}")
                continue
            if seg.name not in self.segments or seg.meta[i][:2] != (g, k):
                raise AssertionError(f"disk tier: group {g} key {k:032x} points at a segment that lacks it")
            if seg.written and not os.path.exists(os.path.join(self.path, seg.name)):
                raise AssertionError(f"disk tier: segment {seg.name} of group {g} key {k:032x} has no file")
        live: dict[str, int] = {}
        for seg, _ in self.loc.values():
            if seg is not _STAGED:
                live[seg.name] = live.get(seg.name, 0) + 1
        for seg in self.segments.values():
            if seg.live != live.get(seg.name, 0):
                raise AssertionError(f"disk tier: segment {seg.name} counts {seg.live} live blocks, holds "
                                     f"{live.get(seg.name, 0)}")


_STAGED = Segment("<staged>", [], {}, [])  # where a key staged for the next segment lives
_EMPTY = np.empty(0, np.uint8)  # a staged block forgotten before its segment was written


__all__ = ["DiskDirectory", "MANIFEST", "TIER_FORMAT", "TIER_VERSION", "page_fields"]
