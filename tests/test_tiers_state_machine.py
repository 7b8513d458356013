"""Tiers under random programs (Hypothesis): prompts served through the prefix cache with
host and disk tiers under a small device pool, with or without priorities (some
expiring, some under the drop threshold), sequences finished (keyed) or dropped,
flushes, time passing, persists, restarts on the disk tier (which must see every disk
block's priority as the last process had it), and segment files corrupted on disk.
Sequences decode a few tokens before they are keyed, under a decode priority or a
retention given to ``cache_tokens``. After every rule the manager's and the tiers'
`check_integrity`; every served sequence reads back exactly the keys and values of
its tokens (no bytes of another prompt or salt, none that nobody wrote), whichever
tier its hit came from.

CI runs a fixed seed (derandomized: the same programs each run). A soak explores new
programs::

    PAGED_KV_SOAK=20 python -m pytest tests/test_tiers_state_machine.py -s

runs twenty times the examples, each twice as long, on a fresh random seed (printed);
``PAGED_KV_SEED=<seed>`` with the same ``PAGED_KV_SOAK`` replays one, as the other
state machines' soaks do (`tests/test_state_machine.py`)."""

from __future__ import annotations

import math
import os
import random
import shutil
import tempfile

import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, seed, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from paged_kv.errors import TierError
from paged_kv.tiers import retention
from paged_kv.tiers import Retention, persist
from tiers_harness import Server, kv_of, make_spec

PREFIXES = [np.arange(k * 100, k * 100 + 24) for k in range(3)]
SALTS = [None, "alice"]
# A system prompt kept (for a while), a range dropped rather than moved down, none.
RETENTIONS = [None, Retention([(0, None, 90)]), Retention([(0, 4, 80)], duration_s=1.0), Retention([(0, None, 1)]),
              Retention([(0, 4, 70)], decode_priority=85, decode_duration_s=2.0), Retention([], decode_priority=2)]
