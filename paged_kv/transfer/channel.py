"""The control channel: ZeroMQ sockets carrying `paged_kv.transfer.messages`.

A receiver binds one ROUTER socket on 127.0.0.1 (never another interface); each
sender connects a DEALER socket to it, so one receiver serves many senders and tells
their replies apart by the socket identity ZeroMQ adds. pyzmq is an optional
dependency (``pip install 'paged_kv[transfer]'``); importing this module without it
raises an ImportError that says so.
"""

from __future__ import annotations

import time
from typing import Any

from paged_kv.errors import InvalidArgumentError, TransferMessageError, TransferTimeoutError
from paged_kv.transfer import messages

try:
    import zmq
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("paged_kv.transfer needs pyzmq: pip install 'paged_kv[transfer]'") from exc

LOOPBACK = "127.0.0.1"


def _hard_limit(max_bytes: int) -> int:
    # ZeroMQ drops (and disconnects) a peer whose frame is over MAXMSGSIZE before it
    # is buffered; frames up to it are read and refused with a typed answer.
    return 4 * max_bytes + 1024


def _check_bound(max_bytes: object) -> int:
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or not 1024 <= max_bytes <= 1 << 30:
        raise InvalidArgumentError(f"max_message_bytes={max_bytes!r} must be an int in [1024, 2**30]")
    return max_bytes


class Listener:
    """A ROUTER socket bound to ``127.0.0.1:port`` (0: a free port)."""

    def __init__(self, port: int = 0, max_message_bytes: int = messages.MAX_MESSAGE_BYTES) -> None:
        self.max_bytes = _check_bound(max_message_bytes)
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port < 65536:
            raise InvalidArgumentError(f"port={port!r} must be an int in [0, 65536)")
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()  # one I/O thread per process, shared
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, _hard_limit(self.max_bytes))
        if port:
            self._sock.bind(f"tcp://{LOOPBACK}:{port}")
            self.port = port
        else:
            self.port = self._sock.bind_to_random_port(f"tcp://{LOOPBACK}")
        self.address = f"tcp://{LOOPBACK}:{self.port}"

    def wait(self, timeout: float) -> bool:
        """Whether a message is waiting, after waiting up to ``timeout`` seconds for one."""
        return bool(self._sock.poll(max(0, int(timeout * 1000)), zmq.POLLIN))

    def receive(self) -> tuple[bytes, dict[str, Any] | None, TransferMessageError | None]:
        """The next message (call after `wait` said one is there): ``(peer, message, None)``,
        or ``(peer, None, error)`` for one that is not valid."""
        frames = self._sock.recv_multipart(copy=True)
        peer = frames[0]
        if len(frames) != 2:
            return peer, None, TransferMessageError(f"a message of {len(frames) - 1} frames; expected one")
        try:
            return peer, messages.decode(frames[1], self.max_bytes), None
        except TransferMessageError as exc:
            return peer, None, exc

    def reply(self, peer: bytes, msg: dict[str, Any]) -> None:
        """Send ``msg`` to ``peer`` (dropped by ZeroMQ if that peer is gone)."""
        self._sock.send_multipart([peer, messages.encode(msg, self.max_bytes)])

    def close(self) -> None:
        """Close the socket (idempotent)."""
        self._sock.close(0)


class Connection:
    """A DEALER socket connected to a receiver's `Listener` address, with a mailbox: a reply
    to another transfer than the one awaited is kept for later."""

    def __init__(self, address: str, max_message_bytes: int = messages.MAX_MESSAGE_BYTES) -> None:
        if not isinstance(address, str) or not address.startswith("tcp://"):
            raise InvalidArgumentError(f"address={address!r:.80} must be a receiver's address, 'tcp://HOST:PORT'")
        self.address = address
        self.max_bytes = _check_bound(max_message_bytes)
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()  # one I/O thread per process, shared
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, _hard_limit(self.max_bytes))
        self._sock.connect(address)
        self._mail: dict[str, list[dict[str, Any]]] = {}

    def send(self, msg: dict[str, Any]) -> None:
        """Send ``msg`` (`TransferMessageError` if it is not valid or over the bound)."""
        self._sock.send(messages.encode(msg, self.max_bytes))

    def send_raw(self, data: bytes) -> None:
        """Send bytes as they are (tests of the receiver's checks)."""
        self._sock.send(data)

    def expect(self, transfer: str, types: tuple[str, ...], deadline: float) -> dict[str, Any]:
        """The next reply for ``transfer`` (one of ``types``), waiting until ``deadline``
        (`time.monotonic`). `TransferTimeoutError` past it; `TransferMessageError` for a
        reply that is not valid or not one of ``types``."""
        while True:
            box = self._mail.get(transfer)
            if box:
                msg = box.pop(0)
                if msg["type"] not in types:
                    raise TransferMessageError(f"transfer {transfer}: the receiver answered {msg['type']!r}; "
                                               f"expected one of {types}")
                return msg
            left = deadline - time.monotonic()
            if left <= 0 or not self._sock.poll(max(1, int(left * 1000)), zmq.POLLIN):
                if time.monotonic() >= deadline:
                    raise TransferTimeoutError(f"transfer {transfer}: no answer from {self.address} before the "
                                               "deadline (is the receiver running and polling?)")
                continue
            msg = messages.decode(self._sock.recv(), self.max_bytes)
            self._mail.setdefault(msg["transfer"], []).append(msg)

    def peek(self, transfer: str) -> dict[str, Any] | None:
        """A reply for ``transfer`` already here (kept for `expect`), or None; waits for nothing."""
        while not self._mail.get(transfer) and self._sock.poll(0, zmq.POLLIN):
            msg = messages.decode(self._sock.recv(), self.max_bytes)
            self._mail.setdefault(msg["transfer"], []).append(msg)
        box = self._mail.get(transfer)
        return box[0] if box else None

    def forget(self, transfer: str) -> None:
        """Drop replies kept for ``transfer``."""
        self._mail.pop(transfer, None)

    def close(self) -> None:
        """Close the socket (idempotent)."""
        self._sock.close(0)


__all__ = ["Connection", "Listener", "LOOPBACK"]
