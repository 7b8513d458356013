"""One cache over two JAX processes: `jax.distributed` on 127.0.0.1, gloo CPU collectives.

Each test module run starts its own pair of processes (tests/distributed_worker.py)
on a free loopback port, bounded in time and killed in a ``finally``; the pair's
global mesh shards the pages' KV heads over the processes, each process runs its own
`KVCacheManager` over the same inputs, and `paged_kv.multihost.check_same` compares
every step's metadata and tokens between them. The one-process run is the same code
(`distributed_worker.LlamaServer`) on this process's one device; the Llama fixture's
transformers logits are the independent reference.

Full suite (``slow``: ~6 s of two cold processes each): the Llama fixture on 2
processes x 1 device (one KV head each), and attention with int8 pages on 2 processes x
2 devices (8 KV heads over 4 devices). Quick tier: a sharded checkpoint set in one
process, and the metadata digest the processes compare.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import distributed_worker as worker
import paged_kv as pk
from paged_kv import multihost

HERE = Path(__file__).parent
TIMEOUT_S = 170  # the workers' own watchdog ends them at worker.BUDGET_S
TOL = 1e-4  # of the logits' std, as tests/test_hf_equality.py (float32 both sides)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Pair:
    """Two worker processes of one scenario, started now; `wait` collects their results."""

    def __init__(self, scenario: str, out: Path, local_devices: int):
        self.out, self.started = out, time.monotonic()
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        port = _free_port()
        self.logs = [out / f"log{pid}.txt" for pid in range(2)]
        self.procs = []
        try:
            for pid in range(2):
                with open(self.logs[pid], "wb") as log:
                    self.procs.append(subprocess.Popen(
                        [sys.executable, str(HERE / "distributed_worker.py"), scenario, str(pid), "2", str(port),
                         str(local_devices), str(out)], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=HERE.parent))
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()

    def wait(self) -> list[dict]:
        try:
            for p in self.procs:
                p.wait(timeout=max(1.0, self.started + TIMEOUT_S - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        finally:
            self.stop()
        self.wall_s = time.monotonic() - self.started
        tails = "\n".join(f"--- process {i} (rc {p.returncode}):\n" + self.logs[i].read_text(errors="replace")[-3000:]
                          for i, p in enumerate(self.procs))
        assert all(p.returncode == 0 for p in self.procs), tails
        return [json.loads((self.out / f"result{pid}.json").read_text()) for pid in range(2)]


def _reference():
    data = np.load(worker.FIXTURE / "reference.npz")
    return {i: (data[f"tokens_{i}"].tolist(), data[f"logits_{i}"]) for i in range(len(worker.prompts()))}


@pytest.fixture(scope="module")
def llama_runs(tmp_path_factory):
    """The pair's results, and the same history in this process on one device (run
    while the pair runs)."""
    out = tmp_path_factory.mktemp("llama")
    pair = Pair("llama", out, local_devices=1)
    try:
        single = worker.LlamaServer(device=jax.devices()[0])
        at_save = {}
        seqs, rows, facts = worker.llama_history(single, lambda s: at_save.update(s))
    finally:
        results = pair.wait()
    print(f"llama pair: {pair.wall_s:.1f} s wall; per process {[round(r['total_seconds'], 1) for r in results]} s")
    pair_rows = [dict(np.load(out / f"rows{pid}.npz")) for pid in range(2)]
    return {"out": out, "results": results, "pair_rows": pair_rows, "single": (seqs, rows, facts, at_save)}


@pytest.mark.slow
def test_heads_are_split_over_the_two_processes(llama_runs):
    for pid, r in enumerate(llama_runs["results"]):
        assert r["process"] == pid and r["devices"] == 2 and r["local_devices"] == 1
        assert r["global_heads"] == 2 and r["local_heads"] == [1] and not r["fully_addressable"]


@pytest.mark.slow
def test_decode_equals_one_process_and_transformers(llama_runs):
    """Prefill, a prefix-cache hit, greedy decode: both processes' logits are the same
    (replicated), their tokens equal the one-process run's and transformers', and every
    logit is within the HF test's tolerance of transformers' and of the one-process run's."""
    seqs, rows, facts, _ = llama_runs["single"]
    ref = _reference()
    scale = float(np.std(np.concatenate([ref[s][1] for s in ref])))
    a, b = llama_runs["pair_rows"]
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    worst_ref = worst_single = 0.0
    bit_equal = 0
    for key, got in a.items():
        s, pos = (int(x[1:]) for x in key.split("_"))
        worst_ref = max(worst_ref, float(np.abs(got - ref[s][1][pos]).max()))
        worst_single = max(worst_single, float(np.abs(got - rows[(s, pos)]).max()))
        bit_equal += np.array_equal(got, rows[(s, pos)])
    for r in llama_runs["results"]:
        assert r["cached_tokens"] == facts["cached_tokens"] == 8  # prompt 1 hit prompt 0's two blocks
        assert {int(s): t for s, t in r["tokens"].items()} == seqs
    for s, t in seqs.items():
        assert t == ref[s][0][: len(t)], f"sequence {s}: greedy tokens differ from transformers'"
    assert worst_ref <= TOL * scale and worst_single <= TOL * scale, (worst_ref, worst_single, scale)
    print(f"{len(a)} logit rows: max |two processes - transformers| {worst_ref:.1e}, - one process "
          f"{worst_single:.1e} ({bit_equal} rows bit-equal); logit std {scale:.2f}")


