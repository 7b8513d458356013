"""One process of a two-process JAX run (tests/test_distributed.py starts two).

    python tests/distributed_worker.py SCENARIO PROCESS_ID NUM_PROCESSES PORT LOCAL_DEVICES OUT_DIR

Joins the others with `jax.distributed` on 127.0.0.1 (process 0 runs the
coordinator on PORT; gloo CPU collectives, told to use the loopback address), puts
LOCAL_DEVICES CPU devices in the global mesh, runs SCENARIO and writes
``OUT_DIR/result{PROCESS_ID}.json`` (and ``.npz``). A watchdog ends the process if the
run outlasts its budget (a peer that died leaves collectives waiting).

Scenarios (each process runs its own `KVCacheManager`, the same calls from the same
inputs; `paged_kv.multihost.check_same` compares every step's metadata and tokens):

``llama``
    The Llama fixture (tests/fixtures/hf/llama: 2 KV heads) with its pages sharded
    over the processes' devices: prefill of two prompts, a third prompt that hits the
    first one's cached blocks, greedy decode steps; a sharded checkpoint saved
    mid-run, restored, and decoded on; the plain checkpoint path both ways.
``attention``
    Every layer's `view.attention` on random keys/values (8 KV heads over 4 devices),
    int8 pages with their scales, in the unified and split layouts, a sliding layer,
    fork with copy-on-write; a sharded checkpoint saved mid-history and restored.

The serving code (`LlamaServer`, `llama_history`, `AttentionServer`,
`attention_history`) is importable: the test runs the same code on one device in
one process and compares.
"""

from __future__ import annotations

import faulthandler
import functools
import json
import os
import sys
import time
from pathlib import Path

import jax
import numpy as np

HERE = Path(__file__).parent
FIXTURE = HERE / "fixtures" / "hf" / "llama"
BUDGET_S = 150  # the watchdog: well past a normal run, well inside the test's timeout

# ---- the Llama fixture -----------------------------------------------------------------
FIRST = (0, 2)  # prefilled together in the first step
LATE = 1  # prompt 1 shares 9 tokens (two full blocks) with prompt 0: a prefix-cache hit
DECODE_STEPS = 6
SAVE_AFTER = 3  # decode steps before the checkpoint


class LlamaServer:
    """The Llama fixture over a cache on ``mesh`` (pages' heads over axis "tp") or on ``device``."""

    def __init__(self, mesh=None, device=None, cache=None, manager=None, check=False):
        import paged_kv as pk
        from paged_kv.models import llama
        from paged_kv.models.loader import load_model
        from paged_kv.sharding import replicated

        self.cfg, params = load_model(FIXTURE)
        self.spec = llama.cache_spec(self.cfg, num_blocks=24, block_size=4, max_seq_len=32, max_batch_slots=4)
        self.place = replicated(mesh) if mesh is not None else device
        self.params = jax.device_put(params, self.place)
        self.manager = manager if manager is not None else pk.KVCacheManager(self.spec, prefix_cache=True)
        if cache is None:
            cache = (pk.PagedKVCache.init(self.spec, mesh=mesh, head_axis="tp") if mesh is not None
                     else pk.PagedKVCache.init(self.spec, device=device))
        self.cache = cache
        self.check = check
        self.step = _llama_step(self.cfg, self.place if mesh is not None else None)

    def run(self, ids, counts, tokens) -> np.ndarray:

        meta = self.manager.step_metadata(ids, counts)
        batch = np.zeros((meta.batch_size, meta.query_len), np.int32)
        for b, t in enumerate(tokens):
            batch[b, : len(t)] = t
        if self.check:
            from paged_kv.multihost import check_same

            check_same((meta, batch), "step's metadata and tokens")
        logits, self.cache = self.step(self.params, self.cache, jax.device_put(batch, self.place),
                                       meta.to_device(self.place))
        self.manager.commit(ids)
        return np.asarray(logits.addressable_data(0))  # replicated: every process holds all of it


