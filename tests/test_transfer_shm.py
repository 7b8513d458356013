"""The same-host shared-memory path of `paged_kv.transfer`: pages move through a ring (a
sealed memfd) bit for bit (every layer group, int8 pages with their scales, a ring that
wraps many times), TCP is used where either side says no, a forged or unsealed ring or
a forged stream is refused without harm, nobody can shrink a ring under a receiver's
mapping (SIGBUS), a sender killed mid-stream leaves the receiver clean, and no ring
outlives its sender (`held_rings`) or leaves a file (`paged_kv.transfer.shm.leftovers`)."""

from __future__ import annotations

import contextlib
import fcntl
import gc
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

zmq = pytest.importorskip("zmq")

import paged_kv as pk  # noqa: E402
from paged_kv.errors import InvalidArgumentError, ReceiverFullError  # noqa: E402
from paged_kv.transfer import TransferReceiver, TransferSender, messages, shm  # noqa: E402

from test_transfer import PEER, receiving_peer  # noqa: E402
from transfer_peer import digest, fill, spec_of  # noqa: E402

pytestmark = pytest.mark.skipif(not shm.available(), reason="no memfd and /proc on x86-64 here")
RECEIVERS = [
    {"name": "hybrid", "spec": "hybrid"},
    {"name": "int8", "spec": "int8"},
    {"name": "tiny", "spec": "tiny"},
    {"name": "tcp", "spec": "hybrid", "shm": False},
]
PIDS: set[int] = {os.getpid()}


@pytest.fixture(scope="module")
def peer():
    yield from receiving_peer(RECEIVERS, PIDS)
    gc.collect()  # senders the tests dropped: their finalizers unlink rings never mapped
    assert shm.leftovers(PIDS) == []


def held_rings() -> set[str]:
    """Ring memfds this process holds open (a sender's, or a mapping's: by inode, as
    Python's mmap keeps a descriptor of its own), and ring files of its pid."""
    held = set(shm.leftovers({os.getpid()}))
    with contextlib.suppress(OSError):
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/self/fd/{fd}").startswith(f"/memfd:{shm.PREFIX}"):
                    held.add(f"memfd inode {os.stat(f'/proc/self/fd/{fd}').st_ino}")
    return held


@pytest.fixture(autouse=True)
def before():
    """Rings this process holds already (other tests' senders still alive): a test
    checks it adds none that outlive it."""
    return held_rings()


def new_rings(before: set[str]) -> set[str]:
    return held_rings() - before


def sender_side(name: str = "hybrid", **kw):
    spec = spec_of(name)
    manager = pk.KVCacheManager(spec)
    return spec, manager, TransferSender(manager, timeout=20.0, **kw)


@pytest.mark.parametrize("name,slots,slot_bytes", [("hybrid", 4, 1 << 20), ("int8", 4, 1 << 20),
                                                   ("hybrid", 2, 4096)])  # the last: many chunks, the ring wraps
def test_pages_move_through_the_ring_bit_for_bit(peer, name, slots, slot_bytes, before):
    spec, manager, sender = sender_side(name, shm_slots=slots, shm_slot_bytes=slot_bytes)
    for round_, (seq, n) in enumerate([(7, 23), (8, 61)]):  # the ring is reused by the second transfer
        cache = fill(pk.PagedKVCache.init(spec), manager, seq, n, seed=round_)  # its blocks held other bytes
        tokens = np.arange(n) * 5 % 89
        want = digest(cache, manager, seq)
        sent = sender.send(cache, seq, tokens, peer.addresses[name], cache_key=f"t-{slot_bytes}")  # newly keyed
        assert sent.path == "shm" and sent.released and seq not in manager
        got = peer.ask(name, "digest", seq_id=seq)
        assert got["sha256"] == want["sha256"] and got["first_blocks"] == want["first_blocks"]
        assert not want["tail_zero"] and got["tail_zero"]  # the stale tail was zeroed before it was sent
        assert 0 < sent.keyed <= n // spec.block_size  # its full blocks keyed there (a window sheds some)
        peer.ask(name, "release", seq_id=seq)
    status = peer.ask(name, "status")
    assert status["integrity"] == "ok" and status["used"] == 0 and status["counts"]["received:shm"] >= 2
    sender.close()
    assert new_rings(before) == set()  # the sender's descriptor closed with it
    manager.check_integrity()