@pytest.mark.slow
def test_sharded_checkpoint_restores_on_the_two_processes(llama_runs):
    """Each process saved its own heads mid-run; restored onto the mesh, the manager is
    the saved one and the rest of the decode repeats bit for bit."""
    for pid, r in enumerate(llama_runs["results"]):
        assert r["sharded_file"] == f"llama.{pid}-of-2"
        assert r["restored_state_equal"] and r["restored_tokens_equal"]
        assert r["restored_rows_bit_equal"] and r["restored_rows"] == 3 * (worker.DECODE_STEPS - worker.SAVE_AFTER)


@pytest.mark.slow
def test_single_file_checkpoint_across_processes(llama_runs):
    """`save_checkpoint` cannot fetch pages held by another process: a `CheckpointError`
    naming the sharded save, nothing written; gathering the sharded set onto one device
    and saving that works, and `load_checkpoint` onto the two-process mesh restores it."""
    for pid, r in enumerate(llama_runs["results"]):
        assert r["plain_save"].startswith("CheckpointError"), r["plain_save"]
        assert "processes [0, 1]" in r["plain_save"] and "save_sharded_checkpoint" in r["plain_save"]
        assert not (llama_runs["out"] / f"plain{pid}.npz").exists()
        assert r["plain_restore_rows_bit_equal"] and r["plain_restore_sharded"]


@pytest.mark.slow
def test_divergent_managers_are_refused_on_every_process(llama_runs):
    """Process 1 admitted a sequence process 0 did not: `check_same` raises on both, and
    so does a save, before writing anything; a save whose write fails on process 1
    only fails on both (no process is left waiting in a collective)."""
    out = llama_runs["out"]
    for pid, r in enumerate(llama_runs["results"]):
        assert r["divergence"].startswith("the manager state differs between processes: processes [1]")
        diverged, one_failed = r["save_failures"]
        assert "processes [1] hold another allocator state" in diverged
        assert ("does not exist" if pid == 1 else "failed on processes [1]") in one_failed
    assert not list(out.glob("diverged*"))