@functools.lru_cache(maxsize=None)
def _llama_step(cfg, logits_place):
    from paged_kv.models import llama

    def step(params, cache, tokens, meta):
        logits, cache = llama.forward(cfg, params, cache, tokens, meta)
        if logits_place is not None:  # every process reads the logits: replicate them
            logits = jax.lax.with_sharding_constraint(logits, logits_place)
        return logits, cache

    return jax.jit(step, donate_argnums=1)


def prompts() -> list[list[int]]:
    return json.loads((FIXTURE / "reference.json").read_text())["prompts"]


def llama_decode(server: LlamaServer, seqs: dict, steps: int, rows: dict, on_step=None) -> None:
    """``steps`` greedy decode steps of every sequence in ``seqs`` ({id: tokens so far},
    extended in place); each step's logits go to ``rows[(id, position)]``."""

    ids = sorted(seqs)
    for i in range(steps):
        if on_step is not None:
            on_step(i, seqs)
        server.manager.append(ids, 1)
        logits = server.run(ids, 1, [[seqs[s][-1]] for s in ids])
        for b, s in enumerate(ids):
            rows[(s, len(seqs[s]) - 1)] = logits[b, 0]
            seqs[s].append(int(np.argmax(logits[b, 0])))


def llama_history(server: LlamaServer, on_save=None) -> tuple[dict, dict, dict]:
    """Prefill, a prefix hit, decode; ``on_save(seqs)`` after `SAVE_AFTER` decode steps.
    Returns (tokens per sequence, logits rows by (seq, position), facts)."""

    p = prompts()
    rows: dict = {}
    seqs = {s: list(p[s]) for s in FIRST}
    for s in FIRST:
        server.manager.admit_prompt(s, p[s])
    logits = server.run(list(FIRST), [len(p[s]) for s in FIRST], [p[s] for s in FIRST])
    for b, s in enumerate(FIRST):
        for pos in range(len(p[s])):
            rows[(s, pos)] = logits[b, pos]
        seqs[s].append(int(np.argmax(logits[b, len(p[s]) - 1])))
    cached = server.manager.admit_prompt(LATE, p[LATE])
    logits = server.run([LATE], [len(p[LATE]) - cached], [p[LATE][cached:]])
    for pos in range(cached, len(p[LATE])):
        rows[(LATE, pos)] = logits[0, pos - cached]
    seqs[LATE] = list(p[LATE]) + [int(np.argmax(logits[0, len(p[LATE]) - cached - 1]))]

    def at(i, current):
        if i == SAVE_AFTER and on_save is not None:
            on_save({s: list(t) for s, t in current.items()})

    llama_decode(server, seqs, DECODE_STEPS, rows, at)
    server.manager.check_integrity()
    return seqs, rows, {"cached_tokens": int(cached)}


def rows_to_arrays(rows: dict) -> dict:
    return {f"s{s}_p{pos}": v for (s, pos), v in rows.items()}


