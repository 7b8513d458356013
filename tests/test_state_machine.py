"""Stateful stress tests: Hypothesis drives every public operation of the host
manager, the decode slots and swapping in random orders, against a model.

Rules: admit, append (batched, with per-sequence counts), release, fork (children
share blocks; writes into a shared partial block copy it first), slot insert and
remove, a decode step over the slots (which also advances each sliding window and
crosses chunk edges), swap out and in, and bad inputs (ids that are not live, slot
misuse, hand-built swap records), each of which must raise its typed error and change
nothing. Every rule has a precondition, so a rule with nothing to act on (a decode
step with no slot filled, a swap-in with nothing swapped out, a release with nothing
live) is never drawn, and picks its sequence among those it can act on; bad inputs
are at most a fifth of an example's rules, and the pools leave room to work, so most
operations succeed. Each machine counts its effective operations (successful appends
and decode steps, copy-on-writes, swap-ins, slot inserts, window/chunk trims, prefix
hits) and the tests put floors on them. Machines:

* `HostMachine`: host bookkeeping only (fast), shadowed by each live sequence's
  length and first held blocks. With `ChunkedHostMachine` (full, sliding and chunked
  layers in one manager) it runs most of CI's rules.
* `DeviceMachine`: the same rules, but every token written gets distinct random
  keys and values (bfloat16, stored as uint16 bits) through the views, and after
  every rule each live sequence is read back through the views and compared, bit
  for bit, with a dense numpy shadow of what was written to it; positions past a
  sequence's length must read as zero. Split layout with a full and a
  sliding-window layer; `UnifiedDeviceMachine`: unified layout with a full and a
  chunked layer (chunks of 6 over blocks of 4).
* `PrefixHostMachine`: the host machine with the prefix cache on, admitting through
  it (shared prompt prefixes, identical prompts in one step, conversations keyed with
  `cache_tokens`), checking that no block is keyed or hit before it is written, in
  every layer group; `HybridPrefixHostMachine` runs it over full, sliding and chunked
  layers, whose caches must agree on every hit.

After every rule: `check_integrity()` of the manager (free xor referenced, ref
counts equal table references, no block in two tables, free + used == total,
lengths within capacity) and of the slots, and the window/chunk rule against an
oracle written here from the length, `WINDOW` and `CHUNK` alone (`visible_from`,
never the library's `LayerGroup.first_visible`): every described step's metadata
starts a local group exactly at the block holding the first position its first query
sees, and each sequence's first held block is exactly the one its history of appends
allows (nothing visible given back, nothing kept a block too long).

CI runs every machine on a fixed seed (`CI_SEED`), so every run executes the same
programs and the floors on counts can sit far below the counts CI really makes
(they catch "stopped doing X", not noise). A soak explores new programs::

    PAGED_KV_SOAK=20 python -m pytest tests/test_state_machine.py -m slow -s

runs each machine on a fresh random seed (printed) with twenty times the examples;
``PAGED_KV_SEED=<seed>`` with the same ``PAGED_KV_SOAK`` replays a soak run.
A failure prints the seed, the minimal failing program as Python calls (Hypothesis'
replayable trace) and a ``@reproduce_failure`` blob.
"""

from __future__ import annotations

import dataclasses
import os
import random
from collections import Counter

import hypothesis
import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import paged_kv as pk
from paged_kv.allocator.swap_record import check_record
from paged_kv.metadata import pad_slot
from paged_kv.swap import swap_in, swap_out

SOAK = int(os.environ.get("PAGED_KV_SOAK", "0"))  # 0: CI (fixed seeds); N: N x the examples on new seeds
SOAK_SEED = os.environ.get("PAGED_KV_SEED")  # replay one soak run
CI_SEED = 0
SCALE = max(SOAK, 1)
MIN_CI_STEPS = 55_000  # rule executions, about three quarters of CI's count
BLOCK = 4
WINDOW = 6
CHUNK = 6  # not a multiple of BLOCK: blocks straddle chunk edges
MAX_LIVE = 6  # admissions and forks wait while this many sequences are live
SLIDING = dict(sliding_window=WINDOW, sliding_num_blocks=16)
CHUNKED = dict(attention_chunk_size=CHUNK, chunked_num_blocks=14)


def make_spec(local: str = "sliding") -> pk.CacheSpec:
    """Layer 0 full, then ``local``: "sliding" (layer 1), "chunked" (layer 1), "both"
    (layer 1 sliding, layer 2 chunked: three groups, one manager) or "none". Pools
    small enough that running out, preemption and block reuse happen within a few
    rules, big enough that most rules succeed: 23 usable blocks, and MAX_LIVE sequences
    of up to max_seq_len = 6 blocks x 4 = 24 tokens (four chunks) would need 36."""
    kinds = {"none": {}, "sliding": dict(SLIDING, sliding_layers=(1,)), "chunked": dict(CHUNKED, chunked_layers=(1,)),
             "both": dict(SLIDING, sliding_layers=(1,), **CHUNKED, chunked_layers=(2,))}[local]
    return pk.CacheSpec(num_layers=3 if local == "both" else 2, num_blocks=24, block_size=BLOCK, max_blocks_per_seq=6,
                        max_batch_slots=8, num_kv_heads=1, head_dim=2, dtype="bfloat16", **kinds)


