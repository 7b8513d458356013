"""The checkpoint file itself: atomic writes, digests, and reading a file back verified.

`paged_kv.checkpoint` decides what a checkpoint holds; this module only moves bytes
(an uncompressed ``.npz`` whose header names every array with its shape, dtype and
SHA-256) and turns every way a file can be unreadable into `CheckpointError`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
import uuid
import zipfile
import zlib
from typing import IO, Any

import numpy as np

from paged_kv.errors import CheckpointError
from paged_kv.spec.fields import host_memory_bytes

FORMAT_NAME = "paged_kv.checkpoint"
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
"""Version 2 added the prefix cache's written-block state (``written.*``); a version 1
file restores with none (nothing uncommitted: its keyed blocks were keyed at admission).
Version 3 keeps a prefix cache per layer group (``group{g}.prefix.*``, with the
``behind`` eviction tier) where versions 1 and 2 had one (``prefix.*``), for group 0."""

RESERVED = ("header", "digest")


def sha256(a: np.ndarray) -> str:
    """Hex SHA-256 of the array's bytes in C order (hashed in place: no copy of big pages)."""
    return hashlib.sha256(np.ascontiguousarray(a)).hexdigest()  # type: ignore[arg-type]  # an array is a buffer; numpy's stubs do not say


def json_default(value: object) -> int:
    if isinstance(value, np.integer):
        return int(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def write_npz(f: IO[bytes], arrays: dict[str, np.ndarray]) -> None:
    """Uncompressed: pages are float bits that barely compress, and mmap-like reads stay cheap."""
    np.savez(f, **arrays)  # type: ignore[arg-type]  # array names: numpy's stub reads ** as its allow_pickle


def atomic_write(path: str, arrays: dict[str, np.ndarray]) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise CheckpointError(f"cannot save {path!r}: directory {directory!r} does not exist; create it first")
    if os.path.isdir(path):
        raise CheckpointError(f"cannot save {path!r}: it is a directory; give a file name")
    # Same directory as the target so os.replace is a rename, never a cross-device copy.
    # os.open (not mkstemp) so the umask, not mode 0600, decides the final permissions.
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), "wb") as f:
            write_npz(f, arrays)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the rename makes it visible
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError):
            raise CheckpointError(
                f"could not write checkpoint {path!r}: {exc}; the file previously at {path!r} (if any) is unchanged"
            ) from exc
        raise
    try:  # make the rename itself durable; best effort (not possible on every OS)
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# RuntimeError: zipfile's answer to a flipped flag bit ("File is encrypted");
# NotImplementedError: an unknown compression method; zlib.error: a corrupt stream.
READ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError, RuntimeError, NotImplementedError,
                zlib.error)


def fspath(path: object, what: str) -> str:
    """``path`` as a string (bytes decoded as the OS does), or `CheckpointError` for
    anything that is not a path, or holds a NUL byte (which no OS call takes)."""
    try:
        text = os.fsdecode(os.fspath(path))  # type: ignore[call-overload]  # anything: a TypeError is refused below
    except TypeError:
        raise CheckpointError(f"cannot {what} checkpoint: path={path!r} is not a file path (str or os.PathLike)") from None
    if "\x00" in text:
        raise CheckpointError(f"cannot {what} checkpoint: path={path!r} holds a NUL byte, which no file name can")
    return text


