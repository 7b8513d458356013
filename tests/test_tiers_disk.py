"""The disk tier's files (`paged_kv.tiers.disk`, `segments`; issue 24): priorities and
expiries survive a warm restart (and priorities changed while a block was on disk),
a corrupt or foreign segment or an old format is refused whole with nothing loaded or
deleted, moves down are written off the flush's critical path, a failed write loses
its blocks cleanly, and mostly dead segments are compacted."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time

import jax
import numpy as np
import pytest

import paged_kv as pk
from paged_kv.errors import TierError
from paged_kv.tiers import CacheTiers, Retention, flush, retention, segments
from paged_kv.tiers.disk import DiskDirectory
from tiers_harness import Server, make_spec, recompute, same_bits

A = np.arange(13) + 100
B = np.concatenate([A, np.arange(5) + 50])
D = np.arange(13) + 700


def _keys(tokens):
    from paged_kv.allocator.prefix_cache import chain_hashes

    return chain_hashes(np.asarray(tokens), 4, len(tokens) // 4)[:3]


def _segments(path) -> list[str]:
    return sorted(f for f in os.listdir(path) if f.endswith(".seg"))


def _written(path, clock=None) -> Server:
    """A process that wrote A (priority 90 for 100 s of its clock) and D (60, no expiry)
    through to disk."""
    s = Server(make_spec(), disk_bytes=10**7, disk_dir=str(path), write="through",
               **({"clock": clock} if clock else {}))
    s.serve(1, A, retention=Retention([(0, None, 90)], duration_s=100))
    s.finish(1)
    s.serve(2, D, retention=Retention([(0, None, 60)]))
    s.finish(2)
    s.flush()
    return s


def test_priorities_and_expiries_survive_a_warm_restart(tmp_path, monkeypatch):
    _written(tmp_path, clock=lambda: 0.0)
    now = [1000.0]  # the new process's clock is another clock: the expiry is re-based
    again = Server(make_spec(), disk_bytes=10**7, disk_dir=str(tmp_path), clock=lambda: now[0])
    p = again.tiers.priorities
    assert [p.of(k) for k in _keys(A)] == [90] * 3 and [p.of(k) for k in _keys(D)] == [60] * 3
    assert all(abs(p.entries[k][1] - 1100.0) < 5 for k in _keys(A)) and all(p.entries[k][1] == np.inf for k in _keys(D))
    again.check()
    later = time.time() + 200  # the wall clock moved past A's expiry while no process ran
    monkeypatch.setattr(retention, "wall_clock", lambda: later)
    third = Server(make_spec(), disk_bytes=10**7, disk_dir=str(tmp_path / ".." / tmp_path.name))
    assert [third.tiers.priorities.of(k) for k in _keys(A)] == [35] * 3
    assert [third.tiers.priorities.of(k) for k in _keys(D)] == [60] * 3
    assert third.serve(3, B) == 12 and same_bits(third.read(3), recompute(make_spec(), "split", B))


def test_a_priority_changed_on_disk_is_written_for_the_next_process(tmp_path):
    s = Server(make_spec(), disk_bytes=10**7, disk_dir=str(tmp_path), write="through")
    s.serve(1, A)  # the default on disk
    s.finish(1)
    s.flush()
    files = _segments(tmp_path)
    s.serve(2, B, retention=Retention([(0, 8, 95)]))  # A's first two blocks ranked while on disk
    s.finish(2)
    s.flush()
    assert len(_segments(tmp_path)) > len(files)
    s.check()
    again = Server(make_spec(), disk_bytes=10**7, disk_dir=str(tmp_path))
    assert [again.tiers.priorities.of(k) for k in _keys(A)] == [95, 95, 35]
    again.check()


def test_a_renewed_expiry_is_written_for_the_next_process(tmp_path, monkeypatch):
    now = [0.0]
    monkeypatch.setattr(retention, "wall_clock", lambda: 1.7e9 + now[0])  # wall time moves with the test's clock
    s = Server(make_spec(), disk_bytes=10**7, disk_dir=str(tmp_path), write="through", clock=lambda: now[0])
    keep = Retention([(0, None, 90)], duration_s=100)
    s.serve(1, A, retention=keep)
    s.finish(1)
    s.flush()
    now[0] = 50.0
    s.serve(2, B, retention=keep)  # A's blocks renewed: 100 s from now
    s.finish(2)
    s.flush()
    now[0] = 120.0  # past the first expiry, before the renewed one
    again = Server(make_spec(), disk_bytes=10**7, disk_dir=str(tmp_path), clock=lambda: now[0])
    p = again.tiers.priorities
    assert [p.of(k) for k in _keys(A)] == [90] * 3 and all(abs(p.entries[k][1] - 150.0) < 1 for k in _keys(A))


def _crafted(path, tag, **change):
    """A segment of one block with valid digests, and ``change`` applied to its fields."""
    pages = [[np.zeros((4, 2, 8), np.uint16)] * 2] * 2  # 2 layers x (keys, values) of make_spec() as uint16
    leaves = {0: segments.leaves_of(pages)}
    buf = np.zeros(segments.block_bytes(leaves[0]), np.uint8)
    segments.pack(pages, buf)
    block = dict(group=0, key=7, parent=0, priority=35, expiry=None, crc=segments.crc(0, 7, buf))
    block.update(change)
    head = segments.header(tag, leaves, [(block["group"], block["key"], block["parent"], block["priority"],
                                          block["expiry"], buf.size, block["crc"])], [])
    segments.write(str(path), f"{2**40:016x}-0000abcd.seg", head, [buf])


BAD = {
    "header digest": lambda path, tag: _flip(path, 60),
    "block CRC": lambda path, tag: _flip(path, -3),
    "truncated": lambda path, tag: _truncate(path, -5),
    "trailing bytes": lambda path, tag: _append(path, b"x"),
    "priority 150": lambda path, tag: _crafted(path, tag, priority=150),
    "expiry not a time": lambda path, tag: _crafted(path, tag, expiry=float("nan")),
    "group 9": lambda path, tag: _crafted(path, tag, group=9),
    "another manifest": lambda path, tag: _crafted(path, "0" * 64),
    "format 1 page file": lambda path, tag: open(os.path.join(path, "g0-" + "0" * 32 + ".npz"), "wb").close(),
    "a stray file": lambda path, tag: open(os.path.join(path, "notes.txt"), "w").close(),
}


def _last(path) -> str:
    return os.path.join(path, _segments(path)[-1])


def _flip(path, at: int) -> None:
    with open(_last(path), "r+b") as f:
        f.seek(at, os.SEEK_SET if at >= 0 else os.SEEK_END)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))


def _truncate(path, by: int) -> None:
    name = _last(path)
    os.truncate(name, os.path.getsize(name) + by)


def _append(path, data: bytes) -> None:
    with open(_last(path), "ab") as f:
        f.write(data)


@pytest.mark.parametrize("bad", sorted(BAD))
def test_a_bad_segment_refuses_the_whole_tier(bad, tmp_path):
    """Anything wrong in any file: a `TierError` naming it, nothing attached, nothing
    indexed, no file deleted (the operator decides)."""
    base = tmp_path / "tier"
    _written(base)
    tag = DiskDirectory(str(base), make_spec(), "split").tag
    BAD[bad](str(base), tag)
    listing = {f: os.path.getsize(base / f) for f in os.listdir(base)}
    manager = pk.KVCacheManager(make_spec(), prefix_cache=True)
    with pytest.raises(TierError, match="disk tier"):
        CacheTiers(manager, disk_bytes=10**7, disk_dir=str(base))
    assert manager.tiers is None and manager.prefix_cache.on_evict is None and manager.prefix_cache.choose is None
    assert {f: os.path.getsize(base / f) for f in os.listdir(base)} == listing


def test_an_old_format_directory_is_refused(tmp_path):
    _written(tmp_path)
    manifest = json.loads((tmp_path / "tier.json").read_text())
    (tmp_path / "tier.json").write_text(json.dumps({**manifest, "version": 1}))
    with pytest.raises(TierError, match=r"version 2"):
        CacheTiers(pk.KVCacheManager(make_spec(), prefix_cache=True), disk_bytes=10**7, disk_dir=str(tmp_path))


def test_moves_down_are_written_off_the_critical_path(tmp_path, monkeypatch):
    """flush returns while the segment is still being written (the writer is held
    here); a hit meanwhile reads the staged bytes; the file lands at finish."""
    gate, real = threading.Event(), segments.write
    monkeypatch.setattr(segments, "write", lambda *a: (gate.wait(10), real(*a)))
    s = Server(make_spec(), disk_bytes=10**7, disk_dir=str(tmp_path), write="through")
    s.serve(1, A)
    s.finish(1)
    s.flush = lambda: setattr(s, "cache", flush(s.cache, s.tiers))  # not waiting: the copies go to the writer
    jax.block_until_ready(s.cache)  # the step ran: the flush lands the copies down at once (in place)
    s.flush()
    assert not _segments(tmp_path) and all(s.tiers.where(0, k) == "device" for k in _keys(A))
    s.manager.admit_prompt(5, np.arange(29) + 10_000)  # 8 blocks and 3 more: the device evicts A's
    s.manager.admit_prompt(6, np.arange(9) + 20_000)
    s.manager.release(5)
    s.manager.release(6)
    assert all(s.tiers.where(0, k) == "disk" for k in _keys(A)) and not _segments(tmp_path)
    got = s.serve(2, B)  # A's blocks read from the staged bytes
    gate.set()
    assert got == 12 and same_bits(s.read(2), recompute(make_spec(), "split", B))
    s.check()
    s.tiers.sync_disk()  # the file lands at finish: the writer, just released, may not have written it yet
    assert len(_segments(tmp_path)) == 1


def test_a_failed_write_loses_its_blocks_cleanly(tmp_path, monkeypatch):
    def full(directory, name, head, blocks):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(segments, "write", full)
    s = Server(make_spec(), disk_bytes=10**7, disk_dir=str(tmp_path), write="through")
    s.serve(1, A)
    s.finish(1)
    s.flush()
    assert s.tiers.stats.disk_errors == 3 and not any(k in s.tiers.disk[0] for k in _keys(A))
    assert "No space left" in s.tiers.directory.errors[0] and os.listdir(tmp_path) == ["tier.json"]
    s.check()
    monkeypatch.undo()
    s.serve(2, D)
    s.finish(2)
    s.flush()
    assert all(k in s.tiers.disk[0] for k in _keys(D))
    s.check()


def test_mostly_dead_segments_are_compacted(tmp_path):
    """Segments each left with one live block: once the files take twice the budget,
    the emptiest is rewritten into the next segment and deleted; bytes unchanged."""
    spec = make_spec()
    page = spec.group_bytes_per_block(0)
    d = DiskDirectory(str(tmp_path), spec, "split", budget=4 * page)
    rng = np.random.default_rng(0)
    kept, staged = {}, {}
    for s in range(6):
        for b in range(4):
            pages = [[rng.integers(0, 2**16, (4, 2, 8)).astype(np.uint16) for _ in range(2)] for _ in range(2)]
            d.stage(0, 10 * s + b, 0, pages)
            kept[10 * s + b] = staged[10 * s + b] = pages
        d.sync(lambda key: (35, None))
        for b in range(1, 4):
            d.forget(0, 10 * s + b)
            del kept[10 * s + b]
        d.check_integrity()
    d.sync(lambda key: (35, None))
    on_disk = sum(os.path.getsize(tmp_path / f) for f in _segments(tmp_path))
    assert on_disk <= 2 * 4 * page + 4 * (page + 1024)  # the budget's twice, and the segment it was compacted into
    assert len(_segments(tmp_path)) < 6
    for key, pages in kept.items():
        assert all(np.array_equal(a, b) for la, lb in zip(d.read(0, key), pages) for a, b in zip(la, lb))
    fresh = DiskDirectory(str(tmp_path), spec, "split")
    found = {k for k, *_ in fresh.scan(1)[0]}
    # Blocks forgotten in a segment that still holds a live one come back, verified:
    # the same key is the same bytes (no tombstones are written).
    assert set(kept) <= found <= set(staged)
    for key in found:
        assert all(np.array_equal(a, b) for la, lb in zip(fresh.read(0, key), staged[key]) for a, b in zip(la, lb))
    shutil.rmtree(tmp_path)


def test_another_process_reads_the_tier(tmp_path):
    """Segments are self-describing: a second process opens the directory (checked,
    verified) and reads each block as the writer holds it."""
    import subprocess
    import sys

    s = _written(tmp_path)
    want = {k: b"".join(a.tobytes() for layer in s.tiers.directory.read(0, k) for a in layer).hex()
            for k in _keys(A) + _keys(D)}
    script = (
        "import json, sys\n"
        "sys.path.insert(0, 'tests')\n"
        "from tiers_harness import make_spec\n"
        "from paged_kv.tiers.disk import DiskDirectory\n"
        "d = DiskDirectory(sys.argv[1], make_spec(), 'split')\n"
        "found = d.scan(1)[0]\n"
        "print(json.dumps({str(k): b''.join(a.tobytes() for layer in d.read(0, k) for a in layer).hex()"
        " for k, *_ in found}))\n")
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    got = {int(k): v for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}
    assert got == want