@pytest.mark.parametrize("where", ["receiver", "sender", "no-proc"])
def test_tcp_when_either_side_says_no(peer, where, monkeypatch, before):
    spec, manager, sender = sender_side(shared_memory=where != "sender")
    if where == "no-proc":
        monkeypatch.setattr(shm, "PROC", "/nonexistent/proc")
    cache = fill(pk.PagedKVCache.init(spec), manager, 9, 13, seed=4)
    want = digest(cache, manager, 9)
    to = peer.addresses["tcp" if where == "receiver" else "hybrid"]
    sent = sender.send(cache, 9, np.arange(13), to)
    assert sent.path == "tcp"
    assert peer.ask("tcp" if where == "receiver" else "hybrid", "digest", seq_id=9)["sha256"] == want["sha256"]
    peer.ask("tcp" if where == "receiver" else "hybrid", "release", seq_id=9)
    if where == "receiver":
        assert "off at the receiver" in sender._tcp_only[to] and not sender._rings
    sender.close()
    assert new_rings(before) == set()


def test_a_full_receiver_refuses_and_the_ring_is_gone_once_closed(peer, before):
    spec, manager, sender = sender_side()
    manager.admit(3, 23)
    peer.ask("tiny", "admit", seq_id=100, tokens=16)
    with pytest.raises(ReceiverFullError):
        sender.send(pk.PagedKVCache.init(spec), 3, np.arange(23), peer.addresses["tiny"])
    assert len(new_rings(before)) == 1  # offered, never mapped: ours until closed
    sender.close()
    assert new_rings(before) == set()
    status = peer.ask("tiny", "status")
    assert status["integrity"] == "ok" and status["seqs"] == [100] and status["pending"] == 0
    peer.ask("tiny", "release", seq_id=100)
    manager.check_integrity()


@pytest.mark.parametrize("field", ["count", "nbytes", "first"])
def test_a_stream_that_is_not_the_plan_is_refused(peer, field):
    spec, manager, sender = sender_side()
    manager.admit(4, 30)
    cache = pk.PagedKVCache.init(spec)
    offer = sender.offer(cache, 4, np.arange(30), peer.addresses["hybrid"])
    assert offer.path == "shm"
    conn = sender._connection(offer.to)
    good = {"first": offer.ring.position, "count": 1, "nbytes": 1}
    conn.send(messages.make("stream", offer.transfer, **{**good, field: good[field] + 7}))
    reply = conn.expect(offer.transfer, ("done", "failed"), time.monotonic() + 10)
    assert reply["type"] == "failed" and reply["reason"] == "message"
    status = peer.settled("hybrid")
    assert status["used"] == 0 and status["integrity"] == "ok"
    assert 4 in manager
    sender.close()
    manager.check_integrity()


def test_a_forged_ring_is_not_mapped_and_the_pages_go_over_tcp(peer, before):
    spec, manager, sender = sender_side()
    cache = fill(pk.PagedKVCache.init(spec), manager, 5, 10, seed=6)
    want = digest(cache, manager, 5)
    real = sender._ring(peer.addresses["hybrid"], cache)
    forged = {"name": real.name, "nonce": "00" * 16, "slots": real.slots, "slot_bytes": real.slot_bytes}
    for ring, why in [(forged, "header"), ({**forged, "name": "../../etc/passwd"}, "not a paged_kv ring"),
                      ({**forged, "slots": 3}, "regular file"), ({**forged, "slots": 10**6}, "at most")]:
        with pytest.raises(shm.RingRefused, match=why):
            shm.open_ring(ring["name"], ring["nonce"], ring["slots"], ring["slot_bytes"])
    sender._rings[peer.addresses["hybrid"]] = shm.Ring(real.name, b"\0" * 16, real.slots, real.slot_bytes,
                                                       real._mm)  # offers the wrong nonce
    sent = sender.send(cache, 5, np.arange(10), peer.addresses["hybrid"])
    assert sent.path == "tcp" and "header" in sender._tcp_only[peer.addresses["hybrid"]]
    assert peer.ask("hybrid", "digest", seq_id=5)["sha256"] == want["sha256"]
    peer.ask("hybrid", "release", seq_id=5)
    real.close()
    sender.close()
    assert new_rings(before) == set()


def unsealed_ring(slots: int = 2, slot_bytes: int = 4096) -> tuple[int, str, str]:
    """A memfd with a ring's size and header but no seal: (fd, name, nonce hex)."""
    fd = os.memfd_create("paged_kv-xfer-", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, shm.HEADER + slots * slot_bytes)
    nonce = os.urandom(16)
    os.pwrite(fd, shm._LAYOUT.pack(shm.MAGIC, nonce, os.getpid(), slots, slot_bytes), 0)
    return fd, f"{shm.PREFIX}{os.getpid()}-{fd}-{'ab' * 8}", nonce.hex()


