"""The disk tier's files: segments of many keyed blocks, each written once, atomically.

Why segments: one file per block with its own fsync and SHA-256 cost ~80x a memcpy
to move 16 MiB down (format 1). A flush now writes the blocks it moves down into one
segment: one ``writev``, one fsync, one rename; each block carries a CRC32 (zlib's,
about as fast as a memcpy here) instead of a SHA-256.

Layout of a segment (format version 2; integers little-endian)::

    magic    8 bytes   MAGIC
    length   8 bytes   u64: bytes of the header
    digest  32 bytes   SHA-256 of the header
    header   JSON      {"format", "version", "manifest": the tier's tag (`disk.DiskDirectory`),
                        "leaves": {group: per layer, per leaf [shape, dtype name]},
                        "blocks": [[group, key, parent, priority, expiry, nbytes, crc32], ...],
                        "updates": [[group, key, priority, expiry], ...]}
    blocks   bytes     each block's bytes back to back, in the header's order: every
                       layer's leaves in turn, C order

Keys and parents are 32 hex digits; ``expiry`` is the absolute wall-clock time
(Unix seconds, `time.time`) at which the block's priority falls back to the default,
or null for none; ``updates`` are priorities that changed after a block was written
(a later segment's word wins). Integrity: the header (which says which key each
block's bytes are) under SHA-256 -- small, so the strong hash costs nothing and a
flipped bit can never file one tenant's bytes under another's key --; each block
under a CRC32 seeded with its group and key, so bytes read at another entry's offset
fail too. CRC32 catches accidents (torn writes, bit rot), not an adversary: a tier
directory must be writable only by the processes that serve from it.

A reader (another process, a restarted one) sees a segment whole or not at all: it
is written to a temporary name (a leading dot: `DiskDirectory.scan` skips those),
synced, then renamed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import uuid
import zlib
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

import attrs

import ml_dtypes  # noqa: F401  # registers bfloat16 and the float8 names with numpy (np.dtype("bfloat16"))
import numpy as np

from paged_kv.errors import TierError
from paged_kv.tiers.retention import MAX_PRIORITY, MIN_PRIORITY

TIER_FORMAT = "paged_kv.tier"
TIER_VERSION = 2
"""Version 1 wrote one checkpoint file per block (``g{G}-{KEY}.npz``); version 2 segments."""
MAGIC = b"PKVTIER\x02"
_PREFIX = struct.Struct("<8sQ32s")
_IOV_MAX = 512  # buffers per writev call (POSIX guarantees at least 16, Linux 1024)

Leaves = list[list[tuple[tuple[int, ...], np.dtype]]]
"""A group's page leaves: per layer, per leaf, ``(shape of one block, dtype)`` (dtype
names in the file: `header`, `parse`)."""

Entry = tuple[int, int, int, int, "float | None", int, int]
"""A block of a segment: ``(group, key, parent, priority, expiry, nbytes, crc32)``."""


def leaves_of(pages: Sequence[Sequence[np.ndarray]]) -> Leaves:
    return [[(a.shape, a.dtype) for a in layer] for layer in pages]


def block_bytes(leaves: Leaves) -> int:
    return sum(math.prod(shape) * dtype.itemsize for layer in leaves for shape, dtype in layer)


def crc(group: int, key: int, data: Any) -> int:
    """CRC32 of a block's bytes, seeded with its group and key (module doc)."""
    return zlib.crc32(data, zlib.crc32(f"{group}:{key:032x}".encode()))


def pack(pages: Sequence[Sequence[np.ndarray]], out: np.ndarray) -> None:
    """Copy one block's leaves into ``out`` (uint8, `block_bytes` long), in order."""
    at = 0
    for layer in pages:
        for a in layer:
            n = a.nbytes
            # As bytes: numpy copies a custom dtype's elements (bfloat16, float8) by its
            # own loop, about a third slower than a byte copy of a contiguous row.
            np.copyto(out[at: at + n], a.reshape(-1).view(np.uint8))
            at += n


def unpack(data: Any, leaves: Leaves) -> list[list[np.ndarray]]:
    """One block's bytes as its leaves (views of ``data``, no copy)."""
    buf = np.frombuffer(data, np.uint8)
    out, at = [], 0
    for layer in leaves:
        arrays = []
        for shape, dtype in layer:
            n = math.prod(shape) * dtype.itemsize
            arrays.append(buf[at: at + n].view(dtype).reshape(shape))
            at += n
        out.append(arrays)
    return out