def _open_regular(path: str) -> IO[bytes]:
    """``path`` opened for reading if it is a regular file. Opened without blocking and
    checked on the descriptor (not the name, which could change between): a named pipe
    would block the read forever, and a device (``/dev/zero``) never ends."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path!r} cannot be opened: {exc}") from exc
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "a named pipe" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) \
            else "a socket" if stat.S_ISSOCK(mode) else "not a regular file"
        raise CheckpointError(f"checkpoint {path!r} is {kind}; a checkpoint is a regular file")
    if hasattr(os, "O_NONBLOCK"):  # a regular file never blocks, but leave it as open() would
        os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read(path: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The verified header and every manifest array of ``path``."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist; check the path (no .npz is appended)")
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path!r} is a directory, not a checkpoint file")
    with _open_regular(path) as f:
        return _read_open(path, f)


def _read_open(path: str, f: IO[bytes]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    # Sniff the signature first: np.load would try anything else as a pickle and
    # answer with advice to allow pickles, which is the wrong fix for a bad file.
    try:
        magic = f.read(6)
        f.seek(0)
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path!r} cannot be read: {exc}") from exc
    if magic.startswith(b"\x93NUMPY"):
        raise CheckpointError(f"checkpoint {path!r} holds a single .npy array, not an .npz checkpoint")
    if not magic.startswith(b"PK"):
        what = "is empty" if not magic else f"starts with {magic!r}, not the zip signature b'PK\\x03\\x04'"
        raise CheckpointError(
            f"checkpoint {path!r} is not a readable .npz file: it {what}; it is corrupt or not a checkpoint: "
            "restore it from another copy"
        )
    try:
        npz = np.load(f, allow_pickle=False)
    except READ_ERRORS as exc:
        raise CheckpointError(
            f"checkpoint {path!r} is not a readable .npz file ({type(exc).__name__}: {exc}); it is truncated, "
            "corrupt, or not a checkpoint: restore it from another copy"
        ) from exc
    if not isinstance(npz, np.lib.npyio.NpzFile):  # unreachable after the sniff; kept as a guard
        raise CheckpointError(f"checkpoint {path!r} is not an .npz checkpoint")
    with npz:
        _check_member_sizes(path, npz.zip, os.fstat(f.fileno()).st_size)  # type: ignore[arg-type]  # open: its zip
        files = set(npz.files)
        missing = [n for n in RESERVED if n not in files]
        if missing:
            raise CheckpointError(
                f"checkpoint {path!r} lacks arrays {missing}: it is an .npz but not a paged_kv checkpoint"
            )

        def array(name: str) -> np.ndarray:
            try:
                return npz[name]
            except READ_ERRORS as exc:
                raise CheckpointError(
                    f"checkpoint {path!r}: array {name!r} cannot be read ({type(exc).__name__}: {exc}); "
                    "the file is corrupt: restore it from another copy"
                ) from exc

        header_arr, digest_arr = array("header"), array("digest")
        if header_arr.dtype != np.uint8 or header_arr.ndim != 1:
            raise CheckpointError(f"checkpoint {path!r}: header is {header_arr.shape} {header_arr.dtype.name}, not bytes")
        header_bytes = header_arr.tobytes()
        try:
            header = json.loads(header_bytes.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"checkpoint {path!r}: the header is not valid JSON ({exc}); the file is corrupt") from exc
        if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
            fmt = header.get("format") if isinstance(header, dict) else None
            raise CheckpointError(f"checkpoint {path!r}: format={fmt!r} is not {FORMAT_NAME!r}; not a paged_kv checkpoint")
        # The version is checked before the digest: a later version may hash differently.
        version = header.get("version")
        if version not in READABLE_VERSIONS:
            raise CheckpointError(
                f"checkpoint {path!r} has format version {version!r}; this paged_kv reads version {FORMAT_VERSION}. "
                "Load it with the paged_kv release that wrote it"
            )
        recorded = digest_arr.tobytes().decode("ascii", errors="replace") if digest_arr.dtype == np.uint8 else repr(digest_arr)
        actual = hashlib.sha256(header_bytes).hexdigest()
        if recorded != actual:
            raise CheckpointError(
                f"checkpoint {path!r}: header digest mismatch (sha256 {actual}, recorded {recorded}); the header was "
                "changed after saving: restore the file from another copy"
            )

        manifest = header.get("arrays")
        if not isinstance(manifest, list) or not all(isinstance(e, dict) and "name" in e for e in manifest):
            raise CheckpointError(f"checkpoint {path!r}: the header's array manifest is malformed")
        names = [e["name"] for e in manifest]
        absent = [n for n in names if n not in files]
        if absent:
            raise CheckpointError(
                f"checkpoint {path!r} lacks arrays {absent} that its manifest lists; the file was truncated or "
                "edited: restore it from another copy"
            )
        extra = sorted(files - set(names) - set(RESERVED))
        if extra:
            raise CheckpointError(f"checkpoint {path!r} holds arrays {extra} that its manifest does not list")
        arrays = {}
        for entry in manifest:
            name = entry["name"]
            a = array(name)
            if list(a.shape) != entry.get("shape") or a.dtype.str != entry.get("dtype"):
                raise CheckpointError(
                    f"checkpoint {path!r}: array {name!r} is {a.shape} {a.dtype.str} but the manifest records "
                    f"{entry.get('shape')} {entry.get('dtype')}; the file was edited: restore it from another copy"
                )
            digest = sha256(a)
            if digest != entry.get("sha256"):
                raise CheckpointError(
                    f"checkpoint {path!r}: digest mismatch in array {name!r} (sha256 {digest}, recorded "
                    f"{entry.get('sha256')}); its bytes changed after saving: restore the file from another copy"
                )
            arrays[name] = a
    return header, arrays


def _check_member_sizes(path: str, archive: zipfile.ZipFile, file_bytes: int) -> None:
    """Before any array is read: each member's .npy header must declare exactly the bytes
    the member holds, every member must fit in the file as stored (np.savez does not
    compress), and all of them in this machine's memory. np.load allocates what a
    header declares before reading a byte: a header edited to declare 32 TiB would be a
    MemoryError (or, overcommitted, the OOM killer) instead of this error."""
    total = 0
    for info in archive.infolist():
        where = f"checkpoint {path!r}: member {info.filename!r}"
        if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size \
                or info.header_offset + info.compress_size > file_bytes:
            raise CheckpointError(f"{where} claims {info.file_size:,} bytes stored as {info.compress_size:,} in a "
                                  f"file of {file_bytes:,}; paged_kv writes members uncompressed: the file is corrupt "
                                  "or not a checkpoint")
        try:
            with archive.open(info) as member:
                version = np.lib.format.read_magic(member)
                if version == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(member)
                elif version == (2, 0):
                    shape, _, dtype = np.lib.format.read_array_header_2_0(member)
                else:
                    raise ValueError(f".npy format version {version} (paged_kv writes 1.0)")
                header_bytes = member.tell()
        except READ_ERRORS as exc:
            raise CheckpointError(f"{where} cannot be read: no .npy header ({type(exc).__name__}: {exc}); the file is "
                                  "corrupt: restore it from another copy") from exc
        declared = math.prod(shape) * dtype.itemsize  # Python ints: no overflow whatever the header says
        if dtype.hasobject or declared != info.file_size - header_bytes:
            raise CheckpointError(f"{where} declares a {shape} {dtype} array ({declared:,} bytes) but holds "
                                  f"{info.file_size - header_bytes:,}; the file was edited or truncated: restore it "
                                  "from another copy")
        total += declared
    have = host_memory_bytes()
    if total > have:
        raise CheckpointError(f"checkpoint {path!r} holds {total / 2**30:,.1f} GiB of arrays, more than this "
                              f"machine's {have / 2**30:,.1f} GiB of memory; load it on a larger host")


__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "READABLE_VERSIONS", "READ_ERRORS", "RESERVED", "atomic_write", "fspath",
           "json_default", "read", "sha256"]
