"""Tiers below the device pool (`paged_kv.tiers`): hits from host and disk equal a
recompute bit for bit (split and unified pages, bf16 / int8 / fp8, full, sliding and
chunked groups), salts stay apart in every tier, a warm restart from the disk tier
hits and refuses what it must, events carry the medium, and a copy down that a step
overtook is refused rather than stored."""

from __future__ import annotations

import os

import numpy as np
import pytest

import paged_kv as pk
from paged_kv.errors import TierError
from paged_kv.tiers import CacheTiers, flush
from tiers_harness import KINDS, Server, block_at, make_spec, recompute, same_bits

A = np.arange(13) + 100  # three full blocks and one token
B = np.concatenate([A, np.arange(5) + 50])  # the next turn: hits A's three blocks


def evict_all(s: Server, first_seq: int = 10, salt=None) -> None:
    """Serve other prompts until the full-attention group holds none of A's blocks (local
    groups hold few blocks per sequence: theirs may stay)."""
    keys = _keys(A, salt)[:3]
    for i in range(8):
        if not any(h in s.manager.groups[0].cache.block_of for h in keys):
            return
        s.serve(first_seq + i, np.arange(13) + 1000 * (i + 2))
        s.finish(first_seq + i)
        s.check()
    raise AssertionError("A's blocks are still on the device")