@pytest.mark.slow
def test_sharded_set_loads_onto_one_device(llama_runs):
    """The two files, read in one process onto its one device: the manager at the save
    point, and decoding on from there gives transformers' tokens."""
    seqs, rows, _, at_save = llama_runs["single"]
    loaded = multihost.load_sharded_checkpoint(llama_runs["out"] / "llama")
    assert loaded.cache.views[0].key_pages.shape[2] == 2 and loaded.cache.views[0].key_pages.is_fully_addressable
    assert sorted(loaded.manager.seq_ids) == sorted(seqs)
    assert all(loaded.manager.kv_len(s) == len(t) - 1 for s, t in at_save.items())
    server = worker.LlamaServer(device=jax.devices()[0], cache=loaded.cache, manager=loaded.manager)
    again, replay_rows = {s: list(t) for s, t in at_save.items()}, {}
    worker.llama_decode(server, again, worker.DECODE_STEPS - worker.SAVE_AFTER, replay_rows)
    assert again == seqs
    ref = _reference()
    scale = float(np.std(np.concatenate([ref[s][1] for s in ref])))
    for (s, pos), got in replay_rows.items():
        assert np.abs(got - ref[s][1][pos]).max() <= TOL * scale


# ---- the module itself, in one process -------------------------------------------------
def test_sharded_checkpoint_in_one_process_round_trips_and_refuses_bad_sets(tmp_path):
    spec = pk.CacheSpec(num_layers=2, num_blocks=8, block_size=4, max_blocks_per_seq=4, max_batch_slots=2,
                        num_kv_heads=2, head_dim=4, dtype="float32")
    manager = pk.KVCacheManager(spec, prefix_cache=True)
    rng = np.random.default_rng(0)
    keys = rng.normal(size=(2, 9, 2, 4)).astype(np.float32)
    cache = pk.insert_prefill(pk.PagedKVCache.init(spec), manager, 7, keys, keys[::-1].copy())
    path = tmp_path / "one"
    assert multihost.save_sharded_checkpoint(path, cache, manager) == f"{path}.0-of-1"
    back = multihost.load_sharded_checkpoint(path, spec=spec)
    assert back.manager.kv_len(7) == 9 and multihost.digest(back.manager.state()) == multihost.digest(manager.state())
    for a, b in zip(jax.tree_util.tree_leaves(cache), jax.tree_util.tree_leaves(back.cache)):
        if a.ndim >= 3:
            assert np.array_equal(np.asarray(a), np.asarray(b))
    multihost.check_same(manager.state())  # one process: nothing to compare, no collective

    # A file of another save in the set, a missing file, bytes changed, another spec.
    other = tmp_path / "two"
    multihost.save_sharded_checkpoint(other, cache, manager)
    os.replace(f"{other}.0-of-1", tmp_path / "x.0-of-2")
    multihost.save_sharded_checkpoint(other, cache, manager)
    os.replace(f"{other}.0-of-1", tmp_path / "x.1-of-2")
    with pytest.raises(pk.CheckpointError, match="x.0-of-2 was written by one of 1 processes, in a set of 2"):
        multihost.load_sharded_checkpoint(tmp_path / "x")
    with pytest.raises(pk.CheckpointError, match="no files"):
        multihost.load_sharded_checkpoint(tmp_path / "absent")
    with np.load(f"{path}.0-of-1") as f:  # one page shard's bits changed, the header kept
        arrays = dict(f)
    arrays["piece0"] = arrays["piece0"].copy()
    arrays["piece0"].reshape(-1).view(np.uint8)[5] ^= 1
    with open(f"{path}.0-of-1", "wb") as f:
        np.savez(f, **arrays)
    with pytest.raises(pk.CheckpointError, match="digest mismatch in array 'piece0'"):
        multihost.load_sharded_checkpoint(path)
    multihost.save_sharded_checkpoint(path, cache, manager)
    wider = pk.CacheSpec(num_layers=2, num_blocks=8, block_size=4, max_blocks_per_seq=4, max_batch_slots=2,
                         num_kv_heads=4, head_dim=4, dtype="float32")
    with pytest.raises(pk.CheckpointError, match="different spec"):
        multihost.load_sharded_checkpoint(path, spec=wider)
    # A plain checkpoint is not a shard file, and a shard file is not a plain checkpoint.
    pk.save_checkpoint(tmp_path / "plain.0-of-1", cache, manager)
    with pytest.raises(pk.CheckpointError, match="not a file of a sharded checkpoint"):
        multihost.load_sharded_checkpoint(tmp_path / "plain")
    with pytest.raises(pk.CheckpointError):
        pk.load_checkpoint(f"{path}.0-of-1")


