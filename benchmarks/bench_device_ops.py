"""Benchmark of the paged-KV device ops on the JAX CPU backend.

What is measured, and why:

(a) In-place write (`paged_kv.ops.write_pages`): one decode step writes 256 new
    bfloat16 tokens (one per sequence, random distinct slots) into one page
    tensor ``[num_blocks, 16, 8, 128]`` stored as uint16. The page tensor is
    donated, so the scatter must update it in place: the time has to depend on
    the tokens written, not on the pool. The same write into a 1 GiB and a
    64 MiB page tensor (ONE key page tensor of that size, not key+value) must
    take about the same time (`write_ratio_1g_over_64m`, expected <= 1.3). For
    contrast, the naive form -- pages stored as bfloat16, ``.at[].set`` under
    jit, no donation -- copies the whole 1 GiB every step
    (`naive_bf16_write_ms`). A write whose 256 tokens all go to the dropped
    pad slot gives the fixed cost of a call (dispatch, sync, bit-cast of the
    tokens). A float32 point (uint32 storage) checks that the bit-cast
    storage works for other widths too. The configurations are timed interleaved, all pools alive.
    `write_us_1g_prebitcast` times the same scatter fed tokens that are
    already uint16 bits: the difference is the cost of the in-jit bf16 ->
    uint16 bit-cast of the new tokens, which XLA on CPU materializes.

(b) Gather into a transformer view (`gather_pages` / `gather_pages_into`): a
    decode batch of B=64 sequences x W=64 blocks of 16 tokens (1024 tokens),
    8 heads x 128 dim bfloat16 = a 128 MiB contiguous view, gathered through
    random block tables from a pool twice the view's size. A gather is a
    memory copy, so it is compared with the fastest copy numpy can do of the
    same bytes (`np.copyto` between preallocated arrays) and with numpy's own
    gather (`np.take(..., out=preallocated, mode="clip")`; the default
    mode="raise" buffers ``out`` and is ~3.5x slower). Ratios are memcpy_time /
    our_time: 1.0 means "as fast as memcpy", higher is better. A fresh XLA
    output of 128 MiB pays page faults on every call, which is why
    `gather_pages_into` (donated, reused workspace) exists; both are measured.
    The gathered view is checked bit-exact against numpy before timing.

(c) Host cost of `KVCacheManager.step_metadata` (and `append`) for 256 decoding
    sequences: the per-step Python/numpy overhead the scheduler pays.

All times are medians over repeated timed runs after warm-up (compilation
excluded), with `jax.block_until_ready` on every result; writes and gathers run in
three passes on fresh pools and each contender keeps its fastest pass (`PASSES`). The last line printed
is one JSON object with every figure and ratio of this run. Keys ending in
``_best`` use the fastest run of each contender instead of the median, and
``loadavg_1m_*`` record the machine's load: when other processes share the
cores, XLA's gather (split over 2 threads) slows more than the single-threaded
memcpy, and the median ratio drops (about 0.97 -> 0.76 with one core busy).
Under ``--quick`` the keys keep their names (``write_us_1g``...) but the sizes
are the small ones given by ``write_pool_*_mib`` and ``gather_*``.

Usage: python benchmarks/bench_device_ops.py [--quick]
``--quick`` uses tiny sizes and few repeats (a smoke test, seconds).
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from paged_kv.allocator.manager import KVCacheManager
from paged_kv.ops import gather_pages, gather_pages_into, write_pages
from paged_kv.spec import CacheSpec

BLOCK_SIZE = 16
HEADS = 8
DIM = 128
MiB = 2**20


PASSES = 3
"""Each write and gather measurement runs this many times on fresh pools; a contender's
figures come from its fastest pass. Why: on these shared cores a spell of a few seconds
moved XLA's 2-thread gather 1.3x (its ratio to memcpy read 1.58x in one run and 1.06x
in the next) and the decode write 1.3x."""


def no_numpy_hugepages() -> None:
    """Make numpy stop asking for transparent huge pages for its large arrays (it
    madvises them by default): XLA's CPU buffers here are 4 KiB pages, and whether the
    kernel can hand numpy huge pages depends on fragmentation, which moved the memcpy
    baseline by 10-15 % from run to run (8.0-9.2 ms with them, 9.4-10.6 ms without,
    128 MiB). The same page size on both sides compares the copies, not the pages."""
    try:
        from numpy._core.multiarray import _set_madvise_hugepage
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _set_madvise_hugepage
    _set_madvise_hugepage(False)


def fastest_pass(passes: list[dict]) -> dict:
    """Per key, the timing list (ns) of the pass with the lowest median."""
    return {k: min((p[k] for p in passes), key=statistics.median) for k in passes[0]}


def _median_us(times_ns: list[int]) -> float:
    return statistics.median(times_ns) / 1e3


def _spread(times_ns: list[int]) -> str:
    s = sorted(times_ns)
    return f"min {s[0] / 1e3:.1f} / p90 {s[int(0.9 * (len(s) - 1))] / 1e3:.1f} us"


def _filled_pages(num_blocks: int, dtype) -> jax.Array:
    """A page tensor whose memory is written (touched) by XLA, not lazily zero-mapped."""
    shape = (num_blocks, BLOCK_SIZE, HEADS, DIM)
    return jax.block_until_ready(jax.jit(lambda: jnp.full(shape, 1, dtype))())


# ---------------------------------------------------------------------------------
# (a) writes
# ---------------------------------------------------------------------------------
@functools.partial(jax.jit, donate_argnums=0)
def _scatter_storage(pages, rows, slot_mapping):
    """`scatter_tokens` minus its bf16 -> uint16 bit-cast: ``rows`` already hold the
    storage bits. Not a package API -- a lower bound showing what that bit-cast,
    materialized by XLA as a separate fused loop with its own buffer, costs."""
    nb, bs, h, d = pages.shape
    flat = pages.reshape(nb * bs, h, d)
    flat = flat.at[slot_mapping.reshape(-1)].set(rows.reshape(-1, h, d), mode="drop")
    return flat.reshape(pages.shape)


def bench_writes(configs: dict, n_tokens: int, repeats: int, rng, storage=jnp.uint16, compute=jnp.bfloat16) -> dict:
    """Times of one donated `write_pages` of ``n_tokens`` decode tokens, per config.

    ``configs`` maps a name to ``(num_blocks, drop_all)`` or ``(num_blocks, drop_all,
    "prebitcast")``; ``drop_all`` sends every token to the out-of-range pad slot
    (nothing written: the fixed cost of a call); "prebitcast" times `_scatter_storage`
    (the same scatter with the tokens handed over already as storage bits). All
    page tensors are alive at once and the configs are timed interleaved, so
    outside load hits each of them alike.
    """
    state = {}
    n_sets = 8
    for name, (num_blocks, drop_all, *how) in configs.items():
        pages = _filled_pages(num_blocks, storage)
        new = [jnp.asarray(rng.standard_normal((n_tokens, 1, HEADS, DIM)), dtype=compute) for _ in range(n_sets)]
        if how:
            new = [jax.lax.bitcast_convert_type(x, storage) for x in new]
        write = _scatter_storage if how else functools.partial(write_pages, compute_dtype=compute)
        if drop_all:
            slots_np = [np.full((n_tokens, 1), num_blocks * BLOCK_SIZE, np.int32)] * n_sets
        else:
            slots_np = [
                rng.choice(num_blocks * BLOCK_SIZE, n_tokens, replace=False).astype(np.int32).reshape(n_tokens, 1)
                for _ in range(n_sets)
            ]
        slots = [jnp.asarray(x) for x in slots_np]
        jax.block_until_ready((new, slots))
        for i in range(5):  # compile + warm-up
            pages = write(pages, new[i % n_sets], slots[i % n_sets])
        state[name] = [jax.block_until_ready(pages), new, slots, write]
    times = {name: [] for name in configs}
    names = list(state)
    for i in range(repeats):
        k = i % n_sets
        for j in range(len(names)):  # rotate the order each round: no config always runs first
            name = names[(i + j) % len(names)]
            st = state[name]
            pages, new, slots, write = st
            t0 = time.perf_counter_ns()
            pages = write(pages, new[k], slots[k])
            jax.block_until_ready(pages)
            times[name].append(time.perf_counter_ns() - t0)
            st[0] = pages  # always rebind: the old array was donated
    # Correctness spot check: the last real write landed, bit for bit.
    k = (repeats - 1) % n_sets
    for name, (pages, new, slots, _) in state.items():
        if configs[name][1]:
            continue
        last = np.asarray(slots[k]).reshape(-1)
        got = np.asarray(pages).reshape(-1, HEADS, DIM)[last]
        want = np.asarray(new[k]).reshape(-1, HEADS, DIM)
        want = want if want.dtype == np.dtype(storage) else want.view(np.dtype(storage))
        assert np.array_equal(got, want), f"write_pages wrote the wrong bits ({name})"
    state.clear()
    return times


def bench_naive_write(num_blocks: int, n_tokens: int, repeats: int, rng):
    """The same write with bf16-stored pages, `.at[].set` under jit, no donation."""

    @jax.jit
    def naive(pages, new, slots):
        flat = pages.reshape(-1, HEADS, DIM)
        return flat.at[slots.reshape(-1)].set(new.reshape(-1, HEADS, DIM), mode="drop").reshape(pages.shape)

    pages = _filled_pages(num_blocks, jnp.bfloat16)
    new = jnp.asarray(rng.standard_normal((n_tokens, 1, HEADS, DIM)), dtype=jnp.bfloat16)
    slots = jnp.asarray(rng.choice(num_blocks * BLOCK_SIZE, n_tokens, replace=False).astype(np.int32).reshape(n_tokens, 1))
    out = jax.block_until_ready(naive(pages, new, slots))  # compile
    del out
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        out = jax.block_until_ready(naive(pages, new, slots))
        times.append(time.perf_counter_ns() - t0)
        del out
    del pages
    return times


# ---------------------------------------------------------------------------------
# (b) gathers
# ---------------------------------------------------------------------------------
def bench_gather(B: int, W: int, pool_factor: int, repeats: int, rng) -> dict:
    bs, h, d = BLOCK_SIZE, HEADS, DIM
    view_blocks = B * W
    num_blocks = pool_factor * view_blocks + 1  # + the null block
    view_bytes = view_blocks * bs * h * d * 2
    pool_np = rng.integers(0, 2**16, size=(num_blocks, bs, h, d), dtype=np.uint16)
    pool_np[0] = 0  # null block
    pages = jax.block_until_ready(jnp.asarray(pool_np))
    del pool_np
    pool2d = np.asarray(pages).reshape(num_blocks, bs * h * d)  # zero-copy view of the device buffer

    # Random distinct blocks; each row's length ends inside its last block, so the
    # zero-past-kv_len mask is exercised while (almost) every byte moved is real data.
    tables_np = (rng.permutation(num_blocks - 1)[:view_blocks] + 1).astype(np.int32).reshape(B, W)
    kv_np = rng.integers((W - 1) * bs + 1, W * bs + 1, size=B).astype(np.int32)
    tables, kv_lens = jax.block_until_ready((jnp.asarray(tables_np), jnp.asarray(kv_np)))

    # Reference view (numpy) and bit-exact check of both entry points.
    ref = np.take(pool2d, tables_np.reshape(-1), axis=0).reshape(B, W * bs, h, d)
    ref[np.arange(W * bs)[None, :] >= kv_np[:, None]] = 0
    fresh = jax.block_until_ready(gather_pages(pages, tables, kv_lens, compute_dtype=jnp.bfloat16))
    assert fresh.dtype == jnp.bfloat16 and fresh.shape == (B, W * bs, h, d)
    assert np.array_equal(np.asarray(fresh).view(np.uint16), ref), "gather_pages is not bit-exact"
    ws = jax.block_until_ready(jnp.full((B, W * bs, h, d), 7, jnp.bfloat16))
    ws = jax.block_until_ready(gather_pages_into(ws, pages, tables, kv_lens))
    assert np.array_equal(np.asarray(ws).view(np.uint16), ref), "gather_pages_into is not bit-exact"
    del fresh, ref

    # numpy baselines on preallocated, already-touched buffers.
    src = np.ones(view_bytes // 2, np.uint16)
    dst = np.zeros_like(src)
    dst[:] = 1
    out2d = np.ones((view_blocks, bs * h * d), np.uint16)
    flat_table = tables_np.reshape(-1)

    def t_memcpy():
        t0 = time.perf_counter_ns()
        np.copyto(dst, src)
        return time.perf_counter_ns() - t0

    def t_take():
        t0 = time.perf_counter_ns()
        np.take(pool2d, flat_table, axis=0, out=out2d, mode="clip")
        return time.perf_counter_ns() - t0

    def t_fresh():
        t0 = time.perf_counter_ns()
        out = jax.block_until_ready(gather_pages(pages, tables, kv_lens, compute_dtype=jnp.bfloat16))
        dt = time.perf_counter_ns() - t0
        del out
        return dt

    def t_into():
        nonlocal ws
        t0 = time.perf_counter_ns()
        ws = gather_pages_into(ws, pages, tables, kv_lens)
        jax.block_until_ready(ws)
        return time.perf_counter_ns() - t0

    fns = {"memcpy": t_memcpy, "np_take": t_take, "fresh": t_fresh, "into": t_into}
    times = {k: [] for k in fns}
    for fn in fns.values():  # warm-up
        fn(), fn()
    # Interleave the contenders so a burst of outside load hits all of them alike.
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(fn())
    del ws, pages, pool2d, src, dst, out2d
    return {"times": times, "view_bytes": view_bytes, "pool_bytes": num_blocks * bs * h * d * 2}


# ---------------------------------------------------------------------------------
# (c) host metadata
# ---------------------------------------------------------------------------------
def bench_step_metadata(n_seqs: int, prompt: int, repeats: int) -> dict:
    W = 64
    spec = CacheSpec(
        num_layers=1, num_blocks=n_seqs * W + 1, block_size=BLOCK_SIZE, max_blocks_per_seq=W,
        max_batch_slots=max(256, n_seqs), num_kv_heads=HEADS, head_dim=DIM,
    )
    mgr = KVCacheManager(spec)
    ids = list(range(n_seqs))
    for s in ids:
        mgr.admit(s, prompt)
    for _ in range(3):
        mgr.step_metadata(ids, 1)
    t_meta, t_append = [], []
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        mgr.append(ids, 1)
        t1 = time.perf_counter_ns()
        md = mgr.step_metadata(ids, 1)
        t2 = time.perf_counter_ns()
        t_append.append(t1 - t0)
        t_meta.append(t2 - t1)
    assert md.positions.shape[0] >= n_seqs
    return {"append": t_append, "meta": t_meta}


# ---------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, few repeats (smoke test)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    q = args.quick
    t_start = time.perf_counter()
    no_numpy_hugepages()

    block_bytes = BLOCK_SIZE * HEADS * DIM * 2  # 32 KiB per bf16 block of one page tensor
    big_bytes, small_bytes = (16 * MiB, 1 * MiB) if q else (1024 * MiB, 64 * MiB)
    nb_big, nb_small = big_bytes // block_bytes, small_bytes // block_bytes
    n_tok = 256
    w_rep = 30 if q else 2000
    naive_rep = 2 if q else 5
    B, W = (4, 8) if q else (64, 64)
    g_rep = 5 if q else 40
    m_seqs, m_rep = (32, 10) if q else (256, 200)

    print(f"bench_device_ops: jax {jax.__version__} on {jax.devices()[0].platform} "
          f"({os.cpu_count()} cpus, {platform.machine()}){' [quick]' if q else ''}")
    res: dict = {"quick": q, "jax": jax.__version__, "cpus": os.cpu_count(), "numpy_hugepages": False,
                 "loadavg_1m_start": round(os.getloadavg()[0], 2)}

    # (a) writes -------------------------------------------------------------------
    print(f"(a) decode write of {n_tok} bf16 tokens [16x8x128 blocks, uint16 storage]; "
          f"pool = ONE page tensor (keys only) of the stated size")
    w = fastest_pass([bench_writes({"small": (nb_small, False), "big": (nb_big, False), "floor": (nb_big, True),
                                    "pre": (nb_big, False, "prebitcast")}, n_tok, w_rep, rng) for _ in range(PASSES)])
    gc.collect()
    w_small, w_big = w["small"], w["big"]
    us_small, us_big, us_floor = _median_us(w_small), _median_us(w_big), _median_us(w["floor"])
    us_pre = _median_us(w["pre"])
    print(f"    {small_bytes // MiB:>5} MiB pool ({nb_small} blocks): {us_small:9.1f} us median ({_spread(w_small)})")
    print(f"    {big_bytes // MiB:>5} MiB pool ({nb_big} blocks): {us_big:9.1f} us median ({_spread(w_big)})")
    print(f"    {big_bytes // MiB:>5} MiB pool, all {n_tok} tokens dropped (fixed cost): {us_floor:9.1f} us median")
    print(f"    {big_bytes // MiB:>5} MiB pool, tokens passed as uint16 bits (no in-jit bit-cast): {us_pre:9.1f} us median")
    ratio = us_big / us_small
    print(f"    write_ratio_1g_over_64m = {ratio:.2f}  ({'in place, O(tokens)' if ratio <= 1.3 else 'NOT in place?'})")
    nv = bench_naive_write(nb_big, n_tok, naive_rep, rng)
    gc.collect()
    naive_ms = statistics.median(nv) / 1e6
    print(f"    naive bf16 .at[].set, no donation, {big_bytes // MiB} MiB: {naive_ms:9.1f} ms median "
          f"of {naive_rep} = {naive_ms * 1e3 / us_big:.0f}x ours")
    f32 = bench_writes({"f32": (big_bytes // (block_bytes * 2), False)}, n_tok, w_rep, rng,
                       storage=jnp.uint32, compute=jnp.float32)["f32"]
    gc.collect()
    us_f32 = _median_us(f32)
    print(f"    float32 (uint32 storage), {big_bytes // MiB} MiB pool: {us_f32:9.1f} us median ({_spread(f32)})")
    res.update(
        write_pool_layout="one key page tensor [num_blocks,16,8,128] uint16 per pool size (not key+value)",
        write_tokens=n_tok,
        write_pool_big_mib=big_bytes // MiB,
        write_pool_small_mib=small_bytes // MiB,
        write_us_1g=round(us_big, 2),
        write_us_64m=round(us_small, 2),
        write_ratio_1g_over_64m=round(ratio, 3),
        write_us_1g_all_dropped=round(us_floor, 2),
        write_us_1g_prebitcast=round(us_pre, 2),
        naive_bf16_write_ms=round(naive_ms, 2),
        naive_over_ours_write=round(naive_ms * 1e3 / us_big, 1),
        write_us_f32_1g=round(us_f32, 2),
    )

    # (b) gathers ------------------------------------------------------------------
    gathers = [bench_gather(B, W, 2, g_rep, rng) for _ in range(PASSES)]
    g = {**gathers[0], "times": fastest_pass([x["times"] for x in gathers])}
    del gathers
    gc.collect()
    med = {k: statistics.median(v) / 1e6 for k, v in g["times"].items()}  # ms
    best = {k: min(v) / 1e6 for k, v in g["times"].items()}
    vb = g["view_bytes"]
    print(f"(b) gather B={B} x W={W} blocks ({W * BLOCK_SIZE} tokens), 8x128 bf16: view {vb / MiB:.0f} MiB "
          f"from a {g['pool_bytes'] / MiB:.0f} MiB pool, random tables; bit-exact vs numpy: ok")
    for k, label in (("memcpy", "np.copyto (memcpy)"), ("np_take", "np.take(out=)"),
                     ("fresh", "gather_pages (fresh out)"), ("into", "gather_pages_into (donated)")):
        gbps = vb / (med[k] / 1e3) / 1e9
        print(f"    {label:<28} {med[k]:8.2f} ms  {gbps:6.2f} GB/s  memcpy/this = {med['memcpy'] / med[k]:.2f}"
              f"   (best: {best[k]:6.2f} ms, ratio {best['memcpy'] / best[k]:.2f})")
    res.update(
        gather_B=B, gather_W=W, gather_view_mib=round(vb / MiB, 1), gather_pool_mib=round(g["pool_bytes"] / MiB, 1),
        memcpy_ms=round(med["memcpy"], 3),
        np_take_ms=round(med["np_take"], 3),
        gather_fresh_ms=round(med["fresh"], 3),
        gather_into_ms=round(med["into"], 3),
        gather_fresh_over_memcpy=round(med["memcpy"] / med["fresh"], 3),
        gather_into_over_memcpy=round(med["memcpy"] / med["into"], 3),
        np_take_over_memcpy=round(med["memcpy"] / med["np_take"], 3),
        gather_into_speedup_vs_fresh=round(med["fresh"] / med["into"], 2),
        # Best-case (min over runs) ratios: less sensitive to other processes on the
        # cores, which slow the single-threaded memcpy and XLA's 2-thread loop unequally.
        gather_into_over_memcpy_best=round(best["memcpy"] / best["into"], 3),
        gather_fresh_over_memcpy_best=round(best["memcpy"] / best["fresh"], 3),
        np_take_over_memcpy_best=round(best["memcpy"] / best["np_take"], 3),
    )

    # (c) host metadata ------------------------------------------------------------
    try:  # host API under active development: never lose the device figures to it
        m = bench_step_metadata(m_seqs, 700, m_rep)
    except Exception as exc:  # noqa: BLE001
        print(f"(c) host step_metadata: skipped ({type(exc).__name__}: {exc})")
        res.update(step_metadata_error=f"{type(exc).__name__}: {exc}"[:200])
    else:
        meta_us, app_us = _median_us(m["meta"]), _median_us(m["append"])
        print(f"(c) host, {m_seqs} decoding sequences: step_metadata {meta_us:.1f} us, append {app_us:.1f} us (median)")
        res.update(step_metadata_seqs=m_seqs, step_metadata_us=round(meta_us, 1), append_us=round(app_us, 1))

    res["wall_s"] = round(time.perf_counter() - t_start, 1)
    # This run's own load counts too (~1-2); well above that, other processes shared the
    # cores and the medians (gather_into above all: XLA splits it over 2 threads) suffer.
    res["loadavg_1m_end"] = round(os.getloadavg()[0], 2)
    print(f"total {res['wall_s']:.1f} s")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
