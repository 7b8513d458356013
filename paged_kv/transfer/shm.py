"""The shared-memory ring of a same-host transfer: a file in /dev/shm that a sender
creates and a receiver maps, cut into ``slots`` slots of ``slot_bytes`` bytes behind
one page of header.

Lifetime: the sender creates the file (mode 0600, a name with its pid), writes a
header with a fresh nonce and faults every page in; the receiver opens it by the name
an offer gives, checks it (the name's pattern, a regular file it owns, its size, the
header's magic, nonce and geometry against the offer's), maps it and unlinks the
name at once -- from then on the memory lives exactly as long as the two mappings,
and no crash leaves a file behind. The sender unlinks it too when the receiver
never maps it (closed, collected, exit). A sender killed between creating a ring
and the receiver's answer leaves its file; the next ring any sender creates removes
the files of pids that no longer exist (`sweep`).

Signals: two counters in the header, each on its own cache line, count chunks over
the ring's life: ``written`` (the sender stores it after copying a chunk into its
slot) and ``read`` (the receiver stores it after copying one out); chunk ``c`` goes
in slot ``c % slots``, and the sender reuses a slot only once ``read`` passed it.
Each side waits on the other's counter with a futex (`Ring.wait`: the kernel puts
the waiter to sleep until the counter moves, or a timeout) and each store of a
counter wakes it -- no message per chunk, whose cost (two sockets' I/O threads, JSON)
was larger than copying a chunk, and no spinning: on a loaded machine a waiter that
spins takes the core its peer needs to copy the chunk it waits for. This relies on
x86-64's store order (a chunk's bytes are visible before the counter stored after
them): elsewhere `available` is False and transfers go over TCP.

Trust: the receiver takes nothing from the file but bytes to copy into its own pages
of the sequence (the same trust as bytes over TCP); where they go is computed from
its own spec (`paged_kv.transfer.stream`). Not covered: a same-user sender that
shrinks the file after the receiver mapped it makes the receiver's next read fault
(SIGBUS) -- the same user can signal the process anyway.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import platform
import re
import secrets
import stat
import struct
import weakref

import numpy as np

from paged_kv.errors import InvalidArgumentError

SHM_DIR = "/dev/shm"
"""Where rings live (a tmpfs). Missing (not Linux): transfers go over TCP."""
PREFIX = "paged_kv-xfer-"
NAME = re.compile(r"paged_kv-xfer-([0-9]{1,10})-([0-9a-f]{16})\Z")
HEADER = 4096  # one page, so each slot starts page-aligned
_WRITTEN, _READ = 64, 128  # the counters' byte offsets: a cache line each
MAGIC = b"PKVRING1"
_LAYOUT = struct.Struct("<8s16sqqq")  # magic, nonce, pid, slots, slot_bytes
MAX_SLOTS = 64
MIN_SLOT_BYTES = 4096
MAX_RING_BYTES = 1 << 30
"""Bounds of a ring a receiver maps: an offer names the geometry, so it is bounded."""


_SYS_FUTEX, _FUTEX_WAIT, _FUTEX_WAKE = 202, 0, 1  # x86-64 (the only machine `available` allows)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


try:
    _syscall = ctypes.CDLL(None, use_errno=True).syscall
    _syscall.restype = ctypes.c_long
except (OSError, AttributeError):  # no libc syscall(): waits poll the counter instead
    _syscall = None


def _futex_wait(address: int, expected: int, timeout: float) -> None:
    """Sleep while the 32-bit word at ``address`` (a shared mapping) equals ``expected``,
    at most ``timeout`` seconds; returns early on a wake, a signal or a changed word.
    Any failure (EFAULT, no futex) is a short sleep: callers re-check and loop."""
    if _syscall is None:
        os.sched_yield()
        return
    ts = _Timespec(int(timeout), int((timeout % 1) * 1e9))
    _syscall(ctypes.c_long(_SYS_FUTEX), ctypes.c_void_p(address), ctypes.c_int(_FUTEX_WAIT),
             ctypes.c_uint32(expected & 0xFFFFFFFF), ctypes.byref(ts), None, ctypes.c_int(0))


def _futex_wake(address: int) -> None:
    if _syscall is not None:
        _syscall(ctypes.c_long(_SYS_FUTEX), ctypes.c_void_p(address), ctypes.c_int(_FUTEX_WAKE),
                 ctypes.c_int(2**31 - 1), None, None, ctypes.c_int(0))


def check_geometry(slots: object, slot_bytes: object) -> tuple[int, int]:
    """``(slots, slot_bytes)`` if they make a ring within the bounds, else `InvalidArgumentError`."""
    for name, v, low in (("shm_slots", slots, 2), ("shm_slot_bytes", slot_bytes, MIN_SLOT_BYTES)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise InvalidArgumentError(f"{name}={v!r} must be an int >= {low}")
    assert isinstance(slots, int) and isinstance(slot_bytes, int)
    if slots > MAX_SLOTS or slot_bytes % 4096 or slots * slot_bytes > MAX_RING_BYTES:
        raise InvalidArgumentError(f"shm_slots={slots}, shm_slot_bytes={slot_bytes}: at most {MAX_SLOTS} slots, "
                                   f"each a multiple of 4096 bytes, {MAX_RING_BYTES} bytes in all")
    return slots, slot_bytes


def available() -> bool:
    """Whether rings can be made here: a tmpfs directory we may write, on x86-64 (whose
    store order the counters rely on)."""
    return (platform.machine().lower() in ("x86_64", "amd64") and os.path.isdir(SHM_DIR)
            and os.access(SHM_DIR, os.W_OK | os.X_OK))


class Ring:
    """A mapped ring: ``slot(i)`` is slot ``i``'s memory. ``name`` names its file (which
    may be unlinked already); ``nonce`` proves a mapping is of this ring."""

    def __init__(self, name: str, nonce: bytes, slots: int, slot_bytes: int, mm: mmap.mmap, linked: bool) -> None:
        self.name, self.nonce, self.slots, self.slot_bytes = name, nonce, slots, slot_bytes
        self._mm: mmap.mmap | None = mm
        self._view = memoryview(mm)
        self._counters = np.frombuffer(mm, np.int64, count=_READ // 8 + 1)
        # A futex word is 32 bits: the low half of each little-endian int64 counter.
        self._address = self._counters.ctypes.data
        self.position = 0
        """Chunks through this ring so far, as this side counts them (the next one's number)."""
        # Unlinks a file still linked when this ring is collected or the process exits.
        self._unlink = weakref.finalize(self, _unlink, name) if linked else None

    @property
    def closed(self) -> bool:
        return self._mm is None

    def slot(self, i: int) -> memoryview:
        if self._mm is None:
            raise InvalidArgumentError(f"ring {self.name} is closed")
        start = HEADER + (i % self.slots) * self.slot_bytes
        return self._view[start: start + self.slot_bytes]

    @property
    def written(self) -> int:
        """Chunks the sender has put in the ring (cumulative)."""
        return int(self._counters[_WRITTEN // 8])

    @written.setter
    def written(self, value: int) -> None:
        self._counters[_WRITTEN // 8] = value
        _futex_wake(self._address + _WRITTEN)

    @property
    def read(self) -> int:
        """Chunks the receiver has copied out (cumulative)."""
        return int(self._counters[_READ // 8])

    @read.setter
    def read(self, value: int) -> None:
        self._counters[_READ // 8] = value
        _futex_wake(self._address + _READ)

    def wait(self, counter: str, below: int, timeout: float) -> int:
        """Wait up to ``timeout`` seconds while counter ``counter`` (``"written"`` or
        ``"read"``) is below ``below``, asleep in the kernel; returns its value (the
        caller checks it: a wait may end early)."""
        if self._mm is None:
            raise InvalidArgumentError(f"ring {self.name} is closed")
        offset = _WRITTEN if counter == "written" else _READ
        seen = int(self._counters[offset // 8])
        if seen < below and timeout > 0:
            _futex_wait(self._address + offset, seen, timeout)
            seen = int(self._counters[offset // 8])
        return seen

    def unlink(self) -> None:
        """Remove the file's name (the mappings stay); idempotent."""
        if self._unlink is not None:
            self._unlink()

    def close(self) -> None:
        """Unlink (if still linked) and unmap; idempotent. Views of slots must be gone."""
        self.unlink()
        if self._mm is not None:
            del self._counters
            with contextlib.suppress(BufferError):  # a view still alive: the map goes when it does
                self._view.release()
                self._mm.close()
            self._mm = None


def _unlink(name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(SHM_DIR, name))


def create(slots: int, slot_bytes: int) -> Ring:
    """A new ring (the sender's), every page faulted in; `OSError` if /dev/shm refuses."""
    slots, slot_bytes = check_geometry(slots, slot_bytes)
    sweep()
    nonce = secrets.token_bytes(16)
    name = f"{PREFIX}{os.getpid()}-{secrets.token_hex(8)}"
    size = HEADER + slots * slot_bytes
    fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.ftruncate(fd, size)
        mm = mmap.mmap(fd, size)
    except BaseException:
        os.close(fd)
        _unlink(name)
        raise
    os.close(fd)
    ring = Ring(name, nonce, slots, slot_bytes, mm, linked=True)
    # Fault every page in now (tmpfs allocates on first touch), not in a transfer's time.
    for i in range(slots):
        np.frombuffer(ring.slot(i), np.uint8)[:: mmap.PAGESIZE] = 0
    mm[: _LAYOUT.size] = _LAYOUT.pack(MAGIC, nonce, os.getpid(), slots, slot_bytes)
    return ring


class RingRefused(Exception):
    """The receiver cannot use the ring an offer names (why: the message); the transfer
    then goes over TCP. Not a `PagedKVError`: it never reaches a caller."""


def open_ring(name: object, nonce_hex: object, slots: object, slot_bytes: object) -> Ring:
    """The receiver's mapping of the ring an offer names, its name unlinked; `RingRefused`
    for any name, file or header that is not the ring the offer describes."""
    if not isinstance(name, str) or not NAME.match(name):
        raise RingRefused(f"name {str(name)[:80]!r} is not a paged_kv ring's")
    try:
        nonce = bytes.fromhex(nonce_hex) if isinstance(nonce_hex, str) else b""
        slots, slot_bytes = check_geometry(slots, slot_bytes)
    except (ValueError, InvalidArgumentError) as exc:
        raise RingRefused(str(exc)[:200]) from None
    if len(nonce) != 16:
        raise RingRefused("the nonce is not 16 bytes")
    size = HEADER + slots * slot_bytes
    try:
        fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR | os.O_NOFOLLOW)
    except OSError as exc:  # another host, another /dev/shm (a container), or gone
        raise RingRefused(f"cannot open it: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_size != size:
            raise RingRefused(f"not a regular file of this user of {size} bytes")
        mm = mmap.mmap(fd, size)
    finally:
        os.close(fd)
    magic, got, _pid, got_slots, got_bytes = _LAYOUT.unpack(mm[: _LAYOUT.size])
    if magic != MAGIC or got != nonce or (got_slots, got_bytes) != (slots, slot_bytes):
        mm.close()
        raise RingRefused("its header is not the offer's ring")
    _unlink(name)  # mapped: the memory now lives as long as the mappings
    ring = Ring(name, nonce, slots, slot_bytes, mm, linked=False)
    for i in range(slots):  # fault this side's page tables in now too
        np.frombuffer(ring.slot(i), np.uint8)[:: mmap.PAGESIZE].sum()
    return ring


def sweep() -> list[str]:
    """Remove ring files of this user whose creating process is gone (a sender killed
    before its receiver mapped the ring); returns their names."""
    gone = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(SHM_DIR):
            m = NAME.match(entry.name)
            if m is None or int(m.group(1)) == os.getpid():
                continue
            try:
                if entry.stat(follow_symlinks=False).st_uid != os.getuid():
                    continue
                os.kill(int(m.group(1)), 0)
            except ProcessLookupError:
                _unlink(entry.name)
                gone.append(entry.name)
            except OSError:  # another user's process, or the file went meanwhile
                continue
    return gone


def leftovers(pids: set[int] | None = None) -> list[str]:
    """Ring files present (of ``pids`` only, when given): what tests check is empty."""
    with contextlib.suppress(OSError):
        return sorted(e.name for e in os.scandir(SHM_DIR) if (m := NAME.match(e.name))
                      and (pids is None or int(m.group(1)) in pids))
    return []


__all__ = ["MAX_RING_BYTES", "MAX_SLOTS", "Ring", "RingRefused", "SHM_DIR", "available", "check_geometry", "create",
           "leftovers", "open_ring", "sweep"]
