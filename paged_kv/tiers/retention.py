"""Priorities and retention of cached blocks (issue 24 item 2; TensorRT-LLM's
``KvCacheRetentionConfig``).

A request may give token ranges of its prompt a priority from 0 to 100
(`Retention`, passed to ``KVCacheManager.admit_prompt(..., retention=)``); blocks no
range covers keep the default (`DEFAULT_PRIORITY`, 35 as in TensorRT-LLM). A block
takes the priority of a range that covers it whole (the highest where several do): a
block that mixes a shared system prompt with a user's tokens is never shared, so it
is not worth keeping at the system prompt's priority. An optional duration in
seconds (`CacheTiers(clock=)`, monotonic by default) makes the priority expire; the
block then falls back to the default. The latest retention that names a block sets it.

Tokens written at decode time: ``decode_priority`` (and ``decode_duration_s``) rank
the blocks holding tokens past those the retention's ranges index -- the generated
ones, keyed when `KVCacheManager.cache_tokens` gives the sequence's tokens (the only
way generated blocks get keys). A retention given to ``cache_tokens`` ranks that
call's tokens by its ranges, and its decode priority the tokens generated after
(`paged_kv.tiers.sequences`).

Lower priorities are evicted first in every tier: the device's prefix cache (its
``choose`` hook ranks the evictable blocks), the host and the disk tier (`Ranked`
wraps their LRU or ARC policy: one LRU per priority other than the default, the
policy itself for the default, lowest first). Blocks under ``CacheTiers(drop_below=)``
are dropped when evicted rather than moved down.

Priorities outlive the process with the disk tier: each segment records its blocks'
priorities, and an expiry as absolute wall-clock time (`time.time`), re-based onto
the restarted process's clock when it opens the directory (`record`, `restore`); one
that passed meanwhile is back at the default. Blocks above the disk (device, host)
start at the default in a new process unless `persist` wrote them down.
"""

from __future__ import annotations

import heapq
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Container, Sequence
from itertools import islice

import attrs
import numpy as np

from paged_kv.errors import InvalidArgumentError
from paged_kv.tiers.policy import ARC, LRU

DEFAULT_PRIORITY = 35
wall_clock: Callable[[], float] = time.time
"""The clock expiries are written to disk in (`Priorities.record`); a test that drives
`CacheTiers(clock=)` by hand moves this one along with it."""
MIN_PRIORITY, MAX_PRIORITY = 0, 100


