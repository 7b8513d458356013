"""`TransferReceiver`: admit sequences other processes send, pull their pages and write
them into this process's cache, between the steps of whatever runs here.

Everything happens inside `poll`, on the caller's thread: it answers offers (admit the
sequence into fresh blocks, all or nothing, or refuse it with a reason; map the ring
the offer names, or answer that the pages go over TCP), copies the chunks senders put
in their rings into the pool in place, starts the pulls senders ask for
(`jax.experimental.transfer`, asynchronous: a decode step can run while the pages
arrive) and writes the pages that arrived in one jitted call each, keys the
sequence's full blocks in the prefix cache, and frees whatever a sender abandoned:
an offer with no chunk or pull before ``offer_timeout``, pages not all there within
``pull_timeout`` or a failed pull (the sender died or closed its server), an abort.

A poll copies every chunk in a ring and, once it copied some, goes on while the next
ones follow within ``STREAM_GAP`` seconds: a sequence streams in one poll when its
sender keeps up, and a sender that stops costs a poll one gap at most.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import TYPE_CHECKING, Any

import attrs
import jax
import numpy as np

from paged_kv.allocator.manager import KVCacheManager
from paged_kv.allocator.swap_record import SwapRecord
from paged_kv.cache import PagedKVCache
from paged_kv.errors import (
    DuplicateSequenceError,
    InvalidArgumentError,
    OutOfBlocksError,
    PagedKVError,
    TransferMessageError,
    TransferSpecError,
)
from paged_kv.sequence_pages import write_back
from paged_kv.spec import require_same_spec
from paged_kv.transfer import messages
from paged_kv.transfer.channel import Listener
from paged_kv.transfer.pages import abandon, check_compatible, nest, pull_shapes, transfer_server
from paged_kv.transfer.shm import Ring, RingRefused, open_ring
from paged_kv.host_pool import host_memory
from paged_kv.transfer.stream import Plan, Sink, plan, take_over

if TYPE_CHECKING:
    from jax.experimental.transfer import TransferConnection, TransferServer

STREAM_GAP = 0.05
"""Seconds a poll that copied chunks waits for the next one before it returns."""
MAX_RINGS = 8
"""Rings kept mapped (one per sender, least recently offered dropped first)."""


@attrs.frozen(eq=False)
class Received:
    """A sequence now held by the receiver's manager, its pages written: ``tokens`` (all
    ``num_tokens``), the salt they were keyed under, the sender's ``info``, how many
    full blocks were newly keyed, bytes received, seconds from offer to written, and
    the path they came by (``"shm"`` or ``"tcp"``)."""

    seq_id: int
    num_tokens: int
    tokens: np.ndarray
    cache_key: object
    info: dict[str, Any]
    keyed: int
    nbytes: int
    seconds: float
    path: str = "tcp"


@dataclasses.dataclass
class _Incoming:
    transfer: str
    peer: bytes
    seq_id: int
    tokens: np.ndarray
    cache_key: int | str | bytes | None
    info: dict[str, Any]
    ids: tuple[np.ndarray, ...]
    padded: tuple[int, ...]
    deadline: float
    started: float
    arrays: list[jax.Array] | None = None
    source: str = ""
    ring: Ring | None = None
    plan: Plan | None = None
    first: int = -1
    """The ring's number of the transfer's first chunk (-1: not streaming)."""
    progress: float = 0.0
    """When its stream started or its last chunk was copied (`time.monotonic`)."""
    copied: int = 0
    stamped: bool = False


class TransferReceiver:
    """Receives sequences into ``manager``'s cache; senders connect to `address`
    (127.0.0.1 only). ``offer_timeout``: seconds an admitted offer may wait for its
    first chunk or pull; ``pull_timeout``: seconds its pages may take from then.
    ``shared_memory``: map the rings senders offer (False: always TCP). Call `poll`
    between steps."""

    def __init__(self, manager: KVCacheManager, *, port: int = 0, offer_timeout: float = 30.0,
                 pull_timeout: float = 30.0, max_message_bytes: int = messages.MAX_MESSAGE_BYTES,
                 device: jax.Device | None = None, shared_memory: bool = True) -> None:
        if not isinstance(manager, KVCacheManager):
            raise InvalidArgumentError(f"manager is a {type(manager).__name__}; expected a KVCacheManager")
        if not isinstance(shared_memory, bool):
            raise InvalidArgumentError(f"shared_memory={shared_memory!r} must be True or False")
        self.shared_memory = shared_memory
        self._rings: collections.OrderedDict[str, Ring] = collections.OrderedDict()
        for name, value in (("offer_timeout", offer_timeout), ("pull_timeout", pull_timeout)):
            if not messages.finite(value) or value <= 0:
                raise InvalidArgumentError(f"{name}={value!r} must be a positive number of seconds")
        self.manager = manager
        self.offer_timeout, self.pull_timeout = float(offer_timeout), float(pull_timeout)
        self._listener = Listener(port, max_message_bytes)
        self._device = device
        self._server: TransferServer | None = None
        self._pullers: dict[str, TransferConnection] = {}
        self._incoming: dict[str, _Incoming] = {}
        self.counts: collections.Counter[str] = collections.Counter()
        """Offers received, refused (by reason), sequences received, transfers failed or aborted."""
        self.events: collections.deque[tuple[str, str, str]] = collections.deque(maxlen=256)
        """The latest ``(kind, transfer, detail)`` of refusals, failures and aborts."""

    @property
    def address(self) -> str:
        """Where senders connect: ``tcp://127.0.0.1:PORT``."""
        return self._listener.address

    @property
    def pending(self) -> int:
        """Transfers admitted and not finished (their blocks are held)."""
        return len(self._incoming)

    def poll(self, cache: PagedKVCache, timeout: float = 0.0) -> tuple[PagedKVCache, list[Received]]:
        """Handle what arrived, waiting up to ``timeout`` seconds for something to finish.
        Returns the cache (donated when pages were written: keep the one returned) and
        the sequences received. Pages arrive committed to their device, and so does a
        cache they were written into: commit yours up front (``jax.device_put(cache,
        device)``), or jit compiles its steps again for the new placement."""
        require_same_spec(self.manager, cache, "manager", "cache")
        end = time.monotonic() + max(0.0, float(timeout))
        received: list[Received] = []
        while True:
            while self._listener.wait(0):
                self._handle(cache, *self._listener.receive())
            cache = self._finish(cache, received)
            cache = self._stream(cache, received, end)
            self._expire()
            now = time.monotonic()
            if received or now >= end:
                return cache, received
            pulling = any(t.arrays is not None for t in self._incoming.values())
            self._listener.wait(min(end - now, 0.001 if pulling else end - now))

    def close(self) -> None:
        """Drop every unfinished transfer (freeing its blocks) and close the socket."""
        for t in list(self._incoming.values()):
            self._drop(t, "failed", "the receiver closed", "closed")
        self._listener.close()
        for ring in self._rings.values():
            ring.close()
        self._rings.clear()

    # ---- messages ----------------------------------------------------------------------
    def _handle(self, cache: PagedKVCache, peer: bytes, msg: dict[str, Any] | None, error: TransferMessageError | None) -> None:
        if msg is None:
            self.counts["refused:message"] += 1
            self.events.append(("malformed", "", str(error)[:200]))
            self._reply(peer, "refused", "", reason="message", message=str(error)[:1000], needed=-1, free=-1)
            return
        kind, transfer = msg["type"], msg["transfer"]
        if kind == "offer":
            self._offer(cache, peer, msg)
        elif kind in ("pull", "abort", "stream"):
            t = self._incoming.get(transfer)
            if t is None or t.peer != peer:  # finished, expired or never offered: nothing is held for it
                if kind != "abort":
                    self._reply(peer, "failed", transfer, reason="unknown",
                                message=f"no admitted offer {transfer[:40]} (expired, aborted or never made)")
                return
            if kind == "abort":
                self._drop(t, None, msg["message"], "aborted")
            elif kind == "stream":
                self._start(t, msg)
            elif t.first >= 0:
                self._drop(t, "failed", "a pull after chunks: one path per transfer", "message")
            else:
                self._pull(cache, t, msg)
        else:
            self.counts["refused:message"] += 1
            self._reply(peer, "refused", transfer, reason="message", message=f"a receiver takes no {kind!r} message",
                        needed=-1, free=-1)

    def _offer(self, cache: PagedKVCache, peer: bytes, msg: dict[str, Any]) -> None:
        transfer = msg["transfer"]
        self.counts["offers"] += 1
        needed = free = -1
        try:
            if transfer in self._incoming:
                raise DuplicateSequenceError(f"transfer {transfer[:40]} is in progress already")
            check_compatible(msg["spec"], msg["leaves"], self.manager.spec, cache)
            if any(len(leaf.devices()) > 1 for leaf in jax.tree_util.tree_leaves(cache)):
                raise InvalidArgumentError("this cache is sharded over several devices; a transfer writes into a "
                                           "cache on one device (sharded caches are not supported yet)")
            record = SwapRecord(seq_id=msg["seq_id"], num_tokens=msg["num_tokens"],
                                first_blocks=tuple(msg["first_blocks"]),
                                blocks=tuple(np.zeros(n, np.int32) for n in msg["blocks"]))
            tokens = np.asarray(msg["tokens"], np.int64)
            cache_key = messages.salt_from_json(msg["cache_key"])
            ids = self.manager.swap_in(record)  # checks the record; all or nothing
        except PagedKVError as exc:
            reason = ("spec" if isinstance(exc, TransferSpecError) else "full" if isinstance(exc, OutOfBlocksError)
                      else "duplicate" if isinstance(exc, DuplicateSequenceError) else "invalid")
            if isinstance(exc, OutOfBlocksError):
                needed, free = exc.needed, exc.free
            self.counts[f"refused:{reason}"] += 1
            self.events.append(("refused", transfer, f"{reason}: {str(exc)[:200]}"))
            self._reply(peer, "refused", transfer, reason=reason, message=str(exc)[:2000], needed=needed, free=free)
            return
        now = time.monotonic()
        t = _Incoming(transfer, peer, int(msg["seq_id"]), tokens, cache_key, msg["info"], ids, tuple(msg["padded"]),
                      now + self.offer_timeout, time.perf_counter())
        why = self._map(cache, t, msg["shm"])
        self._incoming[transfer] = t
        self._reply(peer, "ready", transfer, seq_id=int(msg["seq_id"]), path="shm" if t.ring else "tcp", why=why)

    def _map(self, cache: PagedKVCache, t: _Incoming, offered: dict[str, Any] | None) -> str:
        """Map the ring an offer names for ``t`` (its chunks' plan from this side's own
        spec and the admitted block counts); returns why not ("" when mapped)."""
        if offered is None:
            return "the sender offered no ring"
        if not self.shared_memory:
            return "shared memory is off at the receiver"
        if not host_memory(cache):
            return "the receiver's cache is not in host memory"
        try:
            ring = self._rings.get(offered["name"])
            if ring is None or ring.nonce.hex() != offered["nonce"] or (ring.slots, ring.slot_bytes) != (
                    offered["slots"], offered["slot_bytes"]):
                ring = open_ring(offered["name"], offered["nonce"], offered["slots"], offered["slot_bytes"])
            t.plan = plan(cache, tuple(i.size for i in t.ids), ring.slot_bytes)
        except (RingRefused, ValueError, OSError) as exc:
            return f"the receiver cannot use the ring: {str(exc)[:300]}"
        self._rings[ring.name] = ring
        self._rings.move_to_end(ring.name)
        while len(self._rings) > MAX_RINGS:  # a ring still streaming stays mapped through its transfer
            self._rings.popitem(last=False)
        t.ring = ring
        return ""

    def _start(self, t: _Incoming, msg: dict[str, Any]) -> None:
        """A sender starts putting ``t``'s chunks in its ring: checked against this side's
        plan (count and bytes) and ring position, else the transfer is dropped."""
        p, ring = t.plan, t.ring
        if p is None or ring is None or t.arrays is not None or t.first >= 0:
            self._drop(t, "failed", "a stream for a transfer without a ring, or twice: one path per transfer",
                       "message")
        elif (msg["count"], msg["nbytes"], msg["first"]) != (len(p.chunks), p.nbytes, ring.position):
            self._drop(t, "failed", f"a stream of {msg['count']} chunks, {msg['nbytes']} bytes from chunk "
                       f"{msg['first']}; this side's plan is {len(p.chunks)} chunks, {p.nbytes} bytes from chunk "
                       f"{ring.position}", "message")
        else:
            t.first = ring.position
            t.progress = time.monotonic()
            t.deadline = t.progress + self.pull_timeout

    def _pull(self, cache: PagedKVCache, t: _Incoming, msg: dict[str, Any]) -> None:
        if t.arrays is not None:
            return  # a repeated pull: the first one is under way
        address = msg["address"]
        try:
            if self._server is None:
                self._server = transfer_server(self._device)
            conn = self._pullers.get(address)
            if conn is None:
                conn = self._pullers[address] = self._server.connect(address)
            t.arrays = conn.pull(msg["uuid"], pull_shapes(cache, t.padded))
        except Exception as exc:  # a bad address, a refused connection
            self._pullers.pop(address, None)
            self._drop(t, "failed", f"cannot pull from {address[:80]}: {str(exc)[:200]}", "connection")
            return
        t.source = address
        t.deadline = time.monotonic() + self.pull_timeout

    # ---- pulls ---------------------------------------------------------------------------
    def _finish(self, cache: PagedKVCache, received: list[Received]) -> PagedKVCache:
        for t in [t for t in self._incoming.values() if t.arrays is not None]:
            if not all(a.is_ready() for a in t.arrays):  # type: ignore[union-attr]  # pulling: arrays (filtered above)
                continue
            try:
                jax.block_until_ready(t.arrays)  # type: ignore[no-untyped-call]  # jax: unannotated
            except Exception as exc:  # the sender died or closed its server mid-transfer
                self._pullers.pop(t.source, None)
                self._drop(t, "failed", f"the pull failed: {str(exc)[:300]}", "connection")
                continue
            cache = self._write(cache, t, received)
        return cache

    def _write(self, cache: PagedKVCache, t: _Incoming, received: list[Received]) -> PagedKVCache:
        try:
            cache = write_back(cache, self.manager, t.ids, t.padded, nest(cache, t.arrays))  # type: ignore[arg-type]  # pulled: arrays
        except Exception:
            self._drop(t, "failed", "writing the pages failed", "internal")
            raise
        self._written(t, received, sum(int(a.nbytes) for a in t.arrays), "tcp")  # type: ignore[union-attr, misc]  # pulled: arrays
        return cache

    def _written(self, t: _Incoming, received: list[Received], nbytes: int, path: str) -> None:
        """``t``'s pages are in the pool: commit, key, answer ``done``."""
        manager = self.manager
        n = int(t.tokens.size)
        del self._incoming[t.transfer]
        t.arrays, t.ring = None, None
        manager.commit([t.seq_id], n)  # its bytes are in the pages: written
        keyed = manager.cache_tokens(t.seq_id, t.tokens, t.cache_key) if manager.prefix_cache is not None else 0
        self.counts["received"] += 1
        self.counts[f"received:{path}"] += 1
        self._reply(t.peer, "done", t.transfer, seq_id=t.seq_id, keyed=int(keyed))
        received.append(Received(t.seq_id, n, t.tokens, t.cache_key, t.info, int(keyed), nbytes,
                                 time.perf_counter() - t.started, path))

    # ---- rings -----------------------------------------------------------------------------
    def _stream(self, cache: PagedKVCache, received: list[Received], end: float) -> PagedKVCache:
        for t in [t for t in self._incoming.values() if t.first >= 0]:
            if self._incoming.get(t.transfer) is t:
                cache = self._copy_chunks(cache, t, received, end)
        return cache

    def _copy_chunks(self, cache: PagedKVCache, t: _Incoming, received: list[Received], end: float) -> PagedKVCache:
        """Copy ``t``'s chunks in its ring into the pool, in place: the cache taken over
        first (its blocks stamped the first time), then each chunk copied and its slot
        handed back (the ring's ``read``); until the poll's end, and while the next
        chunks follow within `STREAM_GAP` of the stream's start or the last one, wait
        for them (waiting on the ring's ``written``), answering
        messages every millisecond meanwhile (asleep on the ring's futex between). The
        last chunk completes it."""
        assert t.plan is not None and t.ring is not None
        ring, n = t.ring, len(t.plan.chunks)
        cache = take_over(cache, self.manager, t.ids, t.padded, stamp=not t.stamped)
        t.stamped = True
        # Raw pointers into the pool (no reference a donation sees): used in this call only.
        sink = Sink(cache, t.plan, t.ids, self.manager.steps.tag)
        try:
            checked = time.monotonic()
            while self._incoming.get(t.transfer) is t:
                # The sender's counter is untrusted: it only says when to copy, never where.
                ready = min(ring.written - t.first, n)
                while t.copied < ready:
                    sink.write(t.copied, ring.slot(t.first + t.copied))
                    t.copied += 1
                    ring.read = t.first + t.copied
                    if t.copied == n:
                        ring.position = t.first + n
                        self._written(t, received, t.plan.nbytes, "shm")
                        return cache
                    t.progress = time.monotonic()
                now = time.monotonic()
                stop = min(t.deadline, max(end, t.progress + STREAM_GAP))
                if now >= stop:
                    break
                if now - checked > 0.001:
                    checked = now
                    while self._listener.wait(0):
                        self._handle(cache, *self._listener.receive())
                # Asleep until the sender stores ``written`` (a millisecond at most: messages).
                ring.wait("written", t.first + t.copied + 1, min(0.001, stop - now))
        except Exception:
            if self._incoming.get(t.transfer) is t:
                self._drop(t, "failed", "writing the pages failed", "internal")
            raise
        return cache

    def _expire(self) -> None:
        now = time.monotonic()
        for t in [t for t in self._incoming.values() if now >= t.deadline]:
            if t.arrays is not None:  # the pages never came: fail what waits on that connection
                conn = self._pullers.pop(t.source, None)
                if conn is not None:
                    abandon(conn)
                self._drop(t, "failed", f"the pages did not arrive within {self.pull_timeout:g} s", "timeout")
            elif t.first >= 0:
                self._drop(t, "failed", f"the chunks did not all arrive within {self.pull_timeout:g} s", "timeout")
            else:
                self._drop(t, "failed", f"no pull within {self.offer_timeout:g} s of the offer", "timeout")

    def _drop(self, t: _Incoming, reply: str | None, message: str, reason: str) -> None:
        """Forget ``t`` and free its blocks; tell the sender (``reply``) unless it asked."""
        self._incoming.pop(t.transfer, None)
        if t.first >= 0 and t.ring is not None:  # its counters are mid-transfer: the sender drops it too
            self._rings.pop(t.ring.name, None)
        t.arrays, t.ring = None, None
        if t.seq_id in self.manager:
            self.manager.release(t.seq_id)
        self.counts["aborted" if reply is None else f"failed:{reason}"] += 1
        self.events.append(("aborted" if reply is None else "failed", t.transfer, message[:200]))
        if reply is not None:
            self._reply(t.peer, reply, t.transfer, reason=reason, message=message[:2000])

    def _reply(self, peer: bytes, kind: str, transfer: str, **fields: Any) -> None:
        self._listener.reply(peer, messages.make(kind, transfer, **fields))


__all__ = ["Received", "TransferReceiver"]
