"""Priorities and retention in the tiers (`paged_kv.tiers.retention`, issue 24 item 2):
under pressure a high-priority prompt's blocks survive where default ones are evicted
-- on the device, in the host tier and on disk --, priorities expire back to the
default, blocks under ``drop_below`` are dropped instead of moved down, a bad
retention changes nothing; and `persist` writes device and host blocks to disk for a
warm restart."""

from __future__ import annotations

import numpy as np
import pytest

import paged_kv as pk
from paged_kv.errors import InvalidArgumentError, TierError
from paged_kv.tiers import CacheTiers, Retention, persist
from tiers_harness import Server, make_spec, recompute, same_bits

A = np.arange(13) + 100  # three full blocks and one token
B = np.concatenate([A, np.arange(5) + 50])  # hits A's three blocks
D = np.arange(13) + 700  # another prompt, default priority
HIGH = Retention([(0, None, 90)])
PAGE = 512  # bytes of one block of make_spec("full"): 2 layers x (keys + values) x 4 x 2 x 8 x bf16


def _keys(tokens):
    from paged_kv.allocator.prefix_cache import chain_hashes

    return chain_hashes(np.asarray(tokens), 4, len(tokens) // 4)[:3]


def _big(s: Server, seq: int) -> None:
    """A prompt that takes every device block of make_spec(num_blocks=9) (evicting all
    that are cached), then dropped."""
    s.serve(seq, np.arange(29) + 10_000 * seq)
    s.manager.release(seq)
    s.check()


def test_a_high_priority_prompt_survives_device_pressure():
    s = Server(make_spec(num_blocks=9), host_bytes=0)  # tiers with no bytes: priorities rank the device's blocks alone
    s.serve(1, A, retention=HIGH)
    s.finish(1)
    for i in range(6):  # default prompts, each evicting older cached blocks
        s.serve(10 + i, np.arange(13) + 1000 * (i + 2))
        s.finish(10 + i)
        s.check()
    assert all(s.tiers.where(0, k) == "device" for k in _keys(A))
    assert s.serve(2, B) == 12
    plain = Server(make_spec(num_blocks=9), host_bytes=0)
    plain.serve(1, A)
    plain.finish(1)
    for i in range(6):
        plain.serve(10 + i, np.arange(13) + 1000 * (i + 2))
        plain.finish(10 + i)
    assert plain.serve(2, B) == 0


@pytest.mark.parametrize("medium", ["host", "disk"])
def test_a_high_priority_prompt_survives_pressure_below_the_device(medium, tmp_path):
    """A goes down first, D after it; the tier (4 blocks) must then evict: D, not A
    (plain LRU evicts A, the older)."""
    tiers = dict(host_bytes=4 * PAGE) if medium == "host" else dict(disk_bytes=4 * PAGE, disk_dir=str(tmp_path))
    hits = {}
    for name, retention in (("high", HIGH), ("plain", None)):
        s = Server(make_spec(num_blocks=9), **{**tiers, "disk_dir": str(tmp_path / name)} if medium == "disk" else tiers)
        s.serve(1, A, retention=retention)
        s.finish(1)
        _big(s, 5)  # A's blocks move down
        s.serve(2, D)
        s.finish(2)
        _big(s, 6)  # D's too: the tier is full
        s.flush()
        s.check()
        hits[name] = s.serve(3, B)
        assert s.tiers.stats.hit_blocks[medium] == hits[name] // 4
        s.check()
        if name == "high":
            assert same_bits(s.read(3), recompute(make_spec(num_blocks=9), "split", B))
    assert hits == {"high": 12, "plain": 0}


def test_priorities_expire_back_to_the_default():
    now = [0.0]
    s = Server(make_spec(num_blocks=9), clock=lambda: now[0])
    s.serve(1, A, retention=Retention([(0, 12, 90)], duration_s=10))
    s.finish(1)
    s.serve(2, D)
    s.finish(2)
    pc = s.manager.prefix_cache
    a_blocks = {pc.block_of[k] for k in _keys(A)}
    assert not a_blocks & set(pc.choose(pc.evictable, 3))  # D's go first
    now[0] = 11.0
    assert set(pc.choose(pc.evictable, 3)) == a_blocks  # A is default again, and older
    assert all(s.tiers.priorities.of(k) == 35 for k in _keys(A))


def test_blocks_under_the_threshold_are_dropped_not_moved_down():
    s = Server(make_spec(num_blocks=9), host_bytes=10 * PAGE, drop_below=20)
    s.serve(1, A, retention=Retention([(0, None, 10)]))
    s.finish(1)
    s.serve(2, D)
    s.finish(2)
    _big(s, 5)
    s.flush()
    s.check()
    assert not any(s.tiers.where(0, k) for k in _keys(A))
    assert all(s.tiers.where(0, k) == "host" for k in _keys(D))


def test_a_bad_retention_changes_nothing():
    s = Server(make_spec(num_blocks=9), host_bytes=0)
    before = s.manager.snapshot()
    for bad in (Retention([(0, None, 101)]), Retention([(0, 99, 50)]), Retention([(5, 2, 50)]),
                Retention([(0, None, True)]), Retention([(0, None, 50)], duration_s=-1), Retention("x"),
                Retention([(0, 4)]), [(0, None, 90)]):
        with pytest.raises(InvalidArgumentError):
            s.manager.admit_prompt(1, A, retention=bad)
    assert s.manager.snapshot() == before and not s.tiers.priorities.entries
    with pytest.raises(InvalidArgumentError, match="CacheTiers"):
        pk.KVCacheManager(make_spec(num_blocks=9), prefix_cache=True).admit_prompt(1, A, retention=HIGH)
    for kw in (dict(default_priority=101), dict(drop_below=-1), dict(drop_below="5")):
        manager = pk.KVCacheManager(make_spec(num_blocks=9), prefix_cache=True)
        with pytest.raises(InvalidArgumentError):
            CacheTiers(manager, **kw)
        assert manager.tiers is None


def test_persist_writes_device_and_host_blocks_for_a_warm_restart(tmp_path):
    spec = make_spec(num_blocks=9)
    first = Server(spec, host_bytes=PAGE, disk_bytes=10**7, disk_dir=str(tmp_path))  # write-back
    first.serve(1, A)
    first.finish(1)
    first.serve(2, D)  # A stays on the device (one block may go to the host)
    first.finish(2)
    first.flush()
    lost = Server(spec, disk_bytes=10**7, disk_dir=str(tmp_path))  # exit without persist: nothing on disk
    assert lost.serve(2, B) == 0
    first.cache = persist(first.cache, first.tiers)
    first.check()
    assert all(first.tiers.where(0, k) == "device" for k in _keys(A))  # still served from above
    assert all(k in first.tiers.disk[0] for k in _keys(A) + _keys(D))
    again = Server(spec, disk_bytes=10**7, disk_dir=str(tmp_path))
    assert again.serve(2, B) == 12 and again.tiers.stats.hit_blocks["disk"] == 3
    again.check()
    assert same_bits(again.read(2), recompute(spec, "split", B))
    with pytest.raises(TierError, match="disk"):
        persist(Server(spec, host_bytes=PAGE).cache, Server(spec, host_bytes=PAGE).tiers)


def _decode(s: Server, seq: int, generated) -> None:
    """``generated`` tokens appended to ``seq`` and written by one step (as decode steps
    would, one token each)."""
    start = s.tokens[seq].size
    s.tokens[seq] = np.concatenate([s.tokens[seq], generated])
    s.manager.append([seq], len(generated))
    s.write(seq, start, s.tokens[seq].size)


def _chain(tokens):
    from paged_kv.allocator.prefix_cache import chain_hashes

    return chain_hashes(np.asarray(tokens), 4, len(tokens) // 4)


def test_generated_blocks_take_the_decode_priority():
    """A block holding any generated token takes the retention's decode priority when
    cache_tokens keys it; the prompt's blocks keep their ranges'. Under device pressure
    the conversation's generated blocks then outlive default ones."""
    hits = {}
    for name, retention in (("decode", Retention([(0, None, 80)], decode_priority=90)),
                            ("plain", Retention([(0, None, 80)]))):
        s = Server(make_spec(num_blocks=9), host_bytes=0)
        prompt = np.arange(6) + 100  # a full block and two tokens: block 1 mixes prompt and output
        s.serve(1, prompt, retention=retention)
        _decode(s, 1, np.arange(7) + 500)  # 13 tokens: three full blocks
        keys = _chain(s.tokens[1])
        s.finish(1)
        want = [80, 90, 90] if name == "decode" else [80, 35, 35]
        assert [s.tiers.priorities.of(k) for k in keys] == want
        s.check()
        for i in range(6):  # default prompts under pressure
            s.serve(10 + i, np.arange(13) + 1000 * (i + 2))
            s.finish(10 + i)
        hits[name] = s.serve(2, np.concatenate([s.tokens[1], [7, 7, 7]]))
        s.check()
        if name == "decode":
            assert same_bits(s.read(2), recompute(make_spec(num_blocks=9), "split", s.tokens[2]))
    assert hits == {"decode": 12, "plain": 4}


def test_the_decode_priority_expires_and_stays_with_its_sequence():
    now = [0.0]
    s = Server(make_spec(num_blocks=12), host_bytes=0, clock=lambda: now[0])
    s.serve(1, np.arange(4) + 100, retention=Retention([], decode_priority=70, decode_duration_s=5))
    _decode(s, 1, np.arange(4) + 500)
    s.manager.cache_tokens(1, s.tokens[1])
    keys = _chain(s.tokens[1])
    assert [s.tiers.priorities.of(k) for k in keys] == [35, 70]
    _decode(s, 1, np.arange(4) + 600)
    now[0] = 3.0
    s.finish(1)  # the third block takes the priority now, for 5 s from now
    keys = _chain(s.tokens[1])
    assert [s.tiers.priorities.of(k) for k in keys] == [35, 70, 70]
    now[0] = 6.0
    s.tiers.priorities.expire()
    assert [s.tiers.priorities.of(k) for k in keys] == [35, 35, 70]
    # The same id admitted again without a retention, or by plain admit: nothing carries over.
    s.serve(1, np.arange(4) + 900)
    _decode(s, 1, np.arange(4) + 950)
    s.finish(1)
    assert [s.tiers.priorities.of(k) for k in _chain(s.tokens[1])] == [35, 35]
    s.manager.admit(1, 4)
    s.tokens[1] = np.arange(4) + 300
    s.write(1, 0, 4)
    s.finish(1)
    assert s.tiers.priorities.of(_chain(s.tokens[1])[0]) == 35
    s.check()


def test_cache_tokens_takes_a_retention():
    s = Server(make_spec(num_blocks=9), host_bytes=0)
    s.serve(1, np.arange(6) + 100)
    _decode(s, 1, np.arange(6) + 500)
    tokens = s.tokens[1]
    before, entries = s.manager.snapshot(), dict(s.tiers.priorities.entries)
    for bad in (Retention([(0, 13, 50)]), Retention([(0, None, 50)], decode_priority=101),
                Retention([(0, None, 50)], decode_duration_s=3), Retention([(0, None, 50)], decode_priority=True),
                [(0, None, 50)]):
        with pytest.raises(InvalidArgumentError):
            s.manager.cache_tokens(1, tokens, retention=bad)
    assert s.manager.snapshot() == before and s.tiers.priorities.entries == entries
    s.manager.cache_tokens(1, tokens, retention=Retention([(0, 4, 20), (4, None, 60)], decode_priority=95))
    keys = _chain(tokens)
    assert [s.tiers.priorities.of(k) for k in keys] == [20, 60, 60]
    _decode(s, 1, np.arange(4) + 800)  # generated after the call: the decode priority
    s.finish(1)
    keys = _chain(s.tokens[1])
    assert [s.tiers.priorities.of(k) for k in keys] == [20, 60, 60, 95]
    s.check()
    plain = pk.KVCacheManager(make_spec(num_blocks=9), prefix_cache=True)
    plain.admit_prompt(1, A)
    with pytest.raises(InvalidArgumentError, match="CacheTiers"):
        plain.cache_tokens(1, A, retention=HIGH)
