"""Issue 23 item 8 at the checkpoint file: paths, member sizes and file kinds.

``save_checkpoint`` / ``load_checkpoint`` with a NUL byte in the path, a bytes path, a
member whose .npy header declares more than it holds (np.load would allocate 32 TiB
first), a named pipe (the read would block forever) or a device: each a typed
`CheckpointError` naming the file, or, for bytes, a working path.
"""

from __future__ import annotations

import io
import os
import threading
import zipfile

import numpy as np
import pytest

import paged_kv as pk
import paged_kv.spec.fields as spec_fields
from paged_kv import CheckpointError


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    spec = pk.CacheSpec(num_layers=1, num_blocks=9, block_size=4, max_blocks_per_seq=4, max_batch_slots=2,
                        num_kv_heads=1, head_dim=4, dtype="float32")
    manager = pk.KVCacheManager(spec)
    manager.admit(3, 6)
    cache = pk.PagedKVCache.init(spec)
    path = tmp_path_factory.mktemp("saved") / "ck.npz"
    pk.save_checkpoint(path, cache, manager)
    return path, cache, manager


def npy_bytes(shape, dtype: str, data: bytes) -> bytes:
    """An .npy member whose header says ``shape`` / ``dtype`` followed by ``data`` as given."""
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, {"descr": dtype, "fortran_order": False, "shape": tuple(shape)})
    return out.getvalue() + data


def rewrite_member(src, dst, name: str, member: bytes | None = None, compress: bool = False) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED if compress else
                                                       zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            zout.writestr(info.filename, member if info.filename == name + ".npy" and member is not None else data)


# ---- paths -------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [lambda p: str(p) + "\x00.npz", lambda p: os.fsencode(p) + b"\x00x"])
def test_a_path_with_a_nul_byte_is_a_checkpoint_error(saved, tmp_path, make):
    _, cache, manager = saved
    bad = make(tmp_path / "ck")
    with pytest.raises(CheckpointError, match="holds a NUL byte"):
        pk.save_checkpoint(bad, cache, manager)
    with pytest.raises(CheckpointError, match="holds a NUL byte"):
        pk.load_checkpoint(bad)
    assert os.listdir(tmp_path) == []


def test_a_bytes_path_saves_and_loads(saved, tmp_path):
    _, cache, manager = saved
    path = os.fsencode(tmp_path / "bytes.npz")
    pk.save_checkpoint(path, cache, manager)
    assert pk.load_checkpoint(path).manager.snapshot() == manager.snapshot()
    assert os.listdir(tmp_path) == ["bytes.npz"]


# ---- member sizes --------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(2**45,), (2**20, 2**25), (2**62, 2**62)])  # 32 TiB; 32 TiB; past int64
def test_a_member_declaring_more_than_it_holds_is_refused_before_it_is_read(saved, tmp_path, shape):
    src = saved[0]
    dst = tmp_path / "huge.npz"
    with zipfile.ZipFile(src) as z:
        names = [n[:-4] for n in z.namelist()]
    target = next(n for n in names if n not in ("header", "digest"))
    rewrite_member(src, dst, target, npy_bytes(shape, "|u1", b"\0" * 64))
    with pytest.raises(CheckpointError, match=rf"{str(dst)!r}: member '{target}\.npy' declares a "
                                              rf"\({shape[0]}.*holds 64; the file was edited"):
        pk.load_checkpoint(dst)


def test_a_member_with_no_npy_header_is_refused(saved, tmp_path):
    dst = tmp_path / "garbled.npz"
    rewrite_member(saved[0], dst, "digest", b"not an npy header at all")
    with pytest.raises(CheckpointError, match="member 'digest.npy' cannot be read: no .npy header"):
        pk.load_checkpoint(dst)


def test_a_compressed_member_is_refused(saved, tmp_path):
    """paged_kv writes members stored: a deflated one could expand to anything (a zip bomb)."""
    dst = tmp_path / "deflated.npz"
    rewrite_member(saved[0], dst, "header", compress=True)
    with pytest.raises(CheckpointError, match="paged_kv writes members uncompressed"):
        pk.load_checkpoint(dst)


def test_a_checkpoint_larger_than_host_memory_is_refused(saved, monkeypatch):
    import paged_kv.checkpoint_files as files

    monkeypatch.setattr(files, "host_memory_bytes", lambda: 16)
    with pytest.raises(CheckpointError, match=r"GiB of arrays, more than this machine's .* load it on a larger host"):
        pk.load_checkpoint(saved[0])
    monkeypatch.setattr(files, "host_memory_bytes", spec_fields.host_memory_bytes)
    pk.load_checkpoint(saved[0])


# ---- file kinds ----------------------------------------------------------------------------------
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_a_named_pipe_is_refused_not_read(tmp_path):
    fifo = tmp_path / "pipe.npz"
    os.mkfifo(fifo)
    result: list = []

    def load():
        try:
            pk.load_checkpoint(fifo)
        except CheckpointError as exc:
            result.append(exc)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(20)
    if thread.is_alive():  # the old behaviour: blocked in open(); give it a writer so the thread ends
        with open(fifo, "wb"):
            pass
        thread.join(5)
        pytest.fail("load_checkpoint blocked on a named pipe")
    assert result and "is a named pipe; a checkpoint is a regular file" in str(result[0])


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero here")
def test_a_device_is_refused():
    with pytest.raises(CheckpointError, match="is a device; a checkpoint is a regular file"):
        pk.load_checkpoint("/dev/zero")


@pytest.mark.parametrize("field, value", [("num_layers", 2**20), ("num_blocks", 2**24), ("max_batch_slots", 2**26)])
def test_a_header_whose_spec_sizes_exceed_host_memory_is_refused(saved, tmp_path, monkeypatch, field, value):
    """The header is digested, not authenticated: a rewritten one (digest recomputed) that
    sizes the spec past this machine (1 GiB here) is refused before any per-layer or
    per-block structure is built."""
    import hashlib
    import json

    monkeypatch.setattr(spec_fields, "host_memory_bytes", lambda: 2**30)

    dst = tmp_path / "big.npz"
    with zipfile.ZipFile(saved[0]) as z:
        header = json.loads(np.load(io.BytesIO(z.read("header.npy"))).tobytes())
    header["spec"][field] = value
    if field == "num_blocks":
        header["spec"]["block_size"] = 1  # stays under the int32 slot limit
    text = json.dumps(header, sort_keys=True).encode()
    members = {"header": np.frombuffer(text, np.uint8),
               "digest": np.frombuffer(hashlib.sha256(text).hexdigest().encode(), np.uint8)}
    tmp = tmp_path / "tmp.npz"
    rewrite_member(saved[0], tmp, "header", _npy(members["header"]))
    rewrite_member(tmp, dst, "digest", _npy(members["digest"]))
    with pytest.raises(CheckpointError, match=rf"not a valid CacheSpec: .*{field}={value}.* of host memory"):
        pk.load_checkpoint(dst)


def _npy(a: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, a)
    return out.getvalue()
