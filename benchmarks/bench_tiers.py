"""Tiers below the device pool (`paged_kv.tiers`, issue 24): hit rates, movement speed,
warm restart. Prints a final JSON line.

1. Multi-turn hit rate (the bundled workload, `multiturn_workload`; all layers full,
   Gemma 3 12B's KV shape: 48 layers x 8 KV heads x 256, bfloat16, block 16). An
   unlimited pool's replay gives what every conversation needs (its peak bytes);
   the device pool is a quarter of that. Token hit rate without tiers, with a host
   tier 4x the pool (LRU and ARC), with host + disk (16x), and unlimited. The
   simulator counts keys and bytes, no pages move (`CacheTiers(keep_bytes=False)`).
2. Movement speed on this machine's JAX device: a batch of blocks down (device ->
   host, `flush` with the copy landed), up (host -> device), and up from disk (files
   read, verified, uploaded), each as bytes/s over numpy's memcpy of the same bytes
   (warm buffers; for host moves also cold ones, out of the CPU's caches).
3. Warm restart: conversations whose first turn was served by one process
   (write-through to disk), second turn served by a new process on the same disk
   tier, against a cold start: token hit rate of those second turns.
4. Priorities: shared system prompts under pressure, their hit rate with the default
   priority and with a high one (`Retention`).
5. The decode step while blocks move down in the background over the same step
   without (aim <= 1.1).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

import paged_kv as pk
from paged_kv.sim import multiturn_workload, simulate
from paged_kv.sim.models import MODELS

SHAPE = MODELS["gemma3-12b"]


def _spec(pool_bytes: int, max_len: int) -> pk.CacheSpec:
    probe = pk.CacheSpec(num_layers=SHAPE.num_layers, num_blocks=max_len // 16 + 2, block_size=16, max_blocks_per_seq=max_len // 16,
                         num_kv_heads=SHAPE.num_kv_heads, head_dim=SHAPE.head_dim, max_batch_slots=64)
    blocks = max(pool_bytes // probe.group_bytes_per_block(0), max_len // 16 + 2)
    return pk.CacheSpec(num_layers=SHAPE.num_layers, num_blocks=int(blocks), block_size=16,
                        max_blocks_per_seq=max_len // 16, num_kv_heads=SHAPE.num_kv_heads, head_dim=SHAPE.head_dim,
                        max_batch_slots=64)


def hit_rates(sessions: int, max_len: int) -> dict:
    work = multiturn_workload(sessions, turns=6, seed=0, max_total_tokens=max_len)
    unlimited = simulate(work, _spec(2**40, max_len), prefix_cache=True, max_batch=64)
    pool = unlimited.peak_used_bytes // 4
    spec = _spec(pool, max_len)
    runs = {"no_tiers": None, "host_4x_lru": dict(host_bytes=4 * pool),
            "host_4x_arc": dict(host_bytes=4 * pool, policy="arc"),
            "host_4x_disk_16x": dict(host_bytes=4 * pool, disk_bytes=16 * pool)}
    out = {"device_pool_gib": round(spec.pool_bytes / 2**30, 2), "unlimited": round(unlimited.token_hit_rate, 4)}
    for name, tiers in runs.items():
        r = simulate(work, spec, prefix_cache=True, max_batch=64, tiers=tiers)
        out[name] = round(r.token_hit_rate, 4)
        if r.tiers:
            out[name + "_tiers"] = {k: v for k, v in r.tiers.items() if k != "dropped"}
    out["with_tiers_over_unlimited"] = round(out["host_4x_disk_16x"] / max(out["unlimited"], 1e-9), 4)
    return out


def _memcpy_s(nbytes: int, reps: int = 5, cold: bool = False) -> float:
    """Median seconds of a numpy copy of ``nbytes`` between buffers already touched;
    ``cold``: with 64 MiB of other memory written before each copy, so neither buffer
    is in the CPU's caches (as a pool's blocks and a tier's slots mostly are not: a
    warm copy of a few MiB runs from the last-level cache, up to twice as fast)."""
    a = np.ones(nbytes, np.uint8)
    b = np.ones_like(a)
    other = np.ones(64 * 2**20 if cold else 1, np.uint8)
    times = []
    for _ in range(reps):
        np.add(other, 1, out=other)  # read and written through the caches (a large memset may bypass them)
        t = time.perf_counter()
        np.copyto(b, a)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _memcpy_once(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Seconds of one copy: wall clock, and this process's CPU time."""
    t, c = time.perf_counter(), time.process_time()
    np.copyto(b, a)
    return time.perf_counter() - t, time.process_time() - c