def header(tag: str, leaves: dict[int, Leaves], blocks: Sequence[Entry],
           updates: Sequence[tuple[int, int, int, float | None]]) -> bytes:
    body = {"format": TIER_FORMAT, "version": TIER_VERSION, "manifest": tag,
            "leaves": {str(g): [[[list(s), d.name] for s, d in layer] for layer in ls] for g, ls in leaves.items()},
            "blocks": [[g, f"{k:032x}", f"{p:032x}", pr, ex, n, c] for g, k, p, pr, ex, n, c in blocks],
            "updates": [[g, f"{k:032x}", pr, ex] for g, k, pr, ex in updates]}
    text = json.dumps(body, separators=(",", ":")).encode()
    return _PREFIX.pack(MAGIC, len(text), hashlib.sha256(text).digest()) + text


def write(directory: str, name: str, head: bytes, blocks: Sequence[np.ndarray]) -> None:
    """Write a segment atomically: a temporary file, one ``writev`` per `_IOV_MAX`
    buffers, fsync, rename, fsync of the directory (best effort). OSError propagates
    (the caller drops the segment's keys); a failed write leaves no file."""
    path = os.path.join(directory, name)
    tmp = os.path.join(directory, f".{name}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        buffers: list[Any] = [head, *blocks]
        for i in range(0, len(buffers), _IOV_MAX):
            chunk = buffers[i: i + _IOV_MAX]
            want = sum(memoryview(b).nbytes for b in chunk)
            if os.writev(fd, chunk) != want:  # a short write (a full disk): the segment is not written
                raise OSError(f"short write to {tmp!r}")
        os.fsync(fd)  # the bytes are on disk before the rename makes them visible
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, path)
    try:
        dfd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)  # the rename itself durable; not possible on every OS
    except OSError:
        pass
    finally:
        os.close(dfd)


@attrs.define(eq=False)
class Segment:
    """One segment file (or one being written): its blocks' ``(group, key, parent)``,
    offsets and CRCs, which of them are still the tier's (``live``), and the keys whose
    latest priority update it holds."""

    name: str
    meta: list[tuple[int, int, int]]
    leaves: dict[int, Leaves]
    offsets: list[int]
    crcs: list[int] | None = None  # None while being written
    start: int = 0  # where the blocks begin in the file
    live: int = 0
    updates: set[tuple[int, int]] = attrs.field(factory=set)
    buffers: list[np.ndarray] | None = None  # the staged bytes until written
    future: Future[tuple[list[int], int]] | None = None
    size: int = 0
    nbytes: dict[int, int] = attrs.field(factory=dict)  # bytes of a block per group (`segments.block_bytes`)

    def __attrs_post_init__(self) -> None:
        self.nbytes = {g: block_bytes(ls) for g, ls in self.leaves.items()}

    @property
    def written(self) -> bool:
        return self.crcs is not None


def write_segment(directory: str, name: str, tag: str, leaves: dict[int, Leaves], blocks: list[tuple[Any, ...]],
           updates: list[tuple[Any, ...]], buffers: list[np.ndarray]) -> tuple[list[int], int]:
    """The background half of `disk.DiskDirectory.submit`: CRCs, header, the file
    (`write` looked up at call time: tests stand in for it)."""
    crcs = [crc(b[0], b[1], buf) for b, buf in zip(blocks, buffers)]
    entries = [(g, k, p, pr, ex, buf.size, c) for (g, k, p, pr, ex), buf, c in zip(blocks, buffers, crcs)]
    head = header(tag, leaves, entries, updates)
    write(directory, name, head, buffers)
    return crcs, len(head)


def unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:  # another process on the directory deleted it first
        pass


def _hex(value: object, path: str) -> int:
    if not isinstance(value, str) or len(value) != 32:
        raise TierError(f"disk tier segment {path!r}: {value!r} is not a 32-hex-digit key; the file is corrupt: delete it")
    try:
        return int(value, 16)
    except ValueError:
        raise TierError(f"disk tier segment {path!r}: {value!r} is not a hex key; the file is corrupt: delete it") from None


