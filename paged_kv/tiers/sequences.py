"""Retention per sequence: what a request's `Retention` gives the keys of its blocks,
at admission (the prompt's) and when `KVCacheManager.cache_tokens` keys the tokens it
generated (the decode priority).

Why per sequence: generated tokens get keys only when the caller hands the
sequence's tokens to ``cache_tokens`` -- the manager never sees token ids otherwise
-- so the decode priority named at admission must wait for that call. A sequence's
record holds where its generated blocks start, the priority, and the chain the
manager keeps for it; ``cache_tokens`` passes the chain it replaces, and only the
same list (the same sequence, not a new one under a reused id, nor a fork) takes the
record's priority. Priorities go to keys (`Priorities`), set before the blocks are
keyed, so a block takes its rank the moment the device's prefix cache stores it and
in every tier it reaches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import attrs

from paged_kv.errors import InvalidArgumentError
from paged_kv.tiers.retention import Priorities, Retention


@attrs.define
class Decoding:
    """A sequence's decode priority: blocks from ``start`` on hold generated tokens;
    ``done`` of them have it; ``chain`` is the manager's chain of the sequence."""

    start: int
    priority: int
    duration_s: float | None
    chain: Sequence[int]
    done: int = 0


class SequenceRetention:
    """The priorities requests give their blocks (module doc). ``live(seq_id)``: whether
    the manager still holds a sequence; ``held(key)``: whether any tier holds a key;
    ``capacity``: the blocks every tier holds together (entries past twice that are
    pruned now and then)."""

    def __init__(self, priorities: Priorities, block_size: int, live: Callable[[int], bool],
                 held: Callable[[int], bool], capacity: int):
        self.priorities, self.block_size = priorities, block_size
        self.live, self.held, self.capacity = live, held, capacity
        self.decoding: dict[int, Decoding] = {}

    def plan(self, retention: object, num_tokens: int) -> dict[int, int]:
        """Block index -> priority that ``retention`` gives ``num_tokens`` tokens;
        `InvalidArgumentError` naming a bad value (asked before anything changes)."""
        if not isinstance(retention, Retention):
            raise InvalidArgumentError(f"retention={retention!r} must be a paged_kv.tiers.Retention")
        return retention.block_priorities(num_tokens, self.block_size)

    def retain(self, seq_id: int, hashes: Sequence[int], num_tokens: int, plan: dict[int, int] | None,
               retention: Retention | None, previous: Sequence[int] | None) -> None:
        """A sequence's chain is ``hashes`` over ``num_tokens`` tokens: at admission
        (``previous`` None) or at ``cache_tokens`` (``previous``: the chain it had).
        Generated blocks keyed since take the sequence's decode priority, then
        ``plan`` (``retention``'s) ranks its ranges, and ``retention`` (if any) sets the
        decode priority of the tokens generated from here on."""
        record = self.decoding.pop(seq_id, None)
        if record is not None and previous is not None and record.chain is previous:
            for j in range(max(record.start, record.done), len(hashes)):
                self.priorities.set(hashes[j], record.priority, record.duration_s)
            record.chain, record.done = hashes, max(record.done, len(hashes))
            self.decoding[seq_id] = record
        # else: admitted again, or the chain is not the one recorded (a new sequence
        # under a reused id, a fork, a restored manager): no decode priority carries over.
        if plan is not None and retention is not None:
            for j, priority in plan.items():
                if j < len(hashes):
                    self.priorities.set(hashes[j], priority, retention.duration_s)
            self.decoding.pop(seq_id, None)
            if retention.decode_priority is not None:
                start = num_tokens // self.block_size  # the first block that holds a generated token
                self.decoding[seq_id] = Decoding(start, int(retention.decode_priority), retention.decode_duration_s,
                                                 hashes, done=len(hashes))
        self._prune()

    def _prune(self) -> None:
        """Records of released sequences and priorities of keys nobody holds go, once
        there are many (a key a live sequence will key keeps its priority)."""
        if len(self.decoding) > 64 + 2 * sum(1 for s in self.decoding if self.live(s)):
            self.decoding = {s: r for s, r in self.decoding.items() if self.live(s)}
        if len(self.priorities.entries) > 2 * self.capacity + 1024:
            pending = {k for r in self.decoding.values() for k in r.chain}
            self.priorities.prune(lambda key: key in pending or self.held(key))


__all__ = ["Decoding", "SequenceRetention"]
