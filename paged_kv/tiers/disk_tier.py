"""`DiskTier`: one layer group's keys on the disk tier -- the index and eviction policy;
the bytes live in the tier's `DiskDirectory` (shared by the groups), or nowhere (the
simulator counts keys only)."""

from __future__ import annotations

from paged_kv.tiers.disk import DiskDirectory
from paged_kv.tiers.host import Pages
from paged_kv.tiers.policy import ARC, LRU, make_policy
from paged_kv.tiers.retention import Priorities, Ranked


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
        if priorities is not None and directory is not None:
            priorities.listeners.append(lambda key: directory.reprioritized(group, key))
            priorities.renewals.append(lambda key: directory.reprioritized(group, key))

    def __contains__(self, key: object) -> bool:
        return key in self.parent_of

    def __len__(self) -> int:
        return len(self.parent_of)

    def insert(self, key: int, parent: int, pages: Pages | None) -> list[tuple[int, int]]:
        """Store ``key`` (staging its bytes when there is a directory), evicting the
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
                self.directory.forget(self.group, victim)
        if self.directory is not None and pages is not None:
            self.directory.stage(self.group, key, parent, pages)
        self.parent_of[key] = parent
        self.policy.insert(key)
        return evicted

    def adopt(self, key: int, parent: int) -> None:
        """A verified block found when the directory was opened (a warm restart)."""
        if len(self.parent_of) < self.capacity:
            self.parent_of[key] = parent
            self.policy.insert(key)

    def read(self, key: int) -> Pages:
        """``key``'s verified pages (`TierError` for a bad block; the caller drops it)."""
        return self.directory.read(self.group, key)  # type: ignore[union-attr]  # unchecked: keep_bytes with disk_bytes but no disk_dir gets here with None (AttributeError)

    def touch(self, key: int) -> None:
        self.policy.touch(key)

    def remove(self, key: int) -> None:
        if self.parent_of.pop(key, None) is not None:
            self.policy.remove(key)
            if self.directory is not None:
                self.directory.forget(self.group, key)

    def check_integrity(self) -> None:
        """Raise AssertionError unless the index and the policy agree (and each key's
        bytes are staged or in a segment)."""
        if set(self.policy.keys()) != set(self.parent_of) or len(self.parent_of) > self.capacity:
            raise AssertionError("disk tier: the policy's keys differ from the index, or it is over capacity")
        if self.directory is not None:
            missing = [k for k in self.parent_of if (self.group, k) not in self.directory]
            if missing:
                raise AssertionError(f"disk tier group {self.group}: keys without bytes: {missing[:3]}")


__all__ = ["DiskTier"]
