"""`TransferSender`: offer one sequence's pages to another process's cache, send them,
then release the sequence here (or keep it).

``send`` is ``offer`` then ``complete``. Between the two the sender may go on running
steps (only the offered sequence must stay as it was): ``offer`` waits for the
receiver to admit the sequence (or refuse it, a typed error: nothing is held on
either side), ``complete`` checks the sequence has not changed since and sends it.

Two paths, the receiver's answer to the offer picks one. ``"shm"``: both caches are
host memory on one host and the receiver mapped the ring the offer named (one per
receiver, reused): the sender copies its blocks' rows chunk by chunk from its pool,
read in place, into the ring's slots, while the receiver copies the chunk before
out into its pool (`paged_kv.transfer.stream`). ``"tcp"`` otherwise (another host or
memfd or /proc, a device pool, ``shared_memory=False`` on either side): blocks gathered in
one jitted call, posted to this process's transfer server, pulled by the receiver.
Either way `complete` returns once the receiver has written them.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import attrs
import jax
import numpy as np

from paged_kv.allocator.arguments import check_token_ids
from paged_kv.allocator.manager import KVCacheManager
from paged_kv.cache import PagedKVCache
from paged_kv.errors import (
    InvalidArgumentError,
    InvalidTokenCountError,
    PagedKVError,
    ReceiverFullError,
    SequenceChangedError,
    TransferConnectionError,
    TransferError,
    TransferMessageError,
    TransferRefusedError,
    TransferSpecError,
    TransferTimeoutError,
)
from paged_kv.sequence_pages import padded_sizes, read_sequence
from paged_kv.spec import require_same_spec
from paged_kv.transfer import messages
from paged_kv.transfer.channel import Connection
from paged_kv.transfer.pages import abandon, leaves_of, spec_fields, transfer_server
from paged_kv.transfer.shm import Ring, available, check_geometry, create
from paged_kv.host_pool import host_memory
from paged_kv.transfer.stream import Source, plan, row_bytes

if TYPE_CHECKING:
    from jax.experimental.transfer import TransferServer


@attrs.frozen(eq=False)
class Offer:
    """An offer the receiver accepted: it holds blocks for the sequence until `complete`
    (or `abort`, or its own deadline)."""

    transfer: str
    seq_id: int
    num_tokens: int
    first_blocks: tuple[int, ...]
    blocks: tuple[np.ndarray, ...]
    generations: tuple[np.ndarray, ...]
    padded: tuple[int, ...]
    to: str
    started: float
    path: str = "tcp"
    """How the pages go: ``"shm"`` (the receiver mapped the offered ring) or ``"tcp"``."""
    ring: Ring | None = None


@attrs.frozen
class Sent:
    """A finished transfer: the receiver holds ``seq_id`` with ``num_tokens`` tokens written
    and ``keyed`` of its full blocks newly keyed in its prefix cache; ``released`` says
    whether this side let go of it. ``seconds``: offer to done; ``nbytes``: bytes sent;
    ``path``: ``"shm"`` or ``"tcp"`` (`Offer.path`)."""

    seq_id: int
    num_tokens: int
    keyed: int
    released: bool
    nbytes: int
    seconds: float
    path: str = "tcp"


def _refusal(msg: dict[str, Any]) -> TransferError:
    text = f"the receiver refused the offer: {msg['message']}"
    reason = msg["reason"]
    if reason == "spec":
        return TransferSpecError(text, reason)
    if reason == "full":
        return ReceiverFullError(text, msg["needed"], msg["free"])
    if reason == "message":
        return TransferMessageError(text)
    return TransferRefusedError(text, reason)


def _failure(msg: dict[str, Any]) -> TransferError:
    text = f"the receiver dropped the transfer: {msg['message']}"
    if msg["reason"] == "timeout":
        return TransferTimeoutError(text)
    if msg["reason"] == "message":
        return TransferMessageError(text)
    return TransferConnectionError(text)


class TransferSender:
    """Sends sequences of ``manager``'s cache to receivers (`TransferReceiver` addresses).

    ``timeout``: seconds to wait for each answer of a receiver (its own deadlines are
    shorter by default, so it frees what it held and says so first).
    ``max_message_bytes``: the bound of one control message (both sides must allow the
    offers they exchange: an offer carries the prompt's token ids).
    ``shared_memory``: offer a ring (`paged_kv.transfer.shm`) when the cache is host memory (False:
    always TCP); ``shm_slots`` x ``shm_slot_bytes``: its geometry (a slot is one
    chunk; a few slots that fit the last-level cache let the receiver read what the
    sender just wrote from cache -- 8 x 2 MiB: fewer chunks, so fewer hand-offs, than
    4 x 1 MiB; a slot grows to a block's row when that is larger)."""

    def __init__(self, manager: KVCacheManager, *, timeout: float = 60.0,
                 max_message_bytes: int = messages.MAX_MESSAGE_BYTES, device: jax.Device | None = None,
                 shared_memory: bool = True, shm_slots: int = 8, shm_slot_bytes: int = 2 << 20) -> None:
        if not isinstance(manager, KVCacheManager):
            raise InvalidArgumentError(f"manager is a {type(manager).__name__}; expected a KVCacheManager")
        if not isinstance(shared_memory, bool):
            raise InvalidArgumentError(f"shared_memory={shared_memory!r} must be True or False")
        self.manager = manager
        self.timeout = _seconds(timeout, "timeout")
        self.max_message_bytes = max_message_bytes
        self.shared_memory = shared_memory
        self.shm_slots, self.shm_slot_bytes = check_geometry(shm_slots, shm_slot_bytes)
        self._device = device
        self._server: TransferServer | None = None
        self._connections: dict[str, Connection] = {}
        self._rings: dict[str, Ring] = {}
        self._tcp_only: dict[str, str] = {}
        """Receivers that answered an offered ring with TCP, and why (not offered again)."""

    # ---- the two steps ---------------------------------------------------------------
    def offer(self, cache: PagedKVCache, seq_id: int, token_ids: Sequence[int] | np.ndarray, to: str, *,
              cache_key: str | int | bytes | None = None, info: dict[str, Any] | None = None,
              timeout: float | None = None) -> Offer:
        """Offer ``seq_id`` (its ``token_ids``: all ``kv_len`` of them, written) to the receiver
        at ``to``; returns once it has admitted the sequence. ``cache_key``: the prefix
        cache's salt, under which the receiver keys the full blocks; ``info``: any JSON
        object the receiver gets with the sequence (e.g. its sampling state).

        Raised before anything is sent: the manager's `UnknownSequenceError`,
        `SlotError` (take it out of its decode slot first), `StateError` (a copy into
        it not committed), `InvalidTokenCountError` / `InvalidTokenIdError`. Refusals:
        `TransferSpecError`, `ReceiverFullError`, `TransferRefusedError`,
        `TransferMessageError`; `TransferTimeoutError` without an answer."""
        require_same_spec(self.manager, cache, "manager", "cache")
        record = self.manager.swap_record(seq_id)
        tokens = check_token_ids(token_ids, f"offer(seq_id={seq_id})")
        if tokens.size != record.num_tokens:
            raise InvalidTokenCountError(f"offer(seq_id={seq_id}): {tokens.size} token ids for a sequence of "
                                         f"{record.num_tokens} tokens; give all of them")
        if info is not None and not (isinstance(info, dict) and all(isinstance(k, str) for k in info)):
            raise InvalidArgumentError(f"info={info!r:.80} must be a dict with str keys (sent as JSON)")
        gens = tuple(g.pool.generations_of(b) for g, b in zip(self.manager.groups, record.blocks))
        padded = padded_sizes(record.num_blocks, self.manager.spec.max_blocks_per_seq)
        transfer = secrets.token_hex(16)
        conn = self._connection(to)
        ring = self._ring(to, cache)
        msg = messages.make("offer", transfer, seq_id=int(record.seq_id), num_tokens=int(record.num_tokens),
                            tokens=tokens.tolist(), cache_key=messages.salt_to_json(cache_key),
                            first_blocks=list(record.first_blocks), blocks=list(record.num_blocks),
                            padded=list(padded), spec=spec_fields(self.manager.spec), leaves=leaves_of(cache),
                            info=dict(info or {}), shm=None if ring is None else {
                                "name": ring.name, "nonce": ring.nonce.hex(), "slots": ring.slots,
                                "slot_bytes": ring.slot_bytes})
        started = time.perf_counter()
        conn.send(msg)
        deadline = time.monotonic() + _seconds(self.timeout if timeout is None else timeout, "timeout")
        try:
            reply = conn.expect(transfer, ("ready", "refused"), deadline)
        except TransferError:
            self._abort(conn, transfer, "no answer to the offer in time")
            raise
        if reply["type"] == "refused":
            conn.forget(transfer)
            raise _refusal(reply)
        if ring is not None and reply["path"] != "shm":  # not this receiver (another pid namespace, its cache, its setting)
            self._tcp_only[to] = reply["why"]
            self._drop_ring(to)
            ring = None
        return Offer(transfer, int(record.seq_id), int(record.num_tokens), tuple(record.first_blocks),
                     tuple(record.blocks), gens, padded, to, started, reply["path"] if ring else "tcp", ring)

    def complete(self, offer: Offer, cache: PagedKVCache, *, release: bool = True,
                 timeout: float | None = None) -> Sent:
        """Send the pages of an accepted ``offer`` from ``cache`` (not donated) and wait until
        the receiver has written them; then release the sequence here unless ``release``
        is False (a released sequence's full blocks stay in this manager's prefix cache).

        `SequenceChangedError` if the sequence changed since the offer (the receiver is
        told to drop it). `TransferTimeoutError`, `TransferConnectionError` when the
        receiver failed or vanished: it freed what it held (or will, at its deadline),
        and this side keeps the sequence."""
        if not isinstance(offer, Offer):
            raise InvalidArgumentError(f"complete needs the Offer offer() returned; got {type(offer).__name__}")
        conn = self._connection(offer.to)
        require_same_spec(self.manager, cache, "manager", "cache")
        if not self._unchanged(offer):
            self._abort(conn, offer.transfer, "the sequence changed since the offer")
            raise SequenceChangedError(f"seq_id={offer.seq_id} changed since it was offered (released, grown or moved "
                                       "to other blocks); the receiver was told to drop it: offer it again")
        wait = _seconds(self.timeout if timeout is None else timeout, "timeout")
        if offer.path == "shm":
            reply, nbytes = self._stream(offer, cache, conn, wait)
        else:
            reply, nbytes = self._pull(offer, cache, conn, wait)
        released = bool(release)
        if released:
            try:
                self.manager.release(offer.seq_id)
            except PagedKVError:  # released (or slotted) by the caller meanwhile: nothing to let go
                released = False
        return Sent(int(reply["seq_id"]), offer.num_tokens, int(reply["keyed"]), released, nbytes,
                    time.perf_counter() - offer.started, offer.path)

    def _pull(self, offer: Offer, cache: PagedKVCache, conn: Connection, wait: float) -> tuple[dict[str, Any], int]:
        """The TCP path: gather, post, wait for the receiver's pull and write."""
        pages = read_sequence(cache, offer.blocks, offer.first_blocks, offer.num_tokens, offer.padded,
                              self.manager.steps.tag)
        flat = jax.tree_util.tree_leaves(pages)
        server = self._transfer_server()
        uuid = secrets.randbits(62)
        server.await_pull(uuid, flat)
        conn.send(messages.make("pull", offer.transfer, address=server.address(), uuid=uuid))
        deadline = time.monotonic() + wait
        try:
            reply = conn.expect(offer.transfer, ("done", "failed"), deadline)
        except TransferError:
            self._abort(conn, offer.transfer, "no answer to the pull in time")
            self._drain(uuid, flat)
            raise
        conn.forget(offer.transfer)
        if reply["type"] == "failed":
            self._drain(uuid, flat)
            raise _failure(reply)
        return reply, sum(int(a.nbytes) for a in flat)

    def _stream(self, offer: Offer, cache: PagedKVCache, conn: Connection, wait: float) -> tuple[dict[str, Any], int]:
        """The shared-memory path: announce the chunks (``stream``), then chunk by chunk
        from the pool (read in place) into the ring's slots, each slot reused once the
        receiver's ``read`` counter passed it; then wait for its ``done``. Any failure
        drops the ring (the receiver may still read it) and the receiver frees what it
        held."""
        ring = offer.ring
        assert ring is not None
        p = plan(cache, tuple(b.size for b in offer.blocks), ring.slot_bytes)
        src: Source | None = None
        try:
            src = Source(cache, p, offer.blocks, offer.first_blocks, offer.num_tokens, self.manager.steps.tag)
            first = ring.position
            conn.send(messages.make("stream", offer.transfer, first=first, count=len(p.chunks), nbytes=p.nbytes))
            for k in range(len(p.chunks)):
                c = first + k
                if c - ring.read >= ring.slots:  # the slot's previous chunk is not copied out yet
                    # Wait for half the ring (chunks up to c - 1 are written, so the
                    # receiver gets there): one wake per slots / 2 chunks, not per chunk.
                    _await_read(ring, min(c - ring.slots + ring.slots // 2, c), conn, offer.transfer,
                                time.monotonic() + wait)
                src.fill(k, ring.slot(c))
                ring.written = c + 1
            ring.position = first + len(p.chunks)
            src = None  # no view of the pool outlives the copies (a live one makes the next donation copy)
            reply = conn.expect(offer.transfer, ("done", "failed"), time.monotonic() + wait)
            if reply["type"] == "failed":
                raise _failure(reply)
            conn.forget(offer.transfer)
            return reply, p.nbytes
        except TransferError:
            self._abort(conn, offer.transfer, "the sender gave up on the transfer")
            self._drop_ring(offer.to)
            raise
        finally:
            src = None

    def send(self, cache: PagedKVCache, seq_id: int, token_ids: Sequence[int] | np.ndarray, to: str, *,
             cache_key: str | int | bytes | None = None, info: dict[str, Any] | None = None, release: bool = True,
             timeout: float | None = None) -> Sent:
        """`offer` then `complete`: move ``seq_id`` to the receiver at ``to``."""
        offer = self.offer(cache, seq_id, token_ids, to, cache_key=cache_key, info=info, timeout=timeout)
        return self.complete(offer, cache, release=release, timeout=timeout)

    def abort(self, offer: Offer, reason: str = "aborted by the sender") -> None:
        """Tell the receiver to drop an accepted ``offer`` (it frees its blocks)."""
        self._abort(self._connection(offer.to), offer.transfer, reason)

    def close(self) -> None:
        """Close the control sockets and rings (the transfer server lives as long as this object)."""
        for conn in self._connections.values():
            conn.close()
        self._connections.clear()
        for to in list(self._rings):
            self._drop_ring(to)

    # ---- helpers -----------------------------------------------------------------------
    def _connection(self, to: str) -> Connection:
        conn = self._connections.get(to)
        if conn is None:
            conn = self._connections[to] = Connection(to, self.max_message_bytes)
        return conn

    def _ring(self, to: str, cache: PagedKVCache) -> Ring | None:
        """The ring to offer ``to`` (made on first use), or None: shared memory off,
        refused by that receiver before, unavailable here, or the cache not host memory."""
        if not self.shared_memory or to in self._tcp_only or not host_memory(cache):
            return None
        ring = self._rings.get(to)
        if ring is None or ring.closed:
            largest = max((r for layer in row_bytes(cache) for r in layer), default=0)
            slot = max(self.shm_slot_bytes, -(-largest // 4096) * 4096)
            try:
                check_geometry(self.shm_slots, slot)
                if not available():
                    raise OSError("no memfd or /proc here")
                ring = self._rings[to] = create(self.shm_slots, slot)
            except (OSError, InvalidArgumentError) as exc:  # no memfd, no memory, or rows too large: TCP
                self._tcp_only[to] = str(exc)[:200]
                return None
        return ring

    def _drop_ring(self, to: str) -> None:
        ring = self._rings.pop(to, None)
        if ring is not None:
            ring.close()

    def _transfer_server(self) -> TransferServer:
        if self._server is None:
            self._server = transfer_server(self._device)
        return self._server

    def _unchanged(self, offer: Offer) -> bool:
        try:
            record = self.manager.swap_record(offer.seq_id)
        except PagedKVError:
            return False
        groups = self.manager.groups
        return (record.num_tokens == offer.num_tokens and tuple(record.first_blocks) == offer.first_blocks
                and all(np.array_equal(a, b) for a, b in zip(record.blocks, offer.blocks))
                and all(np.array_equal(g.pool.generations_of(b), gen)
                        for g, b, gen in zip(groups, record.blocks, offer.generations)))

    @staticmethod
    def _abort(conn: Connection, transfer: str, reason: str) -> None:
        try:
            conn.send(messages.make("abort", transfer, reason="aborted", message=reason[:200]))
        except Exception:  # best effort: the receiver's own deadline frees it anyway
            pass
        conn.forget(transfer)

    def _drain(self, uuid: int, flat: list[jax.Array], wait: float = 2.0) -> None:
        """Take back pages posted for a pull that will not come (the transfer server keeps
        them until pulled): pull them ourselves, and give up on them after ``wait``."""
        server = self._transfer_server()
        conn = server.connect(server.address())
        shapes = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding) for a in flat]  # type: ignore[no-untyped-call]  # jax: unannotated
        got = conn.pull(uuid, shapes)
        end = time.monotonic() + wait
        while not all(a.is_ready() for a in got) and time.monotonic() < end:
            time.sleep(0.002)
        if not all(a.is_ready() for a in got):
            abandon(conn)
        del got


def _await_read(ring: Ring, count: int, conn: Connection, transfer: str, deadline: float) -> None:
    """Wait until the receiver has copied ``count`` chunks out of ``ring``: polling its
    counter (asleep on its futex, not spinning), and every millisecond the control socket for its
    ``failed``; `TransferTimeoutError` past ``deadline``."""
    checked = time.monotonic()
    while ring.wait("read", count, 0.001) < count:  # asleep until the receiver stores ``read``
        now = time.monotonic()
        if now - checked > 0.001:
            checked = now
            reply = conn.peek(transfer)
            if reply is not None:
                raise _failure(conn.expect(transfer, ("failed",), deadline))
            if now > deadline:
                raise TransferTimeoutError(f"transfer {transfer}: the receiver copied no chunk out of the ring "
                                           "before the deadline (is it polling?)")


def _seconds(value: Any, name: str) -> float:
    if not messages.finite(value) or value <= 0:
        raise InvalidArgumentError(f"{name}={value!r} must be a positive number of seconds")
    return float(value)


__all__ = ["Offer", "Sent", "TransferSender"]
