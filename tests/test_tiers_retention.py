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