def visible_from(kind: str, p: int) -> int:
    """The oracle: first position a query at position ``p`` sees, from the definitions of
    the three attention kinds (independent of `LayerGroup.first_visible`)."""
    if kind == "sliding":
        return max(0, p - WINDOW + 1)
    if kind == "chunked":
        return p // CHUNK * CHUNK
    return 0


class HostMachine(RuleBasedStateMachine):
    """Manager + DecodeSlots + host-side swap against a model of lengths and first blocks."""

    counts: Counter = Counter()  # rule executions and effective operations, over all examples (read by the tests)
    device = False
    prefix_cache = False
    local = "sliding"  # the layer kinds beside the full layer (`make_spec`)

    def __init__(self):
        super().__init__()
        self.spec = make_spec(self.local)
        self.kinds = [g.kind for g in self.spec.groups]
        self.manager = pk.KVCacheManager(self.spec, prefix_cache=self.prefix_cache)
        self.slots = pk.DecodeSlots(self.manager, num_slots=3)
        self.lengths: dict[int, int] = {}  # the model: every live sequence's length
        self.firsts: dict[int, list[int]] = {}  # ... and its first held logical block per group
        self.swapped: dict[int, tuple] = {}  # seq -> (SwapRecord or SwappedSequence, firsts)
        self.next_id = 0
        self.rng = np.random.default_rng(0)
        self.ran = Counter()  # this example's counts

    # ---- helpers ------------------------------------------------------------------
    def _count(self, what: str = "rules", n: int = 1) -> None:
        type(self).counts[what] += n
        self.ran[what] += n

    def _unchanged(self, call, error):
        """``call`` must raise ``error`` and leave every piece of state as it was."""
        before = (self.manager.snapshot(), self.slots.snapshot())
        with pytest.raises(error):
            call()
        assert (self.manager.snapshot(), self.slots.snapshot()) == before
        self._count("refused")

    def _forget(self, seq) -> None:
        """``seq`` was released."""
        del self.lengths[seq], self.firsts[seq]

    def _unslotted(self) -> list[int]:
        return [s for s in self.lengths if s not in self.slots]

    def _grew(self, seq: int, old: int) -> None:
        """``seq`` grew from ``old`` tokens: a local group keeps what the new tokens' first
        query (at ``old``) sees, from the block holding `visible_from`."""
        for g, kind in enumerate(self.kinds):
            keep = max(self.firsts[seq][g], visible_from(kind, old) // BLOCK)
            if keep > self.firsts[seq][g]:
                self._count("trims")
            self.firsts[seq][g] = keep

    def write(self, seq_ids, counts, metadata) -> None:
        """Device machine: write the new tokens' keys/values. Host machine: nothing."""

    def step(self, seq_ids, counts, metadata) -> None:
        """Check the step's local starts against the oracle, run it (`write`), then commit
        it most of the time: an engine that skips a commit must lose nothing but caching."""
        self.check_starts(seq_ids, metadata)
        self.write(seq_ids, counts, metadata)
        ids = [s for s in seq_ids if s is not None]
        if ids and self.rng.random() < 0.7:
            self.before_commit(ids)
            self.manager.commit(ids)

    def check_starts(self, seq_ids, metadata) -> None:
        """Each row's first visible block, per group, is exactly the block holding the
        oracle's first visible position for the step's first query: the start never passes
        it (nothing the query sees is missing) and is never a block or more before it."""
        first_query = np.asarray(metadata.kv_lens) - np.asarray(metadata.query_lens)
        for g, kind in enumerate(self.kinds):
            start = np.asarray(metadata.groups[g].start)
            for b, s in enumerate(seq_ids):
                if s is None:
                    continue
                p = int(first_query[b])
                want = visible_from(kind, p)
                assert int(start[b]) <= want, f"seq {s} group {g} ({kind}): a query at {p} sees from {want}, " \
                                              f"the step starts at {int(start[b])}"
                assert int(start[b]) == want // BLOCK * BLOCK, \
                    f"seq {s} group {g} ({kind}): a query at {p} sees from {want}, the step starts at {int(start[b])}"

    def before_commit(self, ids) -> None:
        """Prefix machine: record which blocks the commit makes written."""

    def _appended(self, ids, counts, meta) -> None:
        for s, c in zip(ids, counts):
            if c:
                self._grew(s, self.lengths[s])
        self.step(ids, counts, meta)
        for s, c in zip(ids, counts):
            self.lengths[s] += c

    # ---- rules ---------------------------------------------------------------------
    @initialize(lengths=st.lists(st.integers(1, 20), min_size=1, max_size=3))
    def start(self, lengths):
        """A few sequences to work on, whichever rules this example enables (Hypothesis
        turns a random subset of rules off per example: swarm testing)."""
        for n in lengths:
            self.admit(n)

    @precondition(lambda self: len(self.lengths) < MAX_LIVE)
    @rule(n=st.integers(1, 26))
    def admit(self, n):
        self._count()
        seq = self.next_id
        self.next_id += 1
        if self.manager.can_admit(n):
            self.manager.admit(seq, n)
            self.lengths[seq] = 0
            self.firsts[seq] = [0] * len(self.kinds)
            self.step([seq], [n], self.manager.step_metadata([seq], n))
            self.lengths[seq] = n
            self._count("admits")
            return
        error = pk.SequenceTooLongError if self.spec.blocks_for(n) > self.spec.max_blocks_per_seq else pk.OutOfBlocksError
        self._unchanged(lambda: self.manager.admit(seq, n), error)

    def _growable(self) -> list[int]:
        """Sequences an append may grow: not in a slot, shorter than max_seq_len."""
        return [s for s, n in self.lengths.items() if s not in self.slots and n < self.spec.max_seq_len]

    @precondition(lambda self: self._growable())
    @rule(data=st.data())
    def append(self, data):
        self._count()
        ids = self._growable()
        # At most 4 (a step's batch; the device machine writes it as one).
        chosen = data.draw(st.lists(st.sampled_from(tuple(ids)), min_size=1, max_size=min(len(ids), 4), unique=True))
        # The first sequence grows by 1-7 tokens, within max_seq_len; the others by 0-7
        # (a row with nothing to append rides along unchanged, no trim), at most one past
        # max_seq_len (the whole append is refused, nothing changes).
        room = [self.spec.max_seq_len - self.lengths[s] for s in chosen]
        counts = [data.draw(st.integers(1, min(7, room[0])), label="count")]
        counts += [data.draw(st.integers(0, min(7, r + 1)), label="count") for r in room[1:]]
        if self.manager.can_append(chosen, counts):
            copies = self.manager.num_pending_copies
            self.manager.append(chosen, counts)
            self._count("cows", max(self.manager.num_pending_copies - copies, 0))
            self._appended(chosen, counts, self.manager.step_metadata(chosen, counts))
            self._count("appends")
        else:
            self._unchanged(lambda: self.manager.append(chosen, counts), (pk.OutOfBlocksError, pk.SequenceTooLongError))

    @precondition(lambda self: self.lengths and len(self.lengths) < MAX_LIVE)
    @rule(data=st.data())
    def fork(self, data):
        """A child sharing all the parent's blocks (parallel sampling); later writes
        into a shared partial block go through copy-on-write."""
        self._count()
        parent = _pick(data, sorted(self.lengths), "parent")
        child = self.next_id
        self.next_id += 1
        self.manager.fork(parent, child)
        self.lengths[child] = self.lengths[parent]
        self.firsts[child] = list(self.firsts[parent])
        self.on_fork(parent, child)
        self._count("forks")

    def on_fork(self, parent, child) -> None:
        """Device machine: the child's shadow starts as the parent's."""

    @precondition(lambda self: len(self.lengths) + len(self.swapped) > 1)  # leave one to work on
    @rule(data=st.data())
    def release(self, data):
        self._count()
        seq = _pick(data, sorted([*self.lengths, *self.swapped]), "seq")
        if seq in self.swapped:
            del self.swapped[seq]  # dropping a swapped-out request frees only host memory
            return
        if seq in self.slots:
            self.slots.release(self.slots.slot_of(seq))
        else:
            self.manager.release(seq)
        self._forget(seq)
        self._count("releases")
        self._unchanged(lambda: self.manager.release(seq), pk.UnknownSequenceError)

    @precondition(lambda self: self.slots.free_slots() and any(s not in self.slots for s in self.lengths))
    @rule(data=st.data())
    def insert_slot(self, data):
        self._count()
        seq = _pick(data, self._unslotted(), "seq")
        slot = _pick(data, self.slots.free_slots(), "slot")
        if self.slots.can_insert(seq, slot):
            assert self.slots.insert(seq, slot) == slot
            self._count("slot inserts")
        else:
            self._unchanged(lambda: self.slots.insert(seq, slot), pk.SlotError)

    @precondition(lambda self: len(self.slots))
    @rule(data=st.data())
    def remove_slot(self, data):
        self._count()
        slot = _pick(data, [slot for slot, _ in self.slots.occupied()], "slot")
        seq = self.slots.seq_at(slot)
        assert self.slots.remove(slot) == seq and seq in self.manager

    @precondition(lambda self: len(self.slots))
    @rule()
    def decode_step(self):
        """One token for every slotted sequence: the continuous-batching decode step
        (it also advances each sliding window by a token)."""
        self._count()
        for slot, s in self.slots.occupied():  # finished (max_seq_len): leaves the batch first
            if self.lengths[s] == self.spec.max_seq_len:
                self.slots.release(slot)
                self._forget(s)
                self._count("finished")
        ids = [s for s in self.slots.seq_ids if s is not None]
        if not ids:
            return
        if not self.slots.can_decode():
            self._unchanged(self.slots.decode_step, (pk.OutOfBlocksError, pk.SequenceTooLongError))
            return
        copies = self.manager.num_pending_copies
        meta = self.slots.decode_step()
        self._count("cows", max(self.manager.num_pending_copies - copies, 0))
        seq_ids = self.slots.seq_ids
        for s in ids:
            self._grew(s, self.lengths[s])
        self.step(seq_ids, [1 if s is not None else 0 for s in seq_ids], meta)
        for s in ids:
            self.lengths[s] += 1
        self._count("decodes")
        self._count("decoded tokens", len(ids))

    @precondition(lambda self: any(s not in self.slots for s in self.lengths))
    @rule(data=st.data())
    def swap_out(self, data):
        self._count()
        seq = _pick(data, self._unslotted(), "seq")
        try:
            self.manager.swap_record(seq)
        except pk.StateError:  # a copy into its blocks has not been committed
            self._unchanged(lambda: self.do_swap_out(seq), pk.StateError)
            return
        swapped = self.do_swap_out(seq)
        assert list(self.record_of(swapped).first_blocks) == self.firsts[seq]
        self.swapped[seq] = (swapped, self.firsts.pop(seq))
        del self.lengths[seq]
        assert seq not in self.manager
        self._count("swap outs")

    @precondition(lambda self: self.swapped)
    @rule(data=st.data())
    def swap_in(self, data):
        self._count()
        seq = _pick(data, sorted(self.swapped), "seq")
        record = self.record_of(self.swapped[seq][0])
        if self.manager.can_swap_in(record):
            swapped, firsts = self.swapped.pop(seq)
            self.do_swap_in(swapped)
            self.lengths[seq] = record.num_tokens
            self.firsts[seq] = firsts
            self._count("swap ins")
        else:
            self._unchanged(lambda: self.manager.swap_in(record), pk.OutOfBlocksError)

    # At most about one rule in five of an example: in a state where every rule the
    # example enables has nothing to act on, the example ends instead of running bad
    # inputs alone to the end.
    @precondition(lambda self: self.ran["bad inputs"] * 4 <= self.ran["rules"])
    @rule(data=st.data())
    def bad_inputs(self, data):
        """Bad inputs must fail typed and change nothing: ids that are not live, slot
        misuse (`bad_ids`) and hand-built swap records (`swap_in_foreign_record`). One
        rule, so the bad inputs are a small share of the draws."""
        self._count()
        self._count("bad inputs")
        if data.draw(st.booleans(), label="foreign record"):
            self.swap_in_foreign_record(data)
        else:
            self.bad_ids(data.draw(st.integers(-3, 1000), label="seq"), data.draw(st.integers(0, 2), label="slot"))

    def swap_in_foreign_record(self, data):
        """A hand-built or foreign `SwapRecord` is untrusted: refused, nothing changed."""
        groups = len(self.spec.groups)
        seq = data.draw(st.one_of(st.integers(-2, 3), st.just(True), st.just("7"), st.just(self.next_id + 50)))
        num_tokens = data.draw(st.one_of(st.integers(-1, 40), st.just(3.5), st.just(False)))
        firsts = tuple(data.draw(st.lists(st.integers(-1, 7), min_size=groups - 1, max_size=groups + 1)))
        sizes = data.draw(st.lists(st.integers(0, 8), min_size=len(firsts), max_size=len(firsts)))
        blocks = tuple(np.arange(n, dtype=np.int32) for n in sizes)
        record = pk.SwapRecord(seq, num_tokens, firsts, blocks)
        try:
            check_record(record, self.spec)
        except pk.PagedKVError:
            self._unchanged(lambda: self.manager.swap_in(record), pk.PagedKVError)
            assert not self.manager.can_swap_in(record)
            return
        # A record that fits the spec is a valid request to swap a new sequence in.
        if record.seq_id in self.lengths or record.seq_id in self.swapped or record.seq_id < self.next_id:
            return
        if self.device and any(firsts):  # the device machine writes a foreign sequence from position 0
            return
        if self.manager.can_swap_in(record):
            self.manager.swap_in(record)
            self.firsts[record.seq_id] = list(firsts)
            self.on_foreign_swap_in(record)
            self.lengths[record.seq_id] = record.num_tokens
            self.next_id = record.seq_id + 1
            self._count("foreign swap ins")

    def on_foreign_swap_in(self, record) -> None:
        """Device machine: the foreign sequence's pages hold whatever the blocks held."""

    def bad_ids(self, seq, slot):
        """Operations on ids that are not live, and slot misuse, must fail typed and change nothing."""
        if seq in self.lengths:
            self._unchanged(lambda: self.manager.admit(seq, 1), pk.DuplicateSequenceError)
        else:
            self._unchanged(lambda: self.manager.append([seq], 1), pk.UnknownSequenceError)
            self._unchanged(lambda: self.manager.release(seq), pk.UnknownSequenceError)
        full = [s for s, n in self.lengths.items() if n == self.spec.max_seq_len and s not in self.slots]
        if full:
            self._unchanged(lambda: self.manager.append(full[:1], 1), pk.SequenceTooLongError)
        slotted = self.slots.seq_at(slot)
        if slotted is None:
            self._unchanged(lambda: self.slots.remove(slot), pk.SlotError)
        else:  # a slotted sequence moves only through its slot
            self._unchanged(lambda: self.manager.release(slotted), pk.SlotError)
            self._unchanged(lambda: self.do_swap_out(slotted), pk.SlotError)
            others = self._unslotted()
            if others:
                self._unchanged(lambda: self.slots.insert(others[0], slot), pk.SlotError)

    # ---- swap, host flavour ----------------------------------------------------------
    def do_swap_out(self, seq):
        return self.manager.swap_out(seq)

    def do_swap_in(self, swapped):
        self.manager.swap_in(swapped)

    def record_of(self, swapped):
        return swapped

    # ---- invariants --------------------------------------------------------------------
    @invariant()
    def integrity(self):
        self.manager.check_integrity()
        self.slots.check_integrity()
        assert {s: self.manager.kv_len(s) for s in self.manager.seq_ids} == self.lengths
        used = sum(g.pool.num_used for g in self.manager.groups)
        free = sum(g.pool.num_free for g in self.manager.groups)
        assert used + free == sum(g.num_blocks - 1 for g in self.spec.groups)
        if not self.lengths:
            assert used == 0

    @invariant()
    def first_blocks_match_the_oracle(self):
        """Each group's first held block is the model's (the oracle's block for the first
        query of each growth), and no later than the next query's first visible position."""
        for s, n in self.lengths.items():
            for g, kind in enumerate(self.kinds):
                first = self.spec.blocks_for(n) - self.manager.block_table(s, g).size
                assert first * BLOCK <= visible_from(kind, n), \
                    f"seq {s} group {g} ({kind}): {n} tokens, the next query sees from {visible_from(kind, n)}, " \
                    f"blocks before {first} were given back"
                assert first == self.firsts[s][g], \
                    f"seq {s} group {g} ({kind}): {n} tokens, first held block {first}, the oracle's " \
                    f"{self.firsts[s][g]}"


def _pick(data, values, label: str):
    """One of ``values`` (a tuple, so Hypothesis caches the strategy: building one per draw
    was a third of the host machines' time)."""
    return data.draw(st.sampled_from(tuple(values)), label=label)


class DeviceMachine(HostMachine):
    """The host machine, with every token's keys/values written to the device pages
    and every live sequence read back and compared after every rule."""

    device = True
    layout = "split"

    def __init__(self):
        super().__init__()
        self.cache = pk.PagedKVCache.init(self.spec, layout=self.layout)
        self.shadow: dict[int, np.ndarray] = {}  # seq -> [len, layers, 2, heads, dim] as uint16 bits
        self.checked = None  # what the last read-back saw

    def write(self, seq_ids, counts, metadata) -> None:
        metadata = _one_shape(metadata, self.spec)
        B, T, L = metadata.batch_size, metadata.query_len, self.spec.num_layers
        # Distinct random bfloat16 bit patterns (finite, never zero) per token, layer, K/V.
        bits = self.rng.integers(0x3C00, 0x4700, size=(B, T, L, 2, 1, 2), dtype=np.uint16)
        for b, (s, c) in enumerate(zip(seq_ids, counts)):
            if s is None or c == 0:
                continue
            old = self.shadow.get(s, np.empty((0, L, 2, 1, 2), np.uint16))
            self.shadow[s] = np.concatenate([old[: self.lengths[s]], bits[b, :c]])
        self.cache = _write_all(self.cache, bits, metadata)

    def on_fork(self, parent, child) -> None:
        self.shadow[child] = self.shadow[parent].copy()

    def _forget(self, seq) -> None:
        super()._forget(seq)
        del self.shadow[seq]

    def on_foreign_swap_in(self, record) -> None:
        # The host half alone moves no bytes: the caller copies them in, here as one write.
        self.lengths[record.seq_id] = 0
        self.step([record.seq_id], [record.num_tokens], self.manager.step_metadata([record.seq_id], record.num_tokens))

    def do_swap_out(self, seq):
        return swap_out(self.cache, self.manager, seq)

    def do_swap_in(self, swapped):
        self.cache = swap_in(self.cache, self.manager, swapped)

    def record_of(self, swapped):
        return swapped.record

    @invariant()
    def pages_match_shadow(self):
        # The same pages and host state (a refused call, bad inputs) read as last time.
        state = self.manager.snapshot()
        if self.checked is not None and self.checked[0] is self.cache and self.checked[1] == state:
            return
        self.checked = (self.cache, state)
        ids = self.manager.seq_ids
        for i in range(0, len(ids), self.spec.max_batch_slots):
            self._check_batch(ids[i : i + self.spec.max_batch_slots])

    def _check_batch(self, ids):
        meta = self.manager.step_metadata(ids, 0)
        keys, values = jax.device_get(_read_all(self.cache, _one_shape(meta, self.spec)))
        for layer, view in enumerate(self.cache.views):
            kind = self.kinds[view.group]
            start = np.asarray(meta.groups[view.group].start)
            for b, s in enumerate(ids):
                n = self.lengths[s]
                first = int(start[b])
                # A sliding or chunked layer must still show every token the next query (at
                # position n) attends to -- the last WINDOW - 1, or its chunk -- from the
                # block holding the first of them (the oracle, not the library's rule).
                assert first == visible_from(kind, n) // BLOCK * BLOCK, f"seq {s} layer {layer}: starts at {first}"
                want = self.shadow[s][first:n, layer]
                got_k, got_v = keys[layer][b], values[layer][b]
                assert np.array_equal(got_k[: n - first], want[:, 0]), f"seq {s} layer {layer} keys"
                assert np.array_equal(got_v[: n - first], want[:, 1]), f"seq {s} layer {layer} values"
                assert not got_k[n - first :].any() and not got_v[n - first :].any(), f"seq {s}: bytes past its length"
            # Padding rows of the batch read nothing either.
            assert not keys[layer][len(ids) :].any()


class PrefixHostMachine(HostMachine):
    """The host machine with the prefix cache on (full-attention layers only) and
    admissions through it: prompts share one of a few prefixes, so hits, revivals
    of released blocks and evictions interleave with every other rule."""

    prefix_cache = True
    local = "none"
    PREFIXES = [np.arange(k * 100, k * 100 + 24) for k in range(3)]

    def __init__(self):
        super().__init__()
        # The model of "written", per layer group: full blocks whose tokens a committed
        # step put on the device. A block leaves it when it is freed unkeyed or evicted.
        self.written: list[set[int]] = [set() for _ in self.spec.groups]
        for g, group in enumerate(self.manager.groups):
            group.cache.subscribe(lambda event, g=g: self._on_event(g, event))

    def _on_event(self, g, event) -> None:
        if event.kind == "stored":  # the security property: only written blocks are ever keyed
            assert event.block_id in self.written[g], f"group {g} block {event.block_id} keyed before it was written"
        else:
            self.written[g].discard(event.block_id)

    def _full_blocks(self, seq, g, upto) -> list[int]:
        """Ids of ``seq``'s logical blocks before ``upto`` that group ``g`` still holds."""
        table = self.manager.block_table(seq, g)
        first = self.spec.blocks_for(self.manager.kv_len(seq)) - table.size  # a local group's null head
        return [int(b) for b in table[: max(upto - first, 0)]]

    def before_commit(self, ids) -> None:
        for s in ids:
            for g in range(len(self.spec.groups)):
                self.written[g].update(self._full_blocks(s, g, self.manager.kv_len(s) // BLOCK))

    def _hit_is_written(self, seq, cached) -> None:
        for g in range(len(self.spec.groups)):
            assert all(b in self.written[g] for b in self._full_blocks(seq, g, cached // BLOCK)), \
                f"group {g}: a hit on a block nobody wrote"

    def _admitted_prompt(self, seq, tokens, cached) -> None:
        """A prompt admitted with ``cached`` tokens served by the cache: a local group
        holds from the block its first new token's query sees."""
        self._hit_is_written(seq, cached)
        self.lengths[seq] = tokens.size
        self.firsts[seq] = [visible_from(kind, cached) // BLOCK for kind in self.kinds]
        if cached:
            self._count("prefix hits")
            self._count("prefix hit tokens", cached)

    @precondition(lambda self: len(self.lengths) < MAX_LIVE)
    @rule(prefix=st.integers(0, 2), shared=st.integers(1, 22), tail=st.integers(0, 6))
    def admit_prompt(self, prefix, shared, tail):
        self._count()
        seq = self.next_id
        self.next_id += 1
        tokens = np.concatenate([self.PREFIXES[prefix][:shared], np.arange(tail) + 1000 + seq])
        if self.manager.can_admit_prompt(tokens):
            cached = self.manager.admit_prompt(seq, tokens)
            assert cached % BLOCK == 0 and cached < tokens.size
            self._admitted_prompt(seq, tokens, cached)
            self.step([seq], [tokens.size - cached], self.manager.step_metadata([seq], tokens.size - cached))
            self._count("admits")
            return
        self._unchanged(lambda: self.manager.admit_prompt(seq, tokens), (pk.OutOfBlocksError, pk.SequenceTooLongError))

    @precondition(lambda self: self.lengths)
    @rule(data=st.data())
    def cache_conversation(self, data):
        """Key a live sequence's tokens so far (multi-turn): its chain's keyed end moves,
        which a sliding group's retention rule follows."""
        self._count()
        seq = _pick(data, sorted(self.lengths), "seq")
        self.manager.cache_tokens(seq, np.arange(self.lengths[seq]) + 10_000 + 100 * (seq % 3))
        self._count("conversations keyed")

    @precondition(lambda self: len(self.lengths) < MAX_LIVE)
    @rule(prefix=st.integers(0, 2), copies=st.integers(2, 3))
    def identical_prompts_in_one_step(self, prefix, copies):
        """Requests with the same prompt admitted before any of them is written: none may
        hit another's blocks; after the shared step commits, a later one hits them."""
        self._count()
        tokens = self.PREFIXES[prefix][:17]
        ids = []
        for _ in range(copies):
            if not self.manager.can_admit_prompt(tokens):
                break
            seq = self.next_id
            self.next_id += 1
            cached = self.manager.admit_prompt(seq, tokens)
            self._admitted_prompt(seq, tokens, cached)
            ids.append((seq, cached))
        if ids:
            first_cached = ids[0][1]
            assert all(c == first_cached for _, c in ids), "a same-step request hit an unwritten block"
            self.step([s for s, _ in ids], [tokens.size - c for _, c in ids],
                      self.manager.step_metadata([s for s, _ in ids], [tokens.size - c for _, c in ids]))
        for seq, _ in ids:  # cancelled or finished: back to the pool (cached only if written)
            self.manager.release(seq)
            del self.lengths[seq]
            del self.firsts[seq]

    @invariant()
    def written_model(self):
        for g, group in enumerate(self.manager.groups):
            pool = group.pool
            self.written[g] = {b for b in self.written[g] if pool.ref_counts[b] > 0 or pool.cache.is_evictable(b)}

    @invariant()
    def cache_accounting(self):
        for group in self.manager.groups:
            pool = group.pool
            assert pool.num_used == int((pool.ref_counts > 0).sum())
            assert pool.num_cached == pool.cache.num_evictable


class HybridPrefixHostMachine(PrefixHostMachine):
    """The prefix machine on a model mixing full, sliding-window and chunked layers: each
    group keeps its own cache, hits are the longest all three serve, and the local groups
    shed keyed blocks (windows move, chunks end) on every append and decode step."""

    local = "both"


class ChunkedHostMachine(HostMachine):
    """The host machine over full, sliding and chunked layers in one manager."""

    local = "both"


class UnifiedDeviceMachine(DeviceMachine):
    """Unified pages, and the second layer chunked instead of sliding (two groups, as
    the split machine, so the same few compilations)."""

    layout = "unified"
    local = "chunked"


def _one_shape(meta, spec):
    """``meta`` padded to the largest step shape (batch max_batch_slots, max_seq_len tokens,
    max_blocks_per_seq blocks, 8 copies) with the library's own padding -- empty rows,
    null blocks (generation 0), the pad slot, empty copies -- so a device machine compiles one write and
    one read, not one per bucket (~100, most of its time); bucketing is tested elsewhere."""
    B, T, W = spec.max_batch_slots, spec.max_seq_len, spec.max_blocks_per_seq

    def pad(a, shape, fill):
        out = np.full(shape, fill, a.dtype)
        out[tuple(slice(0, n) for n in a.shape)] = a
        return out

    groups = []
    for g, (tables, group) in enumerate(zip(meta.groups, spec.groups)):
        c = max(8, tables.copy_src.size)
        groups.append(tables.replace(
            block_tables=pad(tables.block_tables, (B, W), pk.NULL_BLOCK),
            slot_mapping=pad(tables.slot_mapping, (B, T), pad_slot(spec, g)), start=pad(tables.start, (B,), 0),
            copy_src=pad(tables.copy_src, (c,), pk.NULL_BLOCK),
            copy_dst=pad(tables.copy_dst, (c,), group.num_blocks), copy_len=pad(tables.copy_len, (c,), 0),
            block_gens=pad(tables.block_gens, (B, W), 0), copy_src_gen=pad(tables.copy_src_gen, (c,), 0),
            copy_dst_gen=pad(tables.copy_dst_gen, (c,), 0)))
    return meta.replace(kv_lens=pad(meta.kv_lens, (B,), 0), query_lens=pad(meta.query_lens, (B,), 0),
                        positions=pad(meta.positions, (B, T), 0), groups=tuple(groups))


@jax.jit
def _write_all(cache, bits, meta):
    k = jax.lax.bitcast_convert_type(bits[:, :, :, 0], jax.numpy.bfloat16)
    v = jax.lax.bitcast_convert_type(bits[:, :, :, 1], jax.numpy.bfloat16)
    return pk.PagedKVCache(tuple(view.write(k[:, :, i], v[:, :, i], meta) for i, view in enumerate(cache.views)))


@jax.jit
def _read_all(cache, meta):
    kv = [view.read(meta) for view in cache.views]
    bits = lambda x: jax.lax.bitcast_convert_type(x, jax.numpy.uint16)  # noqa: E731
    return tuple(bits(k) for k, _ in kv), tuple(bits(v) for _, v in kv)


def _run(machine, examples: int, run_seed: int | None = None) -> Counter:
    """Run ``machine`` for ``examples`` programs (times the soak factor) on ``run_seed``:
    CI's fixed seed, or under `PAGED_KV_SOAK` a fresh one (printed, and added to a failure)
    unless ``PAGED_KV_SEED`` replays one. Returns the machine's counts."""
    if run_seed is None:
        run_seed = CI_SEED if not SOAK else int(SOAK_SEED) if SOAK_SEED else random.SystemRandom().getrandbits(64)
    machine.counts = Counter()
    replay = f"PAGED_KV_SOAK={SOAK} PAGED_KV_SEED={run_seed}" if SOAK else f"CI's seed {run_seed}"
    if SOAK:
        print(f"\n{machine.__name__}: {replay}", flush=True)

    def factory():
        return machine()

    try:
        run_state_machine_as_test(hypothesis.seed(run_seed)(factory), settings=settings(
            max_examples=examples * SCALE, stateful_step_count=100, deadline=None, print_blob=True,
            suppress_health_check=list(HealthCheck), database=None,
        ))
    except BaseException as e:
        e.add_note(f"{machine.__name__} failed on {replay} ({examples * SCALE} examples): the program above "
                   "replays it (or the @reproduce_failure blob), and so does a rerun with that seed")
        raise
    return machine.counts


# Examples per machine in CI, and floors on counts: near a tenth of what CI's fixed
# seed counts (the README's state-machine paragraph has the counts), or lower, at most
# half the least another seed counted (400 seeds of each device machine at half CI's
# examples, a few of each host machine): a rule that Hypothesis' swarm testing turns off
# in many of a run's examples can count a tenth of its median. A floor fails when a
# machine stopped doing something, never from a change of seed or a change that shifts
# the programs a little. `PAGED_KV_SOAK=N` multiplies examples and floors by N.
EXAMPLES = {"host sliding": 480, "host sliding+chunked": 320, "prefix": 200, "prefix hybrid": 80,
            "device split": 100, "device unified": 100}
FLOORS = {
    "host sliding": dict(rules=7_000, appends=300, decodes=200, cows=130, trims=280,
                         **{"swap ins": 120, "slot inserts": 250}),
    "host sliding+chunked": dict(rules=4_500, appends=200, decodes=100, cows=100, trims=350,
                                 **{"swap ins": 70, "slot inserts": 130}),
    "prefix": dict(rules=3_000, appends=100, decodes=60, cows=20, **{"prefix hits": 180, "swap ins": 15}),
    "prefix hybrid": dict(rules=1_300, appends=70, decodes=20, cows=10, trims=100,
                          **{"prefix hits": 15, "swap ins": 10}),
    "device split": dict(rules=1_400, appends=100, decodes=15, cows=10, trims=50,
                         **{"swap ins": 10, "slot inserts": 25}),
    "device unified": dict(rules=1_500, appends=90, decodes=15, cows=10, trims=50,
                           **{"swap ins": 10, "slot inserts": 30}),
}
EFFECTIVE = ("appends", "decodes", "cows", "swap ins", "slot inserts", "trims", "prefix hits")
"""The effective operations the budget adds up: successful appends and decode steps,
copy-on-writes, swap-ins, slot inserts, window/chunk trims, prefix hits."""
MIN_CI_EFFECTIVE = 22_000  # about three fifths of CI's count
RESULTS: dict[str, Counter] = {}


def _check(name: str, machine) -> None:
    """Run ``machine`` as CI's ``name``, keep its counts for the budget and check its floors."""
    counts = RESULTS[name] = _run(machine, EXAMPLES[name])
    low = {what: (counts[what], floor * SCALE) for what, floor in FLOORS[name].items() if counts[what] < floor * SCALE}
    assert not low, f"{name}: counts under their floors (count, floor): {low}; all counts: {dict(counts)}"


@pytest.mark.parametrize("machine", [HostMachine, ChunkedHostMachine], ids=["sliding", "sliding+chunked"])
def test_host_state_machine(machine, request):
    _check(f"host {request.node.callspec.id}", machine)


def test_prefix_state_machine():
    # Full-only examples, and fewer over full + sliding + chunked layers (dearer each:
    # three groups, general paths).
    _check("prefix", PrefixHostMachine)
    _check("prefix hybrid", HybridPrefixHostMachine)


@pytest.mark.parametrize("machine", [DeviceMachine, UnifiedDeviceMachine], ids=["split", "unified"])
def test_device_state_machine(machine, request):
    _check(f"device {request.node.callspec.id}", machine)


def test_total_steps_meet_the_ci_budget():
    """Runs last in this file: the machines above together ran at least MIN_CI_STEPS rules
    and MIN_CI_EFFECTIVE effective operations (printed per machine with -s)."""
    if set(RESULTS) != set(EXAMPLES):
        pytest.skip(f"only some state machines ran ({sorted(RESULTS)}): the budget is for all of them")
    total = sum(RESULTS.values(), Counter())
    print("\nstate machines: rule executions, effective operations (and other counts)")
    for name, counts in [*RESULTS.items(), ("total", total)]:
        other = sorted(set(counts) - {"rules", *EFFECTIVE})
        print(f"  {name:20} {counts['rules']:>7,} rules, {sum(counts[w] for w in EFFECTIVE):>6,} effective: "
              + ", ".join(f"{counts[w]:,} {w}" for w in [*EFFECTIVE, *other] if counts[w]))
    assert total["rules"] >= MIN_CI_STEPS * SCALE, total["rules"]
    assert sum(total[w] for w in EFFECTIVE) >= MIN_CI_EFFECTIVE * SCALE, total