def llama_scenario(out: Path, pid: int) -> dict:
    from jax.sharding import Mesh

    import paged_kv as pk
    from paged_kv import multihost
    from paged_kv.sharding import page_sharding

    mesh = Mesh(np.array(jax.devices()), ("tp",))
    server = LlamaServer(mesh=mesh, check=True)
    leaf = server.cache.views[0].key_pages
    result = {"devices": len(jax.devices()), "local_devices": len(jax.local_devices()),
              "global_heads": int(leaf.shape[2]), "local_heads": sorted({int(s.data.shape[2]) for s in
                                                                         leaf.addressable_shards}),
              "fully_addressable": bool(leaf.is_fully_addressable)}
    ckpt = str(out / "llama")
    saved = {}

    def on_save(seqs):
        t0 = time.perf_counter()
        saved["file"] = os.path.basename(multihost.save_sharded_checkpoint(ckpt, server.cache, server.manager))
        saved["seconds"] = time.perf_counter() - t0
        saved["seqs"] = seqs
        saved["state"] = multihost.digest(server.manager.state()).hex()
        try:  # the single-file checkpoint cannot fetch pages this process does not hold
            pk.save_checkpoint(str(out / f"plain{pid}.npz"), server.cache, server.manager)
            saved["plain_save"] = "saved"
        except Exception as exc:  # noqa: BLE001 - recorded for the test to assert on
            saved["plain_save"] = f"{type(exc).__name__}: {exc}"

    t0 = time.perf_counter()
    seqs, rows, facts = llama_history(server, on_save)
    result.update(facts, seconds=time.perf_counter() - t0, tokens={str(s): t for s, t in seqs.items()},
                  sharded_file=saved["file"], save_seconds=saved["seconds"], plain_save=saved["plain_save"])

    # Restore the sharded checkpoint onto the same mesh and decode the rest again.
    restored = multihost.load_sharded_checkpoint(ckpt, mesh=mesh, head_axis="tp", spec=server.spec)
    result["restored_state_equal"] = multihost.digest(restored.manager.state()).hex() == saved["state"]
    again = LlamaServer(mesh=mesh, cache=restored.cache, manager=restored.manager, check=True)
    replay_rows: dict = {}
    replay = {s: list(t) for s, t in saved["seqs"].items()}
    llama_decode(again, replay, DECODE_STEPS - SAVE_AFTER, replay_rows)
    result["restored_tokens_equal"] = replay == seqs
    result["restored_rows_bit_equal"] = all(np.array_equal(v, rows[k]) for k, v in replay_rows.items())
    result["restored_rows"] = len(replay_rows)

    # The plain path both ways: gather the set onto this process's own device, process 0
    # writes a single-file checkpoint, and every process restores it onto the mesh.
    local = multihost.load_sharded_checkpoint(ckpt, device=jax.local_devices()[0])
    plain = str(out / "plain.npz")
    if pid == 0:
        pk.save_checkpoint(plain, local.cache, local.manager)
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("plain checkpoint written")
    whole = pk.load_checkpoint(plain, device=page_sharding(server.spec, mesh, "tp"))
    third = LlamaServer(mesh=mesh, cache=whole.cache, manager=whole.manager, check=True)
    third_rows: dict = {}
    replay = {s: list(t) for s, t in saved["seqs"].items()}
    llama_decode(third, replay, DECODE_STEPS - SAVE_AFTER, third_rows)
    result["plain_restore_rows_bit_equal"] = replay == seqs and all(
        np.array_equal(v, rows[k]) for k, v in third_rows.items())
    result["plain_restore_sharded"] = not third.cache.views[0].key_pages.is_fully_addressable

    # Divergence is caught on every process: process 1 admits a sequence process 0 does not.
    if pid == 1:
        again.manager.admit(99, 3)
    try:
        multihost.check_same(again.manager.state(), "manager state")
        result["divergence"] = "not detected"
    except multihost.ProcessesDisagreeError as exc:
        result["divergence"] = str(exc)
    # Failed saves fail on every process, with nothing left waiting: the diverged
    # managers are refused before any write; a write that fails on one process only
    # (process 1's directory is missing) is reported on both.
    result["save_failures"] = []
    for target, (cache, manager) in ((out / "diverged", (again.cache, again.manager)),
                                     (out / f"dir{pid}" / "ckpt", (server.cache, server.manager))):
        if pid == 0:
            target.parent.mkdir(exist_ok=True)
        try:
            multihost.save_sharded_checkpoint(target, cache, manager)
            result["save_failures"].append("saved")
        except pk.CheckpointError as exc:
            result["save_failures"].append(str(exc))
    np.savez(out / f"rows{pid}.npz", **rows_to_arrays(rows))
    return result


# ---- attention over 8 KV heads ---------------------------------------------------------
HEADS, DIM = 8, 16


def attention_spec(fmt: str):
    import paged_kv as pk

    return pk.CacheSpec(num_layers=2, num_blocks=32, block_size=4, max_blocks_per_seq=8, max_batch_slots=8,
                        num_kv_heads=HEADS, head_dim=DIM, dtype="float32", kv_format=fmt,
                        sliding_window=6, sliding_layers=(1,), sliding_num_blocks=24)