SOAK = int(os.environ.get("PAGED_KV_SOAK", "0"))  # 0: CI's fixed programs; N: N x the examples, new seeds
SOAK_SEED = os.environ.get("PAGED_KV_SEED")  # replay one soak run


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class TierMachine(RuleBasedStateMachine):
    counts: dict[str, int] = {}  # hits served per medium, restarts, corrupt files refused: over a whole run

    def _count(self, what: str, n: int = 1) -> None:
        type(self).counts[what] = type(self).counts.get(what, 0) + n

    def __init__(self):
        super().__init__()
        self.spec = make_spec("full", num_blocks=12)
        self.dir = tempfile.mkdtemp()
        self.corrupt: dict[str, bytes] = {}  # path -> its bytes as corrupted
        self.next_id = 0
        self.now = [0.0]
        self.live: list[int] = []
        # Expiries go to disk in wall-clock time: that clock moves with this one.
        self.wall, retention.wall_clock = retention.wall_clock, lambda: 1.7e9 + self.now[0]
        self.server = self._open()

    def teardown(self):
        retention.wall_clock = self.wall
        shutil.rmtree(self.dir, ignore_errors=True)

    def _open(self) -> Server:
        return Server(self.spec, host_bytes=2 * 512, disk_bytes=8 * 512, disk_dir=self.dir, policy="arc",
                      drop_below=5, clock=lambda: self.now[0])

    def _expect(self, seq: int) -> None:
        s = self.server
        tokens = s.tokens[seq]
        k, v = kv_of(tokens, np.arange(tokens.size), self.spec.num_layers)
        got = s.read(seq)
        for layer, (gk, gv) in enumerate(got):
            for g, want in ((gk, k[:, layer]), (gv, v[:, layer])):
                want = np.asarray(jnp.asarray(want, jnp.bfloat16).astype(jnp.float32))
                assert np.array_equal(np.asarray(g[: tokens.size], np.float32), want), f"seq {seq} layer {layer}"
                assert not np.any(np.asarray(g[tokens.size:], np.float32)), "bytes past the length"

    @precondition(lambda self: len(self.live) < 2)
    @rule(prefix=st.integers(0, 2), shared=st.integers(5, 24), tail=st.integers(0, 5), salt=st.sampled_from(SALTS),
          keep=st.booleans(), retention=st.sampled_from(RETENTIONS), decode=st.integers(0, 6),
          later=st.sampled_from(RETENTIONS[:3]))
    def serve(self, prefix, shared, tail, salt, keep, retention, decode=0, later=None):
        seq = self.next_id
        self.next_id += 1
        tokens = np.concatenate([PREFIXES[prefix][:shared], np.arange(tail) + 5000 + seq])
        if not self.server.manager.can_admit_prompt(tokens, salt):
            return
        tiers = self.server.tiers
        before = dict(tiers.stats.hit_blocks)
        self.server.serve(seq, tokens, salt, retention=retention)
        self._expect(seq)
        if decode and self.server.manager.can_append([seq], decode):
            # Generated tokens, then keyed: the decode priority ranks their blocks, or the
            # retention given to cache_tokens.
            generated = np.arange(decode) + 9000 + 10 * seq
            s = self.server
            s.tokens[seq] = np.concatenate([tokens, generated])
            s.manager.append([seq], decode)
            s.write(seq, tokens.size, s.tokens[seq].size)
            s.manager.cache_tokens(seq, s.tokens[seq], salt, retention=later)
            self._expect(seq)
            self._count("decodes")
        self._count("serves")
        for medium, blocks in tiers.stats.hit_blocks.items():
            if blocks > before.get(medium, 0):
                self._count(f"{medium} hits")
        if keep:
            self.live.append(seq)
        else:
            self.server.finish(seq, salt)

    @rule(prefixes=st.lists(st.integers(0, 2), min_size=2, max_size=5), salt=st.sampled_from(SALTS))
    def serve_many(self, prefixes, salt):
        """Whole prompts served and finished in a row: the small pool evicts the earlier
        ones' blocks down, and a later prompt on the same prefix hits them there."""
        for prefix in prefixes:
            self.serve(prefix, 24, 1, salt, False, None)

    @precondition(lambda self: self.live)
    @rule(cache=st.booleans())
    def release(self, cache):
        seq = self.live.pop(0)
        if cache:
            self.server.finish(seq)  # keyed unsalted: a salted prompt must not hit it
        else:
            self.server.manager.release(seq)

    @rule()
    def flush(self):
        self.server.flush()

    @rule()
    def persist(self):
        """Device and host blocks written to disk (the next restart hits them)."""
        self.server.cache = persist(self.server.cache, self.server.tiers)

    @rule(seconds=st.sampled_from([0.5, 5.0]))
    def time_passes(self, seconds):
        self.now[0] += seconds  # priorities given for a duration expire

    @rule()
    def restart(self):
        """A new process on the same disk tier: refused while a corrupt file is there;
        else it sees each disk block with the priority the last process gave it."""
        self.server.flush()
        self.live.clear()
        old = self.server.tiers
        old.priorities.expire()
        was = {(g, k): old.priorities.entries.get(k, (old.priorities.default, math.inf))
               for g, disk in enumerate(old.disk) for k in disk.parent_of}
        # A corrupted page file the tier has since evicted (deleted) or written again holds
        # no corruption any more: only files still as corrupted count.
        self.corrupt = {path: data for path, data in self.corrupt.items()
                        if os.path.exists(path) and _read(path) == data}
        removed = bool(self.corrupt)  # a deleted segment takes the priorities it recorded with it
        if self.corrupt:
            try:
                self._open()
            except TierError:
                self._count("corrupt tiers refused")
            else:
                raise AssertionError("a tier with a corrupt page file was opened")
            for path in self.corrupt:
                if os.path.exists(path):
                    os.unlink(path)
            self.corrupt.clear()
        self.server = self._open()
        self._count("restarts")
        new = self.server.tiers
        for (g, k), (priority, expiry) in was.items():
            if not removed and k in new.disk[g] and expiry > self.now[0] + 0.01:  # one at its expiry may go either way
                assert new.priorities.of(k) == priority, (k, priority, new.priorities.of(k))
                if priority != new.priorities.default:
                    self._count("priorities restored")

    @rule(data=st.data())
    def corrupt_a_file(self, data):
        # A segment with live blocks (one wholly dead is deleted soon after), else any.
        segments = self.server.tiers.directory.segments
        pages = sorted(n for n, seg in segments.items() if seg.written and seg.live) or \
            sorted(f for f in os.listdir(self.dir) if f.endswith(".seg"))
        if not pages:
            return
        path = os.path.join(self.dir, data.draw(st.sampled_from(pages)))
        with open(path, "r+b") as f:
            f.seek(-24, os.SEEK_END)
            f.write(b"\xa5" * 8)
        self.corrupt[path] = _read(path)

    @invariant()
    def integrity(self):
        self.server.check()


def test_tiers_state_machine():
    TierMachine.counts = {}
    scale = max(SOAK, 1)
    if SOAK:
        run_seed = int(SOAK_SEED) if SOAK_SEED else random.SystemRandom().getrandbits(64)
        print(f"\ntiers machine: PAGED_KV_SOAK={SOAK} PAGED_KV_SEED={run_seed}", flush=True)
    try:
        run_state_machine_as_test(seed(run_seed)(lambda: TierMachine()) if SOAK else TierMachine, settings=settings(
            max_examples=24 * scale, stateful_step_count=50 if SOAK else 25, deadline=None, database=None,
            derandomize=not SOAK, print_blob=True, suppress_health_check=list(HealthCheck)))
    except BaseException as e:
        if SOAK:
            e.add_note(f"replay: PAGED_KV_SOAK={SOAK} PAGED_KV_SEED={run_seed}")
        raise
    counts = TierMachine.counts
    print(f"\ntiers machine: {counts}")
    # Floors: the run must reach the tiers, not only the device. Derandomized counts seen
    # while this machine was written ranged widely (programs change with the code and
    # between processes, see tests/test_async_steps.py): 118-649 serves, 6-43 host hits,
    # 13-175 disk hits, 1-4 corrupt tiers refused, 13-66 decodes, 2-11 priorities restored;
    # the floors sit near a third of the lowest. A soak's fresh seeds may starve a rule
    # in a few examples (Hypothesis' swarm testing): it hunts failures, CI keeps the floors.
    floors = {} if SOAK else {"serves": 40, "host hits": 3, "disk hits": 6, "corrupt tiers refused": 1, "decodes": 5,
              "priorities restored": 1}
    for what, floor in floors.items():
        assert counts.get(what, 0) >= floor, (what, counts)