def test_an_unsealed_ring_or_another_file_is_refused(tmp_path):
    fd, name, nonce = unsealed_ring()
    try:
        with pytest.raises(shm.RingRefused, match="not sealed"):
            shm.open_ring(name, nonce, 2, 4096)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
        ring = shm.open_ring(name, nonce, 2, 4096)  # sealed: the same file is taken
        ring.close()
    finally:
        os.close(fd)
    path = tmp_path / "ring"
    path.write_bytes(b"\0" * (shm.HEADER + 2 * 4096))  # a regular file of the right size: no seals
    with open(path, "rb+") as f:
        with pytest.raises(shm.RingRefused, match="not sealed"):
            shm.open_ring(f"{shm.PREFIX}{os.getpid()}-{f.fileno()}-{'cd' * 8}", nonce, 2, 4096)
    with pytest.raises(shm.RingRefused, match="cannot open"):  # no such descriptor
        shm.open_ring(f"{shm.PREFIX}{os.getpid()}-999999-{'cd' * 8}", nonce, 2, 4096)


def test_nobody_can_shrink_a_ring_under_the_receiver(peer, before):
    """A mapped file that shrinks makes the next read past its end SIGBUS (the receiver
    would die): the ring is sealed, so a shrink mid-transfer fails and the pages arrive."""
    spec, manager, sender = sender_side(shm_slots=2, shm_slot_bytes=4096)
    cache = fill(pk.PagedKVCache.init(spec), manager, 13, 40, seed=8)
    want = digest(cache, manager, 13)
    offer = sender.offer(cache, 13, np.arange(40), peer.addresses["hybrid"])
    assert offer.path == "shm" and offer.ring is not None and offer.ring.fd is not None
    for fd in (offer.ring.fd, os.open(f"/proc/self/fd/{offer.ring.fd}", os.O_RDWR)):  # another descriptor too
        with pytest.raises(PermissionError):
            os.ftruncate(fd, shm.HEADER)
        assert os.fstat(fd).st_size == shm.HEADER + 2 * 4096
        if fd != offer.ring.fd:
            os.close(fd)
    with pytest.raises(OSError):  # and the seals themselves are sealed
        fcntl.fcntl(offer.ring.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)
    sent = sender.complete(offer, cache)
    assert sent.path == "shm" and peer.ask("hybrid", "digest", seq_id=13)["sha256"] == want["sha256"]
    peer.ask("hybrid", "release", seq_id=13)
    assert peer.settled("hybrid")["integrity"] == "ok"
    sender.close()
    assert new_rings(before) == set()


def test_a_sender_killed_mid_stream_leaves_the_receiver_clean_and_no_file():
    spec = spec_of("hybrid")
    manager = pk.KVCacheManager(spec)
    receiver = TransferReceiver(manager, offer_timeout=20.0, pull_timeout=2.0)
    cache = pk.PagedKVCache.init(spec)
    proc = subprocess.Popen([sys.executable, str(PEER), "send", json.dumps(
        {"spec": "hybrid", "seq_id": 12, "tokens": 50, "to": receiver.address, "die": "mid-stream"})],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    PIDS.add(proc.pid)
    try:
        end, admitted = time.monotonic() + 60, False
        while time.monotonic() < end and (proc.poll() is None or receiver.pending):
            cache, got = receiver.poll(cache, timeout=0.05)
            assert not got
            admitted |= receiver.pending > 0
        assert proc.poll() is not None, proc.stderr.read()[-2000:]
        assert admitted and receiver.pending == 0 and len(manager) == 0 and manager.num_used_blocks == 0
        assert receiver.counts["failed:timeout"] == 1 and receiver.counts["received"] == 0
        manager.check_integrity()
        assert shm.leftovers({proc.pid}) == []  # a memfd: no file to leave
    finally:
        proc.kill()
        proc.wait(5)
        receiver.close()


def test_ring_settings_are_checked():
    manager = pk.KVCacheManager(spec_of("hybrid"))
    for kw in ({"shm_slots": 1}, {"shm_slot_bytes": 5000}, {"shm_slots": 2, "shm_slot_bytes": 1 << 30},
               {"shared_memory": "yes"}):
        with pytest.raises(InvalidArgumentError):
            TransferSender(manager, **kw)
    with pytest.raises(InvalidArgumentError):
        TransferReceiver(manager, shared_memory=1)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = os.path.join(shm.SHM_DIR, f"{shm.PREFIX}{int(dead.stdout)}-{'ab' * 8}")
    live = os.path.join(shm.SHM_DIR, f"{shm.PREFIX}{os.getppid()}-{'cd' * 8}")  # a live process's: kept
    for path in (stale, live):
        open(path, "wb").close()
    try:
        gone = shm.sweep()
        assert os.path.basename(stale) in gone and not os.path.exists(stale) and os.path.exists(live)
    finally:
        for path in (stale, live):
            if os.path.exists(path):
                os.unlink(path)
