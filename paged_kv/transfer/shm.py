"""The shared-memory ring of a same-host transfer: a sealed memfd that a sender
creates and a receiver maps, cut into ``slots`` slots of ``slot_bytes`` bytes behind
one page of header.

Lifetime: the sender creates an anonymous memory file (``memfd_create``: no name in
any directory, so no crash leaves a file behind), sizes it, seals it against
shrinking (``F_SEAL_SHRINK``, then ``F_SEAL_SEAL``), writes a header with a fresh
nonce and faults every page in; it keeps the descriptor open while the ring lives.
The offer names it as ``paged_kv-xfer-<pid>-<fd>-<random>``; the receiver opens
``/proc/<pid>/fd/<fd>`` (same user, same pid namespace: else the pages go over TCP),
checks it (a regular file of its own user, the offered size, sealed against
shrinking, the header's magic, nonce, pid and geometry), maps it and closes its
descriptor: the memory lives as long as the sender's descriptor and the mappings.

Why sealed: a mapped file that shrinks makes the next read of a page past its end
raise SIGBUS, which kills the process. With ``F_SEAL_SHRINK`` no one -- the sender,
or anyone else of the user holding a descriptor -- can shrink it (``ftruncate``
fails with EPERM), so the receiver's reads of the mapping cannot fault; a file
without the seal is refused (TCP). Earlier versions put the ring in /dev/shm, which
cannot be sealed; `sweep` still removes such files of dead processes.

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
its own spec (`paged_kv.transfer.stream`).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import mmap
import os
import platform
import re
import secrets
import stat
import struct
import weakref
from typing import Any

import numpy as np

from paged_kv.errors import InvalidArgumentError

PROC = "/proc"
"""Where a receiver finds the sender's descriptor. Missing (not Linux): transfers go over TCP."""
SHM_DIR = "/dev/shm"
"""Where rings of earlier versions lived (`sweep` removes those of dead processes)."""
PREFIX = "paged_kv-xfer-"
NAME = re.compile(r"paged_kv-xfer-([0-9]{1,10})-([0-9]{1,9})-([0-9a-f]{16})\Z")
"""A ring's name in an offer: the sender's pid, the descriptor number, a random tag."""
FILE = re.compile(r"paged_kv-xfer-([0-9]{1,10})-([0-9a-f]{16})\Z")
"""A ring file of an earlier version in /dev/shm."""
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL
HEADER = 4096  # one page, so each slot starts page-aligned
_WRITTEN, _READ = 64, 128  # the counters' byte offsets: a cache line each
_WANTED = 128  # from each counter, the offset of the value its waiter waits for (a line of its own)
_IDLE = 2**62  # no one waits
MAGIC = b"PKVRING1"
_LAYOUT = struct.Struct("<8s16sqqq")  # magic, nonce, pid, slots, slot_bytes
MAX_SLOTS = 64
MIN_SLOT_BYTES = 4096
MAX_RING_BYTES = 1 << 30
"""Bounds of a ring a receiver maps: an offer names the geometry, so it is bounded."""


_SYS_FUTEX, _FUTEX_WAIT, _FUTEX_WAKE = 202, 0, 1  # x86-64 (the only machine `available` allows)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_syscall: Any
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
    """Whether rings can be made here: memfd and /proc on x86-64 (whose store order the
    counters rely on)."""
    return (platform.machine().lower() in ("x86_64", "amd64") and hasattr(os, "memfd_create")
            and os.path.isdir(os.path.join(PROC, "self", "fd")))