def movement(blocks: int, reps: int = 9) -> dict:
    """Steady state of one serving process: the host tier (2x the batch) already full, so
    each move reuses slots and staging rows whose pages were touched before. Each
    repetition evicts a fresh batch of ``blocks`` keyed blocks (down) and brings it
    back (up); figures are medians over ``reps`` after two warm-up rounds of each move's
    ratio to a warm numpy memcpy of the same bytes timed just before it, in this process
    (other processes on the machine slow both alike: a baseline timed once, before every
    move, made the ratios follow the load instead of the move); host moves also over a
    cold memcpy (`_memcpy_s`, timed once).
    Down is reported whole (dispatch + landing; to disk: until the segment is synced)
    and as its critical path (the flush before the step). On a CPU device both are one
    copy in place, landed in the flush (`movement._land_direct`); elsewhere the critical
    path is the gather dispatched, its landing at the next flush. Every figure copies
    the bytes on the calling thread alone except ``host_2_threads``': the same host
    moves with one worker thread copying beside it (`CacheTiers(copy_threads=2)`;
    ``copy_threads`` in the result names the threads per medium). Host moves are also
    timed in this process's CPU time over the memcpy's (``*_cpu_time``): on a loaded
    machine a wall-clock ratio follows the other processes, which preempt a 2 ms move
    more often than a 1.4 ms copy; CPU time leaves out only that (and any wait). A disk's flush stages
    the blocks (a copy) and hands the segment to its writer thread: the fsync is off the
    critical path. Up is the flush that writes the blocks in, and also with the
    admission before it (`admit_prompt`: for the disk, where blocks are read and
    verified)."""
    from paged_kv.tiers import CacheTiers, finish, flush

    spec = pk.CacheSpec(num_layers=4, num_blocks=blocks + 3, block_size=16, max_blocks_per_seq=blocks + 1,
                        num_kv_heads=8, head_dim=128, dtype="bfloat16", max_batch_slots=4)
    nbytes = blocks * spec.group_bytes_per_block(0)
    copy, cold = _memcpy_s(nbytes), _memcpy_s(nbytes, cold=True)
    out: dict = {"blocks": blocks, "mib": round(nbytes / 2**20, 2), "memcpy_gib_s": round(nbytes / copy / 2**30, 2),
                 "memcpy_cold_gib_s": round(nbytes / cold / 2**30, 2)}
    tmp = tempfile.mkdtemp()
    try:
        for medium, kw in (("host", dict(host_bytes=2 * nbytes)),
                           ("host_2_threads", dict(host_bytes=2 * nbytes, copy_threads=2)),
                           ("disk", dict(disk_bytes=4 * nbytes, disk_dir=tmp))):
            m = pk.KVCacheManager(spec, prefix_cache=True)
            cache = pk.PagedKVCache.init(spec)
            tiers = CacheTiers(m, **kw)
            times: dict[str, list[float]] = {"dispatch": [], "down": [], "up": [], "admitted": []}
            ratios: dict[str, list[float]] = {k: [] for k in times}
            cpu: dict[str, list[float]] = {"down": [], "up": []}  # ratios of process CPU times
            src, dst = np.ones(nbytes, np.uint8), np.ones(nbytes, np.uint8)
            for rep in range(reps + 2):
                first = np.arange(blocks * 16 + 1) + 10**6 * rep
                m.admit_prompt(0, first)
                m.step_metadata([0], first.size)
                m.commit([0])
                cache = cache.bind(m)  # stands for the step that wrote them (pages and generations agree)
                jax.block_until_ready(cache)  # a serving loop reads that step's output before it admits more
                m.cache_tokens(0, first)
                m.release(0)
                m.admit_prompt(1, np.arange(blocks * 16 + 1) + 10**6 * rep + 5 * 10**5)  # evicts all of them
                copy_down, cpu_copy_down = _memcpy_once(src, dst)
                c = time.process_time()
                t = time.perf_counter()
                cache = flush(cache, tiers)
                dispatched = time.perf_counter()
                finish(tiers)
                landed = time.perf_counter()
                cpu_down = time.process_time() - c
                m.release(1)
                copy_up, cpu_copy_up = _memcpy_once(src, dst)
                t2 = time.perf_counter()
                m.admit_prompt(2, first)  # every block comes back up (read from disk here, verified)
                c, t3 = time.process_time(), time.perf_counter()
                cache = flush(cache, tiers)
                cache.views[-1].generations.block_until_ready()
                up = time.perf_counter() - t3
                cpu_up = time.process_time() - c
                admitted = time.perf_counter() - t2
                m.release(2)
                if rep >= 2:
                    for name, took, base in (("dispatch", dispatched - t, copy_down), ("down", landed - t, copy_down),
                                             ("up", up, copy_up), ("admitted", admitted, copy_up)):
                        times[name].append(took)
                        ratios[name].append(base / took)
                    cpu["down"].append(cpu_copy_down / max(cpu_down, 1e-9))
                    cpu["up"].append(cpu_copy_up / max(cpu_up, 1e-9))
            med = {k: statistics.median(v) for k, v in times.items()}
            ratio = {k: statistics.median(v) for k, v in ratios.items()}
            out[f"down_to_{medium}_over_memcpy"] = round(ratio["down"], 3)
            out[f"down_to_{medium}_critical_path_over_memcpy"] = round(ratio["dispatch"], 3)
            out[f"up_from_{medium}_over_memcpy"] = round(ratio["up"], 3)
            out[f"up_from_{medium}_with_admission_over_memcpy"] = round(ratio["admitted"], 3)
            if medium.startswith("host"):
                out[f"{medium}_move_ms"] = {k: round(1e3 * med[k], 3) for k in ("down", "up")}
            if medium == "host":  # CPU time: what preemption by other processes does not move (one thread)
                out["down_to_host_over_memcpy_cpu_time"] = round(statistics.median(cpu["down"]), 3)
                out["up_from_host_over_memcpy_cpu_time"] = round(statistics.median(cpu["up"]), 3)
            if medium == "host":
                out["down_to_host_over_cold_memcpy"] = round(cold / med["down"], 3)
                out["up_from_host_over_cold_memcpy"] = round(cold / med["up"], 3)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out["copy_threads"] = {"host": 1, "host_2_threads": 2, "disk": 1}  # threads copying the bytes, per medium
    out["load_average"] = round(os.getloadavg()[0], 2)
    return out