class AttentionServer:
    """Every layer's `view.attention`, on ``mesh`` (heads over "tp") or ``device``."""

    def __init__(self, spec, layout, mesh=None, device=None, cache=None, manager=None, check=False):
        import paged_kv as pk
        from jax.sharding import NamedSharding, PartitionSpec
        from paged_kv.sharding import replicated

        self.spec, self.mesh = spec, mesh
        self.manager = manager if manager is not None else pk.KVCacheManager(spec)
        if cache is None:
            cache = (pk.PagedKVCache.init(spec, layout=layout, mesh=mesh, head_axis="tp") if mesh is not None
                     else pk.PagedKVCache.init(spec, layout=layout, device=device))
        self.cache = cache
        self.meta_place = replicated(mesh) if mesh is not None else device
        # Queries, keys and values as a tensor-parallel model hands them over: split by head.
        self.kv_place = NamedSharding(mesh, PartitionSpec(None, None, None, "tp", None)) if mesh is not None else device
        self.check = check

    def run(self, ids, counts, q, k, v) -> list:

        meta = self.manager.step_metadata(ids, counts)
        b, t = meta.batch_size, meta.query_len
        if self.check:
            from paged_kv.multihost import check_same

            check_same((meta, q[:, :b, :t], k[:, :b, :t]), "step's metadata and inputs")
        put = lambda x: jax.device_put(x[:, :b, :t], self.kv_place)  # noqa: E731
        self.cache, outs = _attention_step(self.cache, put(q), put(k), put(v), meta.to_device(self.meta_place))
        self.manager.commit(ids)
        # Each process holds its own heads of the outputs: return (head offset, block) pairs.
        got = []
        for out in outs:
            pieces = sorted((s.index[2].start or 0, np.asarray(s.data)) for s in out.addressable_shards
                            if s.replica_id == 0) if self.mesh is not None else [(0, np.asarray(out))]
            got.append(pieces)
        return got


@functools.partial(jax.jit, donate_argnums=0)
def _attention_step(cache, q, k, v, meta):
    import paged_kv as pk

    outs, views = [], []
    for i, view in enumerate(cache.views):
        out, new = view.attention(q[i], k[i], v[i], meta)
        outs.append(out)
        views.append(new)
    return pk.PagedKVCache(tuple(views)), tuple(outs)


def attention_inputs(seed: int, steps: int):
    """Queries, keys and values N(0, 1), one set per step (the same on every process)."""

    rng = np.random.default_rng(seed)
    shape = (2, 8, 16, HEADS, DIM)
    return [tuple(rng.normal(size=shape).astype(np.float32) for _ in range(3)) for _ in range(steps)]


def attention_history(server: AttentionServer, on_save=None, start: int = 0, seed: int = 5) -> list:
    """Prefill at block edges, decode, fork + copy-on-write, decode; ``on_save()`` before
    step 3. From ``start`` (a restored server): only the steps from there. Returns each
    step's outputs (see `AttentionServer.run`)."""
    inputs = attention_inputs(seed, 6)
    plan = [
        ("admit", {0: 1, 1: 3, 2: 4, 3: 9}),
        ("append", {0: 1, 1: 1, 2: 1, 3: 1}),
        ("fork", {1: 1, 10: 1}),
        ("append", {0: 1, 1: 1, 2: 1, 3: 1, 10: 1}),
        ("append", {0: 1, 1: 1, 2: 1, 3: 1, 10: 1}),
        ("append", {0: 2, 1: 1, 2: 3, 3: 1, 10: 1}),
    ]
    outs = []
    for i, (kind, counts) in enumerate(plan):
        if i < start:
            continue
        if i == 3 and on_save is not None:
            on_save()
        m = server.manager
        if kind == "admit":
            for s, n in counts.items():
                m.admit(s, n)
        else:
            if kind == "fork":
                m.fork(1, 10)
            m.append(list(counts), list(counts.values()))
        outs.append(server.run(list(counts), list(counts.values()), *inputs[i]))
    server.manager.check_integrity()
    return outs