def _keys(tokens, salt=None):
    from paged_kv.allocator.prefix_cache import chain_hashes

    return chain_hashes(np.asarray(tokens), 4, len(tokens) // 4, salt)


CASES = [("split-bf16", "full", "host"), ("split-bf16", "full", "disk"),
         ("unified-bf16", "full-sliding-chunked", "host"), ("split-int8", "full-sliding-chunked", "disk"),
         ("unified-fp8", "full", "host")]


@pytest.mark.parametrize("kind,groups,medium", CASES, ids=["-".join(c) for c in CASES])
def test_hits_from_tiers_equal_recompute(kind, groups, medium, tmp_path):
    layout, fmt = KINDS[kind]
    spec = make_spec(groups, **fmt)
    tiers = dict(host_bytes=10**7) if medium == "host" else dict(disk_bytes=10**7, disk_dir=str(tmp_path))
    s = Server(spec, layout, **tiers)
    s.serve(1, A)
    s.finish(1)
    evict_all(s)
    cached = s.serve(2, B)
    assert cached == 12 and s.tiers.stats.hit_blocks[medium] == 3
    s.check()
    assert same_bits(s.read(2), recompute(spec, layout, B))


def test_salts_stay_apart_in_every_tier(tmp_path):
    spec = make_spec()
    s = Server(spec, host_bytes=600, disk_bytes=10**7, disk_dir=str(tmp_path))  # host: one block; the rest to disk
    s.serve(1, A, cache_key="alice")
    s.finish(1, cache_key="alice")
    evict_all(s, salt="alice")
    alice = _keys(A, "alice")[:3]
    assert all(s.tiers.where(0, k) in ("host", "disk") for k in alice)
    assert {s.tiers.where(0, k) for k in alice} == {"host", "disk"}
    assert s.serve(2, B, cache_key="bob") == 0 and s.serve(3, B) == 0  # same tokens, other salt / none: no hit
    s.manager.release(2)
    s.manager.release(3)
    assert s.serve(4, B, cache_key="alice") == 12
    s.check()
    assert same_bits(s.read(4), recompute(spec, "split", B))


def test_warm_restart_from_the_disk_tier(tmp_path):
    spec = make_spec()
    first = Server(spec, disk_bytes=10**7, disk_dir=str(tmp_path), write="through")
    first.serve(1, A)
    first.finish(1)
    first.flush()  # write-through: A's blocks reach the disk as soon as they are keyed
    assert len(first.tiers.disk[0]) == 3
    again = Server(spec, disk_bytes=10**7, disk_dir=str(tmp_path))  # a new process: empty device, same files
    assert again.serve(2, B) == 12 and again.tiers.stats.hit_blocks["disk"] == 3
    again.check()
    assert same_bits(again.read(2), recompute(spec, "split", B))
    cold = Server(spec, disk_bytes=10**7, disk_dir=str(tmp_path / "cold"))
    assert cold.serve(2, B) == 0


def test_a_restart_refuses_other_pages_and_corrupt_files(tmp_path):
    spec = make_spec()
    first = Server(spec, disk_bytes=10**7, disk_dir=str(tmp_path), write="through")
    first.serve(1, A)
    first.finish(1)
    first.flush()
    for other, layout in ((make_spec(kv_format="int8"), "split"), (make_spec(head_dim=4), "split"), (spec, "unified"),
                          (make_spec(kv_format="int8", kv_key_offsets=[np.full((2, 8), 0.5)] * 2), "split")):
        manager = pk.KVCacheManager(other, prefix_cache=True)
        with pytest.raises(TierError, match="another page spec"):
            CacheTiers(manager, disk_bytes=10**7, disk_dir=str(tmp_path), layout=layout)
        assert manager.tiers is None and manager.prefix_cache.on_evict is None  # nothing attached
    # A bigger device pool is the same pages: accepted.
    CacheTiers(pk.KVCacheManager(make_spec(num_blocks=20), prefix_cache=True), disk_bytes=10**7,
               disk_dir=str(tmp_path))
    page = sorted(f for f in os.listdir(tmp_path) if f.endswith(".seg"))[-1]
    with open(tmp_path / page, "r+b") as f:
        f.seek(-20, os.SEEK_END)
        f.write(b"\xff" * 8)
    manager = pk.KVCacheManager(spec, prefix_cache=True)
    with pytest.raises(TierError, match=page):
        CacheTiers(manager, disk_bytes=10**7, disk_dir=str(tmp_path))
    assert manager.tiers is None
    (tmp_path / "tier.json").write_text('{"format": "paged_kv.tier", "version": 99}')
    with pytest.raises(TierError, match="version"):
        CacheTiers(manager, disk_bytes=10**7, disk_dir=str(tmp_path))


def test_a_page_corrupted_after_opening_is_a_miss_not_a_hit(tmp_path):
    spec = make_spec()
    s = Server(spec, disk_bytes=10**7, disk_dir=str(tmp_path))
    s.serve(1, A)
    s.finish(1)
    evict_all(s)
    target, at = block_at(s.tiers, 0, _keys(A)[1])
    with open(target, "r+b") as f:
        f.seek(at + 20)
        f.write(b"\xff" * 8)
    assert s.serve(2, B) == 4  # the first block still hits; the corrupt one and what follows are recomputed
    assert s.tiers.stats.corrupt == 1 and (0, _keys(A)[1]) not in s.tiers.directory
    s.check()
    assert same_bits(s.read(2), recompute(spec, "split", B))


def test_events_carry_the_medium(tmp_path):
    spec = make_spec()
    s = Server(spec, host_bytes=600, disk_bytes=10**7, disk_dir=str(tmp_path))
    events = []
    s.manager.prefix_cache.subscribe(events.append)
    s.serve(1, A)
    s.finish(1)
    evict_all(s)
    s.flush()
    seen = {(e.kind, e.medium) for e in events if e.block_hash in _keys(A)}
    assert seen == {("stored", "device"), ("removed", "device"), ("stored", "host"), ("removed", "host"),
                    ("stored", "disk")}


def test_a_copy_down_overtaken_by_a_step_is_refused():
    """A caller that runs a step before flushing: the evicted block holds the new
    owner's bytes by then, and the tier must not store them under the old key."""
    spec = make_spec()
    s = Server(spec, host_bytes=10**7)
    s.serve(1, A)
    s.finish(1)
    s.flush()
    s.tiers.flush_before_write = False
    for i in range(5):
        tokens = np.arange(13) + 1000 * (i + 2)
        s.manager.admit_prompt(10 + i, tokens)
        s.tokens[10 + i] = tokens
        pending = list(s.tiers.downloads)
        s.tiers.downloads = []  # hide them from the step's flush ...
        s.write(10 + i, 0, 13)
        s.tiers.downloads = pending + s.tiers.downloads  # ... which then runs after the step wrote
        s.cache = flush(s.cache, s.tiers, wait=True)
        s.finish(10 + i)
    assert s.tiers.stats.refused >= 3
    assert not any(k in s.tiers.host[0] for k in _keys(A)[:3])
    s.check()
    assert s.serve(2, B) == 0


def test_the_simulator_counts_hits_per_tier_and_bytes_moved(capsys):
    """Bookkeeping only (no bytes): tiers under a small pool bring back hits the pool
    lost, integrity holds after every step, and the CLI reports them."""
    import json

    from paged_kv.cli import main
    from paged_kv.sim import multiturn_workload, simulate

    work = multiturn_workload(12, turns=4, seed=1, max_total_tokens=4096)
    spec = pk.CacheSpec(num_layers=2, num_blocks=300, block_size=16, max_blocks_per_seq=256, num_kv_heads=1,
                        head_dim=8)
    plain = simulate(work, spec, prefix_cache=True)
    tiered = simulate(work, spec, prefix_cache=True, check=True,
                      tiers=dict(host_bytes=600 * spec.group_bytes_per_block(0), policy="arc",
                                 disk_bytes=10**9))
    assert plain.tiers is None and tiered.tiers["hit_tokens"]["host"] + tiered.tiers["hit_tokens"]["disk"] > 0
    assert tiered.token_hit_rate > plain.token_hit_rate and tiered.tiers["bytes_down"] > 0
    args = ["simulate", "--workload", "multiturn", "--sessions", "8", "--turns", "3", "--num-blocks", "600",
            "--max-seq-len", "4096", "--host-tier-gib", "1", "--disk-tier-gib", "4", "--json", "--progress", "off"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(out["tiers"]["hit_tokens"]) == {"device", "host", "disk"} and "bytes_up" in out["tiers"]
    with pytest.raises(SystemExit):
        main(["simulate", "--host-tier-gib", "1", "--no-prefix-cache", "--progress", "off"])


def test_a_disk_tier_of_page_bytes_needs_a_directory():
    """A disk tier that keeps page bytes without a directory would take keys and fail
    its first hit: refused up front, nothing attached."""
    manager = pk.KVCacheManager(make_spec(), prefix_cache=True)
    with pytest.raises(pk.PagedKVError, match="disk_bytes=10000000 needs disk_dir="):
        CacheTiers(manager, disk_bytes=10**7)
    assert manager.tiers is None and manager.prefix_cache.on_evict is None
    CacheTiers(manager, disk_bytes=10**7, keep_bytes=False)  # bookkeeping only (the simulator): no bytes, no files