def decode_with_moves(batch: int, context: int, moves: int, steps: int) -> dict:
    """A decode step (no model: each layer's paged write + attention over a batch, as
    bench_decode_step's (a), jitted, cache donated) while ``moves`` keyed blocks move
    down each step (queued as the device's evictions are, gathered by the flush before
    the step, landed in the host tier at the next flush), over the same step without:
    medians of alternating phases; the flush is counted in the step's time."""
    from paged_kv.tiers import CacheTiers, flush

    bs, layers, heads, dim = 16, 4, 8, 128
    per_seq = (context + 8 * steps) // bs + 2  # room for every phase's appends
    spec = pk.CacheSpec(num_layers=layers, num_blocks=batch * per_seq + moves + 2, block_size=bs,
                        max_blocks_per_seq=per_seq, num_kv_heads=heads, head_dim=dim, dtype="bfloat16",
                        max_batch_slots=batch + 1)
    m = pk.KVCacheManager(spec, prefix_cache=True)
    tiers = CacheTiers(m, host_bytes=4 * moves * spec.group_bytes_per_block(0))
    cache = pk.PagedKVCache.init(spec)
    cold = np.arange(moves * bs + 1) + 10**6
    m.admit_prompt(batch, cold)
    m.step_metadata([batch], cold.size)
    m.commit([batch])
    cache = cache.bind(m)  # stands for the step that wrote them
    m.cache_tokens(batch, cold)
    m.release(batch)
    pc = m.prefix_cache
    keyed = [(b, pc.hash_of[b], pc.parent_of[b]) for b in pc.evictable]
    seqs = list(range(batch))
    for s in seqs:
        m.admit(s, context - 1)
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(batch, 1, heads, dim)), jnp.float32)
    kv = jnp.asarray(rng.normal(size=(batch, 1, heads, dim)), jnp.bfloat16)

    @partial(jax.jit, donate_argnums=0)
    def step(cache: pk.PagedKVCache, meta: pk.StepMetadata) -> tuple[pk.PagedKVCache, jax.Array]:
        views, total = [], jnp.zeros((), jnp.float32)
        for i in range(layers):
            out, view = cache[i].attention(q, kv, kv, meta)
            views.append(view)
            total = total + out.sum()
        return pk.PagedKVCache(tuple(views)), total

    times: dict[bool, list[float]] = {False: [], True: []}
    phases = [False, True] * 3
    for phase, moving in enumerate([False, True] + phases):  # the first two phases warm up
        for _ in range(steps):
            m.append(seqs, 1)
            meta = m.step_metadata(seqs, 1)
            t = time.perf_counter()
            if moving:  # the step's evictions: copies down queued with their generations
                for b, key, parent in keyed:
                    tiers._copy_down(0, b, key, parent)
            cache = flush(cache, tiers)
            cache, total = step(cache, meta.to_device())
            total.block_until_ready()
            if phase >= 2:
                times[moving].append(time.perf_counter() - t)
            m.commit(seqs)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"batch": batch, "context": context, "blocks_moved_per_step": moves,
            "mib_moved_per_step": round(moves * spec.group_bytes_per_block(0) / 2**20, 2),
            "step_ms": round(1e3 * med[False], 2), "step_with_moves_ms": round(1e3 * med[True], 2),
            "with_over_without": round(med[True] / med[False], 3), "load_average": round(os.getloadavg()[0], 2)}