def test_digest_tells_metadata_apart():
    spec = pk.CacheSpec(num_layers=1, num_blocks=8, block_size=4, max_blocks_per_seq=4, num_kv_heads=2, head_dim=4,
                        dtype="float32")
    a, b = pk.KVCacheManager(spec), pk.KVCacheManager(spec)
    for m in (a, b):
        m.admit(0, 5)
    ma, mb = a.step_metadata([0], 5), b.step_metadata([0], 5)
    # Same calls, but two managers in one process have two serials (StepMetadata.owner):
    # processes agree only when each built its managers in the same order.
    assert multihost.digest(a.state()) == multihost.digest(b.state())
    assert multihost.digest(ma) != multihost.digest(mb)
    assert multihost.digest(ma) == multihost.digest(a.step_metadata([0], 5))


# ---- slow: 2 processes x 2 devices, int8 pages -----------------------------------------
@pytest.mark.slow
def test_attention_over_four_devices_of_two_processes(tmp_path):
    """8 KV heads over 4 devices (2 per process), int8 pages with their per-head scales,
    unified and split layouts, a sliding layer, fork + copy-on-write: every layer's
    attention output equals the one-process run's, and a sharded checkpoint saved
    mid-history restores to the same outputs bit for bit."""
    pair = Pair("attention", tmp_path, local_devices=2)
    try:
        singles, pages = {}, {}
        for fmt, layout in (("int8", "unified"), ("int8", "split")):
            server = worker.AttentionServer(worker.attention_spec(fmt), layout, device=jax.devices()[0])
            key = f"{fmt}_{layout}"

            def keep(server=server, key=key):  # the pages where the pair saves its checkpoint
                pages[key] = [np.asarray(x) for x in jax.tree_util.tree_leaves(server.cache) if x.ndim >= 3]

            singles[key] = worker.attention_history(server, keep)
    finally:
        results = pair.wait()
    print(f"attention pair: {pair.wall_s:.1f} s wall")
    got = [dict(np.load(tmp_path / f"attention{pid}.npz")) for pid in range(2)]
    for key, outs in singles.items():
        heads = 2 * worker.HEADS if key.endswith("unified") else worker.HEADS
        for r in results:
            info = r[key]
            assert info["steps"] == 6 and info["restored_outputs_bit_equal"] and info["restored_state_differs"] == []
            assert info["page_devices"] == [4] and info["pages_global"][0][2] == heads
            assert info["pages_local"][0][2] == heads // 4
        worst, covered = 0.0, {}
        for pid in range(2):
            for name, part in got[pid].items():
                k, step, layer, start = name.rsplit("_", 3)
                if k != key:
                    continue
                i, layer, start = int(step[1:]), int(layer[1:]), int(start[1:])
                whole = outs[i][layer][0][1]
                worst = max(worst, float(np.abs(part - whole[:, :, start:start + part.shape[2]]).max()))
                covered[(i, layer)] = covered.get((i, layer), 0) + part.shape[2]
        # Every step's and layer's output heads came back, from one process or the other.
        assert covered == {(i, layer): worker.HEADS for i in range(6) for layer in range(2)}, covered
        assert worst <= 1e-5, (key, worst)
        # The pair's two files (each with its process's two head shards), read here onto
        # one device: the one-process run's int8 pages and scales at that step, bit for bit.
        loaded = multihost.load_sharded_checkpoint(tmp_path / key, spec=worker.attention_spec("int8"))
        whole = [np.asarray(x) for x in jax.tree_util.tree_leaves(loaded.cache) if x.ndim >= 3]
        assert len(whole) == len(pages[key]) and all(np.array_equal(a, b) for a, b in zip(whole, pages[key]))
        print(f"{key}: max |4 devices of 2 processes - one device| {worst:.1e}")