def _priority(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not MIN_PRIORITY <= value <= MAX_PRIORITY:
        raise InvalidArgumentError(f"{what}={value!r} must be an integer priority in [{MIN_PRIORITY}, {MAX_PRIORITY}]")
    return int(value)


@attrs.frozen
class Retention:
    """Priorities for token ranges of one prompt: ``ranges`` of ``(start, stop,
    priority)`` (``stop`` None: to the end of the prompt), for ``duration_s`` seconds
    (None: until evicted). Checked by `block_priorities` (`InvalidArgumentError`
    naming the bad value; nothing changes)."""

    ranges: Sequence[tuple[int, int | None, int]]
    duration_s: float | None = None
    decode_priority: int | None = None
    """Priority of blocks holding tokens generated after this retention (module doc);
    None: they keep the default."""
    decode_duration_s: float | None = None

    def block_priorities(self, num_tokens: int, block_size: int) -> dict[int, int]:
        """Block index -> priority for a prompt of ``num_tokens`` (full blocks only);
        checks every field first."""
        if isinstance(self.ranges, (str, bytes)) or not isinstance(self.ranges, Sequence):
            raise InvalidArgumentError(f"Retention.ranges={self.ranges!r} must be a sequence of (start, stop, priority)")
        for name in ("duration_s", "decode_duration_s"):
            d = getattr(self, name)
            if d is not None and (isinstance(d, bool) or not isinstance(d, (int, float)) or not d > 0
                                  or not math.isfinite(d)):
                raise InvalidArgumentError(f"Retention.{name}={d!r} must be a positive number of seconds, or None")
        if self.decode_priority is not None:
            _priority(self.decode_priority, "Retention.decode_priority")
        elif self.decode_duration_s is not None:
            raise InvalidArgumentError(f"Retention.decode_duration_s={self.decode_duration_s!r} without a "
                                       "decode_priority: give decode_priority= too, or leave the duration out")
        out: dict[int, int] = {}
        for r in self.ranges:
            if not isinstance(r, tuple) or len(r) != 3:
                raise InvalidArgumentError(f"Retention range {r!r} must be a (start, stop, priority) tuple")
            start, stop, priority = r
            p = _priority(priority, f"priority of range {r!r}")
            end = num_tokens if stop is None else stop
            for name, v in (("start", start), ("stop", end)):
                if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                    raise InvalidArgumentError(f"Retention range {r!r}: {name}={v!r} must be a non-negative integer")
            if start > end or end > num_tokens:
                raise InvalidArgumentError(f"Retention range {r!r} is not within the prompt's {num_tokens} tokens")
            for j in range(-(-int(start) // block_size), int(end) // block_size):  # blocks covered whole
                out[j] = max(out.get(j, MIN_PRIORITY), p)
        return out


class Priorities:
    """Each key's priority other than the default, with expiry; tiers listen for changes."""

    def __init__(self, default: int = DEFAULT_PRIORITY, clock: Callable[[], float] = time.monotonic):
        self.default = _priority(default, "default_priority")
        self.clock = clock
        self.entries: dict[int, tuple[int, float]] = {}  # key -> (priority, expiry; inf: none)
        self._expiries: list[tuple[float, int]] = []
        # Called with a key whose priority changed (a tier moves it between its levels).
        self.listeners: list[Callable[[int], None]] = []
        # Called with a key whose priority stayed but whose expiry moved (the disk tier
        # writes it again; the tiers' order does not change).
        self.renewals: list[Callable[[int], None]] = []

    @property
    def active(self) -> bool:
        """Whether any key has a priority other than the default."""
        return bool(self.entries)

    def of(self, key: int) -> int:
        entry = self.entries.get(key)
        return self.default if entry is None else entry[0]

    def set(self, key: int, priority: int, duration_s: float | None) -> None:
        expiry = math.inf if duration_s is None else self.clock() + duration_s
        old = self.entries.get(key)
        if priority == self.default:
            changed = self.entries.pop(key, None) is not None
        else:
            changed = self.of(key) != priority
            self.entries[key] = (priority, expiry)
            if duration_s is not None:
                heapq.heappush(self._expiries, (expiry, key))
        if changed:
            for listener in self.listeners:
                listener(key)
        elif old is not None and old[1] != expiry:
            for listener in self.renewals:
                listener(key)

    def record(self, key: int) -> tuple[int, float | None]:
        """``key``'s priority and its expiry as wall-clock time (None: none), as the disk
        tier writes them (module doc)."""
        entry = self.entries.get(key)
        if entry is None:
            return self.default, None
        priority, expiry = entry
        return priority, None if math.isinf(expiry) else wall_clock() + (expiry - self.clock())

    def restore(self, key: int, priority: int, wall_expiry: float | None) -> None:
        """A priority read back from disk (`record`'s), its expiry re-based onto this
        process's clock; one already past is the default (nothing to restore)."""
        if wall_expiry is None:
            self.set(key, priority, None)
            return
        left = wall_expiry - wall_clock()
        if left > 0:
            self.set(key, priority, left)

    def expire(self) -> None:
        """Expired priorities fall back to the default (cheap when none is due)."""
        if not self._expiries or self._expiries[0][0] > self.clock():
            return
        now = self.clock()
        while self._expiries and self._expiries[0][0] <= now:
            expiry, key = heapq.heappop(self._expiries)
            entry = self.entries.get(key)
            if entry is not None and entry[1] == expiry:  # not renewed since
                del self.entries[key]
                for listener in self.listeners:
                    listener(key)

    def prune(self, keep: Callable[[int], bool]) -> None:
        """Drop the entries of keys that ``keep`` says no tier holds any more."""
        for key in [k for k in self.entries if not keep(k)]:
            del self.entries[key]

    def choose(self, hash_of: Sequence[int]) -> Callable[[OrderedDict[int, None], int], list[int]]:
        """The device prefix cache's ``choose`` hook: ``n`` of its evictable blocks,
        lowest priority first, least recently released first among equals."""
        def choose(evictable: OrderedDict[int, None], n: int) -> list[int]:
            self.expire()
            if not self.entries:
                return list(islice(evictable, n))
            return heapq.nsmallest(n, evictable, key=lambda b: self.of(hash_of[b]))  # stable: LRU among equals
        return choose


class Ranked:
    """An eviction policy (LRU or ARC) for default-priority keys, one LRU per other
    priority, victims from the lowest priority up (module doc). Same interface as the
    policy it wraps."""

    def __init__(self, base: LRU | ARC, priorities: Priorities):
        self.base = base
        self.name, self.capacity = base.name, base.capacity
        self.priorities = priorities
        self.levels: dict[int, OrderedDict[int, None]] = {}
        self.level_of: dict[int, int] = {}
        priorities.listeners.append(self._changed)

    def __len__(self) -> int:
        return len(self.base) + len(self.level_of)

    def __contains__(self, key: int) -> bool:
        return key in self.level_of or key in self.base

    def _put(self, key: int, priority: int) -> None:
        if priority == self.priorities.default:
            self.base.insert(key)
        else:
            self.levels.setdefault(priority, OrderedDict())[key] = None
            self.level_of[key] = priority

    def _take(self, key: int) -> None:
        level = self.level_of.pop(key)
        del self.levels[level][key]
        if not self.levels[level]:
            del self.levels[level]

    def insert(self, key: int) -> None:
        self._put(key, self.priorities.of(key))

    def touch(self, key: int) -> None:
        priority = self.priorities.of(key)
        if self.level_of.get(key, self.priorities.default) != priority:
            self._changed(key)
        elif key in self.level_of:
            self.levels[priority].move_to_end(key)
        else:
            self.base.touch(key)

    def remove(self, key: int) -> None:
        if key in self.level_of:
            self._take(key)
        else:
            self.base.remove(key)

    def evicted(self, key: int) -> None:
        if key in self.level_of:
            self._take(key)
        else:
            self.base.evicted(key)

    def victim(self, pinned: Container[int] = (), incoming: int | None = None) -> int | None:
        """The key to evict next, lowest priority first; never one pinned, nor one of a
        higher priority than the ``incoming`` key's (a tier does not give up a system
        prompt for a default block: that one is dropped instead); None if none may go."""
        self.priorities.expire()
        default = self.priorities.default
        limit = MAX_PRIORITY if incoming is None else self.priorities.of(incoming)
        levels = sorted(x for x in self.levels if x <= limit)
        for level in (x for x in levels if x < default):
            key = next((k for k in self.levels[level] if k not in pinned), None)
            if key is not None:
                return key
        key = self.base.victim(pinned) if default <= limit else None
        if key is not None:
            return key
        for level in (x for x in levels if x > default):
            key = next((k for k in self.levels[level] if k not in pinned), None)
            if key is not None:
                return key
        return None

    def keys(self) -> list[int]:
        """Keys, first to go first."""
        default = self.priorities.default
        low = [k for level in sorted(self.levels) if level < default for k in self.levels[level]]
        high = [k for level in sorted(self.levels) if level > default for k in self.levels[level]]
        return [*low, *self.base.keys(), *high]

    def _changed(self, key: int) -> None:
        """``key``'s priority changed: it moves to its new level (as most recent)."""
        if key in self.level_of:
            self._take(key)
        elif key in self.base:
            self.base.remove(key)
        else:
            return
        self._put(key, self.priorities.of(key))


__all__ = ["DEFAULT_PRIORITY", "MAX_PRIORITY", "MIN_PRIORITY", "Priorities", "Ranked", "Retention"]