def priorities(requests: int, seed: int = 0) -> dict:
    """Shared system prompts under pressure: each request is one of 4 system prompts
    (256 tokens) and 512 tokens of its own, on a device pool of 64 blocks with a host
    tier of 32 (bookkeeping only: `CacheTiers(keep_bytes=False)`). Hit rate of the
    system prompts' tokens, with the default priority for every block and with
    ``Retention([(0, 256, 90)])`` on each request."""
    from paged_kv.tiers import CacheTiers, Retention

    spec = pk.CacheSpec(num_layers=2, num_blocks=64, block_size=16, max_blocks_per_seq=56, num_kv_heads=2,
                        head_dim=64, max_batch_slots=4)
    rng = np.random.default_rng(seed)
    systems = [rng.integers(0, 50_000, 256) for _ in range(4)]
    work = [(int(rng.integers(0, 4)), rng.integers(0, 50_000, 512)) for _ in range(requests)]
    out = {"requests": requests}
    for name, retention in (("default", None), ("high_priority", Retention([(0, 256, 90)]))):
        m = pk.KVCacheManager(spec, prefix_cache=True)
        CacheTiers(m, host_bytes=32 * spec.group_bytes_per_block(0), keep_bytes=False)
        hit = 0
        for seq, (which, own) in enumerate(work):
            tokens = np.concatenate([systems[which], own])
            cached = m.admit_prompt(seq, tokens, retention=retention)
            m.step_metadata([seq], tokens.size - cached)
            m.commit([seq])
            m.cache_tokens(seq, tokens)
            m.release(seq)
            hit += min(cached, 256)
        out[f"system_prompt_hit_rate_{name}"] = round(hit / (256 * len(work)), 4)
    return out


def warm_restart(conversations: int) -> dict:
    from paged_kv.tiers import CacheTiers, flush

    spec = pk.CacheSpec(num_layers=2, num_blocks=64, block_size=16, max_blocks_per_seq=32, num_kv_heads=2,
                        head_dim=64, max_batch_slots=4)
    rng = np.random.default_rng(0)
    turns = [rng.integers(0, 50_000, size=int(rng.integers(100, 400))) for _ in range(conversations)]

    def serve(tiers_dir: str, prompts, fresh: bool) -> float:
        m = pk.KVCacheManager(spec, prefix_cache=True)
        cache = pk.PagedKVCache.init(spec)
        tiers = CacheTiers(m, disk_bytes=2**30, disk_dir=tiers_dir, write="through")
        hit = total = 0
        for seq, tokens in enumerate(prompts):
            cached = m.admit_prompt(seq, tokens)
            cache = flush(cache, tiers)
            m.step_metadata([seq], tokens.size - cached)
            m.commit([seq])
            cache = cache.bind(m)  # stands for the step that wrote the prompt
            m.cache_tokens(seq, tokens)
            m.release(seq)
            cache = flush(cache, tiers, wait=True)
            hit, total = hit + cached, total + tokens.size
        return hit / total

    warm, cold = tempfile.mkdtemp(), tempfile.mkdtemp()
    try:
        serve(warm, turns, True)  # first turns; the process ends
        second = [np.concatenate([t, rng.integers(0, 50_000, size=64)]) for t in turns]
        return {"conversations": conversations, "warm_restart_hit_rate": round(serve(warm, second, False), 4),
                "cold_start_hit_rate": round(serve(cold, second, False), 4)}
    finally:
        shutil.rmtree(warm, ignore_errors=True)
        shutil.rmtree(cold, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer sessions and blocks")
    parser.add_argument("--sessions", type=int, default=None)
    args = parser.parse_args()
    sessions = args.sessions or (12 if args.quick else 48)
    result = {"multiturn": hit_rates(sessions, 8192 if args.quick else 16384),
              "movement": movement(64 if args.quick else 512),
              "restart": warm_restart(8 if args.quick else 32),
              "priorities": priorities(40 if args.quick else 200),
              "decode_with_moves": decode_with_moves(8, 256 if args.quick else 1024, 16, 10 if args.quick else 30)}
    for name, value in result.items():
        print(f"{name}: {value}")
    print(json.dumps({"bench": "tiers", **result}))


if __name__ == "__main__":
    main()
