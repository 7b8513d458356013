"""Page transfer between two processes (`paged_kv.transfer`): a sequence's pages move
bit for bit (every layer group, int8 pages with their scales), the receiver keys them
in its prefix cache, and every failure -- receiver full, another spec, a sequence
changed since its offer, a sender killed mid-transfer, malformed control messages --
is a typed error that leaves both managers holding nothing for it.

The receivers run in one peer process (tests/transfer_peer.py) for the module; the
sender is this process (or a peer that dies on purpose). Loopback only.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

zmq = pytest.importorskip("zmq")

import paged_kv as pk  # noqa: E402
from paged_kv.errors import (  # noqa: E402
    ReceiverFullError,
    SequenceChangedError,
    TransferMessageError,
    TransferRefusedError,
    TransferSpecError,
    TransferTimeoutError,
)
from paged_kv.transfer import TransferReceiver, TransferSender, messages  # noqa: E402
from paged_kv.transfer.channel import Connection  # noqa: E402

from transfer_peer import digest, fill, spec_of  # noqa: E402

PEER = Path(__file__).parent / "transfer_peer.py"
RECEIVERS = [
    {"name": "hybrid", "spec": "hybrid"},
    {"name": "int8", "spec": "int8"},
    {"name": "tiny", "spec": "tiny"},
    {"name": "short", "spec": "hybrid", "offer_timeout": 1.0, "pull_timeout": 1.5},
]


def start(args: list[str], first_line_within: float = 60.0) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, str(PEER), *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    ready, _, _ = select.select([proc.stdout], [], [], first_line_within)
    if not ready:
        proc.kill()
        raise AssertionError(f"peer gave no line within {first_line_within} s: {proc.stderr.read()[-2000:]}")
    line = proc.stdout.readline()
    if not line:
        proc.wait(5)
        raise AssertionError(f"peer died: {proc.stderr.read()[-3000:]}")
    return proc, line


class Peer:
    def __init__(self, proc, info):
        self.proc, self.addresses = proc, info["receivers"]
        self.sock = zmq.Context.instance().socket(zmq.REQ)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVTIMEO, 30_000)
        self.sock.connect(info["control"])

    def ask(self, name: str, cmd: str, **kw) -> dict:
        self.sock.send_json({"cmd": cmd, "name": name, **kw})
        return self.sock.recv_json()

    def settled(self, name: str, within: float = 10.0) -> dict:
        """The receiver's status once it holds nothing in flight (polled until ``within``)."""
        end = time.monotonic() + within
        while True:
            status = self.ask(name, "status")
            if status["pending"] == 0 or time.monotonic() > end:
                return status


def receiving_peer(receivers: list[dict], pids: set[int] | None = None):
    """A receiver process serving ``receivers`` (its pid added to ``pids``), stopped, then
    killed if it lingers, when the generator is closed: a module fixture's body."""
    proc, line = start(["receive", json.dumps(receivers), "240"])
    if pids is not None:
        pids.add(proc.pid)
    p = Peer(proc, json.loads(line))
    try:
        yield p
    finally:
        try:
            p.sock.send_json({"cmd": "stop"})
            p.sock.recv_json()
        except zmq.ZMQError:
            pass
        p.sock.close(0)
        try:
            proc.wait(10)
        finally:
            proc.kill()


@pytest.fixture(scope="module")
def peer():
    yield from receiving_peer(RECEIVERS)


def sender_side(name: str = "hybrid", prefix: bool = True, **changes):
    spec = spec_of(name, **changes)
    manager = pk.KVCacheManager(spec, prefix_cache=prefix)
    return spec, manager, TransferSender(manager, timeout=20.0)


def clean(manager) -> None:
    manager.check_integrity()


@pytest.mark.parametrize("name", ["hybrid", "int8"])
def test_a_sequence_moves_bit_for_bit_and_is_keyed_there(peer, name):
    spec, manager, sender = sender_side(name)
    cache = fill(pk.PagedKVCache.init(spec), manager, 7, 23, seed=1)  # its blocks held another sequence's bytes
    tokens = np.arange(23) * 3 % 101
    manager.cache_tokens(7, tokens, "tenant-a")
    want = digest(cache, manager, 7)
    sent = sender.send(cache, 7, tokens, peer.addresses[name], cache_key="tenant-a", info={"first_token": 5})
    assert sent.released and 7 not in manager and sent.num_tokens == 23 and sent.nbytes > 0
    got = peer.ask(name, "digest", seq_id=7)
    assert got["sha256"] == want["sha256"] and got["first_blocks"] == want["first_blocks"]
    assert not want["tail_zero"] and got["tail_zero"]  # the stale bytes past its length here were not sent
    assert sent.keyed == 5  # its 5 full blocks, keyed there under the same chain keys and salt
    if name == "hybrid":  # the sliding group had shed blocks: only the window's were sent
        assert want["first_blocks"][1] > 0
    else:  # full attention (int8 pages): a later request with these tokens hits there, and here
        assert peer.ask(name, "hit", tokens=tokens.tolist(), cache_key="tenant-a")["cached"] == 20
        assert peer.ask(name, "hit", tokens=tokens.tolist())["cached"] == 0
        assert manager.admit_prompt(8, tokens, "tenant-a") == 20
        manager.release(8)
    status = peer.ask(name, "status")
    assert status["integrity"] == "ok" and 7 in status["seqs"]
    # The same id again: refused, nothing held.
    manager.admit(7, 5)
    with pytest.raises(TransferRefusedError) as err:
        sender.send(cache, 7, np.arange(5), peer.addresses[name])
    assert err.value.reason == "duplicate" and 7 in manager
    peer.ask(name, "release", seq_id=7)
    assert peer.ask(name, "status")["used"] == 0
    clean(manager)


