"""The disk tier: keyed pages as files in a directory, written atomically, readable by
any process on the host (and by a restarted one: a warm restart).

Layout of the directory::

    tier.json            what every file below was written under: format, version,
                         the spec's page-defining fields (key offsets, format, shapes),
                         the page layout
    g{G}-{KEY:032x}.npz  one block of layer group G keyed KEY: every layer's leaves

A page file is a paged_kv checkpoint file (`paged_kv.checkpoint_files`: atomic
write, a SHA-256 of every array in a header with its own digest, a verified read
that turns every way a file can be bad into `CheckpointError`) whose header also
says which group, key and parent it holds and under which manifest. So the checks
are the checkpoint's, written once.

Opening a directory either accepts all of it or nothing (`DiskDirectory.scan`):
another spec, layout, version or key offsets, or any corrupt file, is a `TierError`
before anything is indexed. A file corrupted later (read at a hit) is dropped and
the hit becomes a miss: a hit never serves bytes it did not verify.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any

import attrs
import numpy as np

from paged_kv import checkpoint_files as files
from paged_kv.errors import CheckpointError, TierError
from paged_kv.spec import CacheSpec
from paged_kv.tiers.host import Pages
from paged_kv.tiers.policy import ARC, LRU, make_policy
from paged_kv.tiers.retention import Priorities, Ranked

TIER_FORMAT = "paged_kv.tier"
TIER_VERSION = 1
MANIFEST = "tier.json"
POOL_SIZES = frozenset({"num_blocks", "sliding_num_blocks", "chunked_num_blocks", "max_batch_slots",
                        "max_blocks_per_seq"})
"""Spec fields a restarted process may change: they size the device pool, not a page."""
_NAME = re.compile(r"^g(\d+)-([0-9a-f]{32})\.npz$")


def page_fields(spec: CacheSpec, layout: str) -> dict[str, Any]:
    """What a page's bytes mean: the spec's fields but the pool sizes, and the layout."""
    fields = attrs.asdict(spec, filter=lambda a, _: a.init and a.name not in POOL_SIZES)
    return json.loads(json.dumps({"spec": fields, "layout": layout}, sort_keys=True, default=repr))  # type: ignore[no-any-return]  # json.loads is typed Any (a dict here)


class DiskDirectory:
    """A tier directory checked against ``spec`` and ``layout`` (module doc)."""

    def __init__(self, path: str | os.PathLike[str], spec: CacheSpec, layout: str):
        self.path = os.fsdecode(os.fspath(path))
        self.fields = page_fields(spec, layout)
        self.tag = hashlib.sha256(json.dumps(self.fields, sort_keys=True).encode()).hexdigest()
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

    def file(self, group: int, key: int) -> str:
        return os.path.join(self.path, f"g{group}-{key:032x}.npz")

    def write(self, group: int, key: int, parent: int, pages: Pages) -> None:
        """Write one page file atomically (a reader sees the old file or the whole new one)."""
        arrays = {f"l{i}.{j}": np.ascontiguousarray(a) for i, layer in enumerate(pages) for j, a in enumerate(layer)}
        header = {
            "format": files.FORMAT_NAME, "version": files.FORMAT_VERSION,
            "tier": {"format": TIER_FORMAT, "version": TIER_VERSION, "manifest": self.tag, "group": group,
                     "key": f"{key:032x}", "parent": f"{parent:032x}", "layers": len(pages),
                     "leaves": [len(layer) for layer in pages]},
            "arrays": [{"name": n, "shape": list(a.shape), "dtype": a.dtype.str, "sha256": files.sha256(a)}
                       for n, a in arrays.items()],
        }
        text = json.dumps(header, sort_keys=True).encode("utf-8")
        digest = hashlib.sha256(text).hexdigest().encode("ascii")
        try:
            files.atomic_write(self.file(group, key), {"header": np.frombuffer(text, np.uint8),
                                                       "digest": np.frombuffer(digest, np.uint8), **arrays})
        except CheckpointError as exc:
            raise TierError(f"disk tier {self.path!r}: {exc}") from exc

    def read(self, group: int, key: int) -> tuple[int, Pages]:
        """``(parent, pages)`` of a verified page file; `TierError` naming what is wrong."""
        path = self.file(group, key)
        try:
            header, arrays = files.read(path)
        except CheckpointError as exc:
            raise TierError(f"disk tier page {path!r} is unreadable: {exc}") from exc
        tier = header.get("tier")
        if not isinstance(tier, dict) or tier.get("format") != TIER_FORMAT or tier.get("version") != TIER_VERSION:
            raise TierError(f"disk tier page {path!r} is not a {TIER_FORMAT} version {TIER_VERSION} page file")
        if tier.get("manifest") != self.tag:
            raise TierError(f"disk tier page {path!r} was written under another spec or layout than {MANIFEST} "
                            "says; delete it")
        if tier.get("group") != group or tier.get("key") != f"{key:032x}":
            raise TierError(f"disk tier page {path!r} holds group {tier.get('group')} key {tier.get('key')}, not what "
                            "its name says: it was renamed; delete it")
        try:
            parent = int(tier["parent"], 16)
            pages = [[arrays[f"l{i}.{j}"] for j in range(int(n))] for i, n in enumerate(tier["leaves"])]
        except (KeyError, TypeError, ValueError) as exc:
            raise TierError(f"disk tier page {path!r}: its header does not describe its arrays ({exc})") from exc
        return parent, pages

    def delete(self, group: int, key: int) -> None:
        try:
            os.unlink(self.file(group, key))
        except FileNotFoundError:
            pass

    def scan(self, num_groups: int) -> list[list[tuple[int, int]]]:
        """Per group, ``(key, parent)`` of every page file, oldest first, each verified;
        `TierError` at the first bad one (nothing is indexed then: all or nothing)."""
        found = []
        for name in os.listdir(self.path):
            if name == MANIFEST or name.startswith("."):  # temporary files of writes in flight
                continue
            m = _NAME.match(name)
            if m is None or int(m.group(1)) >= num_groups:
                raise TierError(f"disk tier {self.path!r} holds {name!r}, which is not a page file of this spec's "
                                f"{num_groups} layer groups; remove it")
            path = os.path.join(self.path, name)
            found.append((os.stat(path).st_mtime_ns, name, int(m.group(1)), int(m.group(2), 16)))
        out: list[list[tuple[int, int]]] = [[] for _ in range(num_groups)]
        for _, _, group, key in sorted(found):
            parent, _ = self.read(group, key)
            out[group].append((key, parent))
        return out


class DiskTier:
    """One group's keys on disk: the index and policy; bytes in a `DiskDirectory` (or
    none: the simulator counts keys only)."""

    medium = "disk"

    def __init__(self, capacity: int, policy: str, group: int, directory: DiskDirectory | None,
                 priorities: Priorities | None = None):
        self.capacity = int(capacity)
        base = make_policy(policy, self.capacity)
        self.policy: LRU | ARC | Ranked = base if priorities is None else Ranked(base, priorities)
        self.group = group
        self.directory = directory
        self.parent_of: dict[int, int] = {}

    def __contains__(self, key: object) -> bool:
        return key in self.parent_of

    def __len__(self) -> int:
        return len(self.parent_of)

    def insert(self, key: int, parent: int, pages: Pages | None) -> list[tuple[int, int]]:
        """Store ``key`` (writing its file when there is a directory), evicting the
        policy's victims to make room; returns the ``(key, parent)`` evicted. Not stored
        when only keys of a higher priority could make room."""
        if key in self.parent_of:
            self.policy.touch(key)
            return []
        if self.capacity == 0:
            return []
        evicted: list[tuple[int, int]] = []
        while len(self.parent_of) >= self.capacity:
            victim = self.policy.victim((), key)
            if victim is None:  # every key has a higher priority than this one: not stored
                return evicted
            self.policy.evicted(victim)
            evicted.append((victim, self.parent_of.pop(victim)))
            if self.directory is not None:
                self.directory.delete(self.group, victim)
        if self.directory is not None and pages is not None:
            self.directory.write(self.group, key, parent, pages)
        self.parent_of[key] = parent
        self.policy.insert(key)
        return evicted

    def adopt(self, key: int, parent: int) -> None:
        """A verified file found when the directory was opened (a warm restart)."""
        if len(self.parent_of) < self.capacity:
            self.parent_of[key] = parent
            self.policy.insert(key)

    def read(self, key: int) -> Pages:
        """``key``'s verified pages (`TierError` for a bad file; the caller drops it)."""
        return self.directory.read(self.group, key)[1]  # type: ignore[union-attr]  # unchecked: keep_bytes with disk_bytes but no disk_dir gets here with None (AttributeError)

    def touch(self, key: int) -> None:
        self.policy.touch(key)

    def remove(self, key: int) -> None:
        if self.parent_of.pop(key, None) is not None:
            self.policy.remove(key)
            if self.directory is not None:
                self.directory.delete(self.group, key)

    def check_integrity(self) -> None:
        """Raise AssertionError unless the index and the policy agree (and files exist)."""
        if set(self.policy.keys()) != set(self.parent_of) or len(self.parent_of) > self.capacity:
            raise AssertionError("disk tier: the policy's keys differ from the index, or it is over capacity")
        if self.directory is not None:
            missing = [k for k in self.parent_of if not os.path.exists(self.directory.file(self.group, k))]
            if missing:
                raise AssertionError(f"disk tier group {self.group}: keys without files: {missing[:3]}")


__all__ = ["DiskDirectory", "DiskTier", "MANIFEST", "TIER_FORMAT", "TIER_VERSION", "page_fields"]