class Ring:
    """A mapped ring: ``slot(i)`` is slot ``i``'s memory. ``name`` is what an offer calls
    it; ``nonce`` proves a mapping is of this ring; ``fd`` (the sender's) keeps the
    memory file open for receivers to open, closed with the ring."""

    def __init__(self, name: str, nonce: bytes, slots: int, slot_bytes: int, mm: mmap.mmap,
                 fd: int | None = None) -> None:
        self.name, self.nonce, self.slots, self.slot_bytes = name, nonce, slots, slot_bytes
        self._mm: mmap.mmap | None = mm
        self._view = memoryview(mm)
        self._counters = np.frombuffer(mm, np.int64, count=(_READ + _WANTED) // 8 + 1)
        # A futex word is 32 bits: the low half of each little-endian int64 counter.
        self._address = self._counters.ctypes.data
        self.position = 0
        """Chunks through this ring so far, as this side counts them (the next one's number)."""
        self.fd = fd
        # Closes the descriptor when this ring is collected or the process exits.
        self._release = weakref.finalize(self, os.close, fd) if fd is not None else None

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
        self._store(_WRITTEN, value)

    @property
    def read(self) -> int:
        """Chunks the receiver has copied out (cumulative)."""
        return int(self._counters[_READ // 8])

    @read.setter
    def read(self, value: int) -> None:
        self._store(_READ, value)

    def _store(self, offset: int, value: int) -> None:
        """Store a counter; wake its waiter only once it reached what the waiter waits for
        (a wake that finds a sleeper costs a context switch, ~0.1 ms under load: one per
        chunk was a sizeable part of a transfer). The wanted value is the other side's
        word: untrusted, it only decides whether to wake."""
        self._counters[offset // 8] = value
        if value >= self._counters[(offset + _WANTED) // 8]:
            _futex_wake(self._address + offset)

    def wait(self, counter: str, below: int, timeout: float) -> int:
        """Wait up to ``timeout`` seconds while counter ``counter`` (``"written"`` or
        ``"read"``) is below ``below``, asleep in the kernel; returns its value (the
        caller checks it: a wait may end early). The other side wakes this one once the
        counter reaches ``below``; a wake lost to the two stores' order (x86 may order
        its own store after its load of ``below``) costs one ``timeout`` at most."""
        if self._mm is None:
            raise InvalidArgumentError(f"ring {self.name} is closed")
        offset = _WRITTEN if counter == "written" else _READ
        seen = int(self._counters[offset // 8])
        if seen < below and timeout > 0:
            self._counters[(offset + _WANTED) // 8] = below
            seen = int(self._counters[offset // 8])
            if seen < below:
                _futex_wait(self._address + offset, seen, timeout)
                seen = int(self._counters[offset // 8])
            self._counters[(offset + _WANTED) // 8] = _IDLE
        return seen

    def close(self) -> None:
        """Close the descriptor (the sender's) and unmap; idempotent. Views of slots must be gone."""
        if self._release is not None:
            self._release()
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
    """A new ring (the sender's): a memfd sealed against shrinking, every page faulted
    in; `OSError` if the system refuses."""
    slots, slot_bytes = check_geometry(slots, slot_bytes)
    sweep()
    nonce = secrets.token_bytes(16)
    size = HEADER + slots * slot_bytes
    fd = os.memfd_create(PREFIX, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)  # never shorter: a mapped read cannot fault (SIGBUS)
        mm = mmap.mmap(fd, size)
    except BaseException:
        os.close(fd)
        raise
    ring = Ring(f"{PREFIX}{os.getpid()}-{fd}-{secrets.token_hex(8)}", nonce, slots, slot_bytes, mm, fd)
    # Fault every page in now (shared memory is allocated on first touch), not in a transfer's time.
    for i in range(slots):
        np.frombuffer(ring.slot(i), np.uint8)[:: mmap.PAGESIZE] = 0
    mm[: _LAYOUT.size] = _LAYOUT.pack(MAGIC, nonce, os.getpid(), slots, slot_bytes)
    ring._counters[[(_WRITTEN + _WANTED) // 8, (_READ + _WANTED) // 8]] = _IDLE
    return ring


class RingRefused(Exception):
    """The receiver cannot use the ring an offer names (why: the message); the transfer
    then goes over TCP. Not a `PagedKVError`: it never reaches a caller."""


def open_ring(name: object, nonce_hex: object, slots: object, slot_bytes: object) -> Ring:
    """The receiver's mapping of the ring an offer names; `RingRefused` for any name,
    file or header that is not the ring the offer describes, or a file not sealed
    against shrinking."""
    m = NAME.match(name) if isinstance(name, str) else None
    if m is None:
        raise RingRefused(f"name {str(name)[:80]!r} is not a paged_kv ring's")
    try:
        nonce = bytes.fromhex(nonce_hex) if isinstance(nonce_hex, str) else b""
        slots, slot_bytes = check_geometry(slots, slot_bytes)
    except (ValueError, InvalidArgumentError) as exc:
        raise RingRefused(str(exc)[:200]) from None
    if len(nonce) != 16:
        raise RingRefused("the nonce is not 16 bytes")
    size, pid = HEADER + slots * slot_bytes, int(m.group(1))
    path = os.path.join(PROC, str(pid), "fd", m.group(2))
    try:
        # Checked before it is opened: opening a device or a socket could do something.
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_size != size:
            raise RingRefused(f"not a regular file of this user of {size} bytes")
        fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:  # another pid namespace (a container), another user, or gone
        raise RingRefused(f"cannot open it: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_size != size:
            raise RingRefused(f"not a regular file of this user of {size} bytes")
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        except OSError:  # not a memfd
            seals = 0
        if seals & _SEALS != _SEALS:
            raise RingRefused("the file is not sealed against shrinking (a shrunk mapping faults)")
        mm = mmap.mmap(fd, size)
    finally:
        os.close(fd)
    magic, got, got_pid, got_slots, got_bytes = _LAYOUT.unpack(mm[: _LAYOUT.size])
    if magic != MAGIC or got != nonce or (got_pid, got_slots, got_bytes) != (pid, slots, slot_bytes):
        mm.close()
        raise RingRefused("its header is not the offer's ring")
    ring = Ring(m.group(0), nonce, slots, slot_bytes, mm)
    for i in range(slots):  # fault this side's page tables in now too
        np.frombuffer(ring.slot(i), np.uint8)[:: mmap.PAGESIZE].sum()
    return ring


def sweep() -> list[str]:
    """Remove ring files of earlier versions in /dev/shm of this user whose creating
    process is gone (a sender killed before its receiver mapped the ring); returns
    their names."""
    gone = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(SHM_DIR):
            m = FILE.match(entry.name)
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
    """Ring files of earlier versions in /dev/shm (of ``pids`` only, when given): what
    tests check is empty."""
    with contextlib.suppress(OSError):
        return sorted(e.name for e in os.scandir(SHM_DIR) if (m := FILE.match(e.name))
                      and (pids is None or int(m.group(1)) in pids))
    return []


__all__ = ["MAX_RING_BYTES", "MAX_SLOTS", "Ring", "RingRefused", "SHM_DIR", "available", "check_geometry", "create",
           "leftovers", "open_ring", "sweep"]