def test_a_full_receiver_refuses_and_nobody_holds_anything(peer):
    spec, manager, sender = sender_side()
    manager.admit(3, 23)  # 6 blocks; the tiny receiver has 7, 4 of them taken (refused before any page moves)
    before = manager.snapshot()
    peer.ask("tiny", "admit", seq_id=100, tokens=16)
    with pytest.raises(ReceiverFullError) as err:
        sender.send(pk.PagedKVCache.init(spec), 3, np.arange(23), peer.addresses["tiny"])
    assert (err.value.needed, err.value.free) == (6, 3) and isinstance(err.value, MemoryError)
    assert manager.snapshot() == before
    status = peer.ask("tiny", "status")
    assert status["integrity"] == "ok" and status["seqs"] == [100] and status["pending"] == 0
    assert peer.ask("tiny", "release", seq_id=100)["used"] == 0
    assert status["counts"]["refused:full"] >= 1
    clean(manager)


@pytest.mark.parametrize("name,changes,to", [
    ("hybrid", {"block_size": 2}, "hybrid"),
    ("hybrid", {"kv_format": "int8"}, "hybrid"),
    ("hybrid", {"sliding_window": 8}, "hybrid"),
    ("int8", {"kv_key_offsets": (np.full((2, 8), 0.25), None, None)}, "int8"),
    ("int8", {"kv_scale_dtype": "bfloat16"}, "int8"),
    ("hybrid", {"layout": "unified"}, "hybrid"),
])
def test_another_spec_format_offsets_or_block_size_is_refused(peer, name, changes, to):
    layout = changes.pop("layout", "split")
    spec, manager, sender = sender_side(name, **changes)
    manager.admit(4, 10)
    before = manager.snapshot()
    with pytest.raises(TransferSpecError) as err:
        sender.send(pk.PagedKVCache.init(spec, layout=layout), 4, np.arange(10), peer.addresses[to])
    assert err.value.reason == "spec"
    assert manager.snapshot() == before
    status = peer.ask(to, "status")
    assert status["integrity"] == "ok" and status["used"] == 0
    clean(manager)


def test_a_pool_of_another_size_is_compatible(peer):
    spec, manager, sender = sender_side("bigger")
    cache = fill(pk.PagedKVCache.init(spec), manager, 9, 13, seed=2, dirty=False)
    want = digest(cache, manager, 9)
    sender.send(cache, 9, np.arange(13), peer.addresses["hybrid"], release=False)
    assert 9 in manager  # kept
    assert peer.ask("hybrid", "digest", seq_id=9)["sha256"] == want["sha256"]
    peer.ask("hybrid", "release", seq_id=9)
    clean(manager)


def test_a_sequence_changed_since_its_offer_is_dropped_on_both_sides(peer):
    spec, manager, sender = sender_side()
    manager.admit(5, 10)
    cache = pk.PagedKVCache.init(spec)
    offer = sender.offer(cache, 5, np.arange(10), peer.addresses["hybrid"])
    assert peer.ask("hybrid", "status")["used"] > 0  # admitted there, waiting for the pages
    manager.append([5], 1)
    manager.commit([5], 11)
    with pytest.raises(SequenceChangedError):
        sender.complete(offer, cache)
    assert 5 in manager and manager.kv_len(5) == 11
    status = peer.settled("hybrid")
    assert status["used"] == 0 and status["integrity"] == "ok" and status["counts"]["aborted"] >= 1
    clean(manager)


def test_an_offer_never_pulled_and_pages_that_never_come_are_freed(peer):
    """The sender stops after the receiver admitted (its offer deadline frees it), or asks
    for pages it never posted (the pull deadline frees it, and the sender hears why)."""
    spec, manager, sender = sender_side()
    manager.admit(6, 10)
    cache = pk.PagedKVCache.init(spec)
    sender.offer(cache, 6, np.arange(10), peer.addresses["short"])
    assert peer.ask("short", "status")["used"] > 0
    time.sleep(1.2)
    status = peer.settled("short")
    assert status["used"] == 0 and status["counts"]["failed:timeout"] >= 1
    offer = sender.offer(cache, 6, np.arange(10), peer.addresses["short"])
    conn = sender._connection(offer.to)
    conn.send(messages.make("pull", offer.transfer, address=sender._transfer_server().address(), uuid=99))
    reply = conn.expect(offer.transfer, ("done", "failed"), time.monotonic() + 10)
    assert reply["type"] == "failed" and reply["reason"] == "timeout"
    status = peer.ask("short", "status")
    assert status["used"] == 0 and status["integrity"] == "ok"
    assert 6 in manager
    clean(manager)