def _int(value: object, path: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise TierError(f"disk tier segment {path!r}: {value!r} is not an integer in [{low}, {high}]; the file is "
                        "corrupt: delete it")
    return value


def _expiry(value: object, path: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TierError(f"disk tier segment {path!r}: expiry {value!r} is not a time; the file is corrupt: delete it")
    return float(value)


def _leaves(value: object, path: str) -> Leaves:
    try:
        out = [[(tuple(_int(n, path, 0, 2**31) for n in shape), np.dtype(str(dtype))) for shape, dtype in layer]
               for layer in value]  # type: ignore[attr-defined]  # not iterable: TypeError, caught below
        for layer in out:
            for _, dtype in layer:
                if dtype.hasobject:
                    raise TypeError(f"{dtype} holds Python objects")
    except (TypeError, ValueError) as exc:
        raise TierError(f"disk tier segment {path!r}: its leaves {value!r} are not shapes and dtypes ({exc}); "
                        "the file is corrupt: delete it") from None
    return out


def parse(path: str, data: bytes, tag: str, num_groups: int
          ) -> tuple[dict[int, Leaves], list[Entry], list[tuple[int, int, int, float | None]], int]:
    """A whole segment file's header checked: ``(leaves, blocks, updates, data start)``;
    `TierError` naming the file and what is wrong (another format or version, another
    manifest, a header that fails its digest, sizes that do not add up)."""
    if len(data) < _PREFIX.size or data[:8] != MAGIC:
        what = data[:8] if len(data) >= 8 else f"{len(data)} bytes"
        raise TierError(f"disk tier segment {path!r} starts with {what!r}, not {MAGIC!r} (format {TIER_VERSION}): "
                        "another format or a torn file; delete it")
    _, length, digest = _PREFIX.unpack_from(data)
    text = data[_PREFIX.size: _PREFIX.size + length]
    if len(text) != length or hashlib.sha256(text).digest() != digest:
        raise TierError(f"disk tier segment {path!r}: its header fails its SHA-256; the file is corrupt: delete it")
    try:
        body = json.loads(text)
    except ValueError as exc:
        raise TierError(f"disk tier segment {path!r}: its header is not JSON ({exc}); delete it") from None
    if not isinstance(body, dict) or body.get("format") != TIER_FORMAT or body.get("version") != TIER_VERSION:
        found = (body.get("format"), body.get("version")) if isinstance(body, dict) else type(body).__name__
        raise TierError(f"disk tier segment {path!r} is {found}, not {TIER_FORMAT!r} version {TIER_VERSION}: written by "
                        "another paged_kv version; delete it")
    if body.get("manifest") != tag:
        raise TierError(f"disk tier segment {path!r} was written under another spec or layout than the directory's "
                        "manifest says; delete it")
    raw_leaves, raw_blocks, raw_updates = body.get("leaves"), body.get("blocks"), body.get("updates")
    if not isinstance(raw_leaves, dict) or not isinstance(raw_blocks, list) or not isinstance(raw_updates, list):
        raise TierError(f"disk tier segment {path!r}: its header lacks leaves, blocks or updates; delete it")
    leaves = {_int(int(g) if isinstance(g, str) and g.isdigit() else g, path, 0, num_groups - 1): _leaves(ls, path)
              for g, ls in raw_leaves.items()}
    blocks: list[Entry] = []
    for b in raw_blocks:
        if not isinstance(b, list) or len(b) != 7:
            raise TierError(f"disk tier segment {path!r}: block entry {b!r} is not 7 fields; delete it")
        g = _int(b[0], path, 0, num_groups - 1)
        if g not in leaves:
            raise TierError(f"disk tier segment {path!r}: a block of group {g} but no leaves for it; delete it")
        n = _int(b[5], path, 0, 2**62)
        if n != block_bytes(leaves[g]):
            raise TierError(f"disk tier segment {path!r}: a block of {n} bytes where group {g}'s leaves take "
                            f"{block_bytes(leaves[g])}; delete it")
        blocks.append((g, _hex(b[1], path), _hex(b[2], path), _int(b[3], path, MIN_PRIORITY, MAX_PRIORITY),
                       _expiry(b[4], path), n, _int(b[6], path, 0, 2**32 - 1)))
    updates = []
    for u in raw_updates:
        if not isinstance(u, list) or len(u) != 4:
            raise TierError(f"disk tier segment {path!r}: update entry {u!r} is not 4 fields; delete it")
        updates.append((_int(u[0], path, 0, num_groups - 1), _hex(u[1], path),
                        _int(u[2], path, MIN_PRIORITY, MAX_PRIORITY), _expiry(u[3], path)))
    start = _PREFIX.size + length
    if start + sum(b[5] for b in blocks) != len(data):
        raise TierError(f"disk tier segment {path!r} holds {len(data) - start} bytes of blocks; its header says "
                        f"{sum(b[5] for b in blocks)}: a torn or edited file; delete it")
    return leaves, blocks, updates, start


__all__ = ["Entry", "Leaves", "MAGIC", "Segment", "TIER_FORMAT", "TIER_VERSION", "block_bytes", "crc", "header", "leaves_of",
           "pack", "parse", "unlink", "unpack", "write", "write_segment"]