def attention_scenario(out: Path, pid: int) -> dict:
    from jax.sharding import Mesh

    from paged_kv import multihost

    mesh = Mesh(np.array(jax.devices()), ("tp",))
    result = {"devices": len(jax.devices()), "local_devices": len(jax.local_devices())}
    arrays = {}
    for fmt, layout in (("int8", "unified"), ("int8", "split")):
        key = f"{fmt}_{layout}"
        spec = attention_spec(fmt)
        server = AttentionServer(spec, layout, mesh=mesh, check=True)
        ckpt = str(out / key)
        saved = {}

        def on_save(server=server, ckpt=ckpt, saved=saved):
            multihost.save_sharded_checkpoint(ckpt, server.cache, server.manager)
            saved["state"] = {k: v.copy() for k, v in server.manager.state().items()}

        outs = attention_history(server, on_save)
        restored = multihost.load_sharded_checkpoint(ckpt, mesh=mesh, head_axis="tp", spec=spec)
        differs = sorted(k for k, v in restored.manager.state().items() if not np.array_equal(v, saved["state"].get(k)))
        again = AttentionServer(spec, layout, mesh=mesh, cache=restored.cache, manager=restored.manager, check=True)
        replay = attention_history(again, start=3)
        same = all(np.array_equal(a[1], b[1]) for x, y in zip(replay, outs[3:]) for la, lb in zip(x, y)
                   for a, b in zip(la, lb))
        leaves = jax.tree_util.tree_leaves(server.cache)
        result[key] = {
            "steps": len(outs), "restored_outputs_bit_equal": same,
            "restored_state_differs": differs,
            "pages_global": [list(x.shape) for x in leaves if x.ndim >= 3][:2],
            "pages_local": sorted({tuple(s.data.shape) for x in leaves if x.ndim >= 3 for s in x.addressable_shards}),
            "page_devices": sorted({len(x.sharding.device_set) for x in leaves if x.ndim >= 3}),
        }
        for i, step in enumerate(outs):
            for layer, pieces in enumerate(step):
                for start, data in pieces:
                    arrays[f"{key}_s{i}_l{layer}_h{start}"] = data
    np.savez(out / f"attention{pid}.npz", **arrays)
    return result


# ---- process setup ---------------------------------------------------------------------
def join(pid: int, count: int, port: int, local_devices: int) -> None:
    """Configure JAX for CPU devices and gloo collectives on loopback, and join the run."""
    os.environ["JAX_PLATFORMS"] = "cpu"

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", local_devices)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # gloo listens on the address the machine's hostname resolves to unless told one;
    # jax 0.10.2 has no setting for it, so bind its TCP transport to 127.0.0.1 here.
    try:
        from jax._src.lib import _jax

        make = _jax.make_gloo_tcp_collectives
        if "hostname" in (make.__doc__ or ""):
            _jax.make_gloo_tcp_collectives = functools.partial(make, hostname="127.0.0.1")
    except (ImportError, AttributeError):
        pass
    address = f"127.0.0.1:{port}"
    jax.distributed.initialize(address, num_processes=count, process_id=pid, coordinator_bind_address=address,
                               initialization_timeout=60, heartbeat_timeout_seconds=20, shutdown_timeout_seconds=20)


def main(argv: list[str]) -> None:
    scenario, pid, count, port, local_devices, out = argv
    pid, count, port, local_devices, out = int(pid), int(count), int(port), int(local_devices), Path(out)
    faulthandler.dump_traceback_later(BUDGET_S, exit=True)
    sys.path.insert(0, str(HERE.parent))
    t0 = time.perf_counter()
    join(pid, count, port, local_devices)
    joined = time.perf_counter() - t0
    result = {"llama": llama_scenario, "attention": attention_scenario}[scenario](out, pid)
    result.update(process=pid, join_seconds=joined, total_seconds=time.perf_counter() - t0)
    (out / f"result{pid}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