def test_a_sender_killed_mid_transfer_leaves_the_receiver_clean():
    """A peer process offers a sequence to a receiver here, asks for the pull of pages it
    never posted and dies: the pull fails (or times out), the receiver frees the blocks."""
    spec = spec_of("hybrid")
    manager = pk.KVCacheManager(spec, prefix_cache=True)
    receiver = TransferReceiver(manager, offer_timeout=20.0, pull_timeout=3.0)
    cache = pk.PagedKVCache.init(spec)
    proc = subprocess.Popen([sys.executable, str(PEER), "send", json.dumps(
        {"spec": "hybrid", "seq_id": 11, "tokens": 30, "to": receiver.address, "die": "pull-unposted"})],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    try:
        end, admitted = time.monotonic() + 60, False
        while time.monotonic() < end and (proc.poll() is None or receiver.pending):
            cache, got = receiver.poll(cache, timeout=0.05)
            assert not got
            admitted |= receiver.pending > 0
        assert proc.poll() is not None, "the sender did not die"
        assert admitted and receiver.pending == 0 and len(manager) == 0 and manager.num_used_blocks == 0
        assert receiver.counts["failed:connection"] + receiver.counts["failed:timeout"] == 1
        manager.check_integrity()
    finally:
        proc.kill()
        proc.wait(5)
        receiver.close()


def test_malformed_and_oversized_control_messages_are_refused(peer):
    conn = Connection(peer.addresses["hybrid"])
    good = messages.make("abort", "x" * 32, reason="r", message="m")
    bad = [
        b"\xff\xfe not utf-8",
        b"not json",
        b"[1, 2]",
        b'{"protocol": "paged_kv.transfer", "version": 1, "type": "offer", "transfer": "t", "seq_id": NaN}',
        json.dumps({**good, "version": messages.VERSION + 1}).encode(),
        json.dumps({**good, "protocol": "other"}).encode(),
        json.dumps({**good, "type": "launch"}).encode(),
        json.dumps({**good, "extra": 1}).encode(),
        json.dumps({**good, "type": "done"}).encode(),  # a reply type, sent to the receiver
        json.dumps({k: v for k, v in good.items() if k != "reason"}).encode(),
        json.dumps({**good, "reason": 5}).encode(),
        b"[" * 100000 + b"]" * 100000,
        b" " * (messages.MAX_MESSAGE_BYTES + 1),
    ]
    before = peer.ask("hybrid", "status")["counts"].get("refused:message", 0)
    for i, data in enumerate(bad):
        conn.send_raw(data)
        reply = conn.expect("", ("refused",), time.monotonic() + 10)  # no transfer id can be trusted
        assert reply["reason"] == "message", (i, reply)
    status = peer.ask("hybrid", "status")
    assert status["counts"]["refused:message"] - before == len(bad)
    assert status["integrity"] == "ok" and status["pending"] == 0
    conn.close()


def test_messages_round_trip_and_are_checked_here_too():
    msg = messages.make("refused", "abc", reason="full", message="m", needed=3, free=1)
    assert messages.decode(messages.encode(msg)) == msg
    with pytest.raises(TransferMessageError, match="over the bound"):
        messages.encode(messages.make("failed", "t", reason="r", message="m"), max_bytes=1024) and \
            messages.decode(b"x" * 2000, max_bytes=1024)
    with pytest.raises(TransferMessageError, match="field 'needed'"):
        messages.make("refused", "t", reason="r", message="m", needed=True, free=0)
    with pytest.raises(TransferMessageError, match="one first block"):
        messages.make("offer", "t", seq_id=1, num_tokens=2, tokens=[1, 2], cache_key=None, first_blocks=[0],
                      blocks=[1, 1], padded=[1, 1], spec={}, leaves=[], info={}, shm=None)
    with pytest.raises(TransferMessageError, match="padding"):
        messages.make("offer", "t", seq_id=1, num_tokens=2, tokens=[1, 2], cache_key=None, first_blocks=[0],
                      blocks=[1], padded=[4], spec={}, leaves=[], info={}, shm=None)
    assert messages.salt_from_json(messages.salt_to_json(b"\x00salt")) == b"\x00salt"
    with pytest.raises(TransferMessageError):
        messages.salt_to_json(("a", 1))
    # A receiver that does not answer: the sender's deadline, nothing changed here.
    spec, manager, sender = sender_side()
    manager.admit(1, 4)
    before = manager.snapshot()
    with pytest.raises(TransferTimeoutError):
        sender.send(pk.PagedKVCache.init(spec), 1, np.arange(4), "tcp://127.0.0.1:9", timeout=0.3)
    assert manager.snapshot() == before
