"""Host overhead of the block allocator (`KVCacheManager`): numpy bookkeeping only, no device work.

What is measured, and why:

1. One decode step of 256 running sequences. Each sequence starts at a prompt
   length drawn (seeded) from the bundled Azure conversation trace, so appending
   one token crosses a block boundary -- and needs a new block -- for about
   1/block_size of them. State is rebuilt every `EPISODE` steps (outside the timed
   region) with fresh draws; `EPISODE` is a multiple of every block size used, so
   over an episode each sequence crosses exactly EPISODE/block_size boundaries:
   crossings happen at their natural rate and the pool never runs out.
   Contenders, each on its own copy of the same starting state and timed
   interleaved step by step (so a burst of outside load hits all of them alike):

   a. batched:          ``manager.append(seq_ids, 1)``
   b. batched + meta:   ``append`` + ``step_metadata(seq_ids, 1)`` (what a scheduler
                        pays per step; the two parts are also reported apart)
   c. baseline A:       a naive per-sequence Python loop over the same `BlockPool`
                        and `PageTable` objects: if the length is a multiple of the
                        block size, ``pool.allocate(1)`` and write the id into the
                        table row; bump kv_len / num_blocks; compute the slot.
   c'. baseline A, lists: the same loop over plain Python lists (a free-list
                        stack and per-row block lists): a naive allocator that
                        pays no numpy per-element overhead. Extra figure, beyond
                        the two baselines above.
   d. baseline B:       the public API once per sequence: ``manager.append([s], 1)``.

   Outside the timed region every step's slots and the final block tables,
   lengths and free lists of all contenders are asserted identical, and the
   slot mapping of ``step_metadata`` is checked against ``append``'s slots: the
   contenders do exactly the same work.

2. Whole-trace replay, host only: ``simulate(load_trace(), spec)`` with the CLI's
   default spec (8192 blocks of 16 tokens, 1024 blocks per sequence, batch 256,
   the 8B-class MODEL shape, watermark 0.01); median wall time of 3 replays.
   ``--quick``: one replay of the first 3000 requests.

3. Block-size sweep (8..128): decode-step host cost (append + step_metadata, 256
   sequences) at equal memory (num_blocks x block_size constant) and equal
   max_seq_len (max_blocks_per_seq x block_size constant).

Times are medians (µs) of per-step ``perf_counter_ns`` deltas, gc disabled while
timing, after warm-up steps. The machine has few cores and is shared: the final
JSON line records the load average and cpu count.

Usage: python benchmarks/bench_allocator.py [--quick] [--seed N]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import time

import numpy as np

from paged_kv.allocator.block_pool import BlockPool
from paged_kv.allocator.manager import KVCacheManager
from paged_kv.allocator.page_table import PageTable
from paged_kv.sim.models import DEFAULT_MODEL, MODELS
from paged_kv.spec import CacheSpec

MODEL = MODELS[DEFAULT_MODEL].spec_fields()  # the shape `paged-kv simulate` assumes by default

N_SEQS = 256
EPISODE = 128  # steps between rebuilds; a multiple of every block size swept
MAX_SEQ_LEN = 16384  # the CLI default: 1024 blocks x 16 tokens
TOKEN_SLOTS = 2**20  # equal memory for (1) and (3): num_blocks x block_size
BLOCK_SIZES = (8, 16, 32, 64, 128)
BLOCK_SIZE = 16  # part (1)


def _median_us(times_ns: list[int]) -> float:
    return statistics.median(times_ns) / 1e3


def _spread(times_ns: list[int]) -> str:
    q = np.percentile(np.asarray(times_ns) / 1e3, [10, 90])
    return f"p10 {q[0]:.1f} / p90 {q[1]:.1f}"


def _context_lengths() -> np.ndarray:
    """Prompt lengths of the bundled trace (retries briefly: the sim package may be mid-edit)."""
    for attempt in range(4):
        try:
            from paged_kv.sim.trace import load_trace

            return load_trace().context_tokens
        except Exception:  # noqa: BLE001
            if attempt == 3:
                raise
            time.sleep(20)
    raise AssertionError("unreachable")


def decode_spec(block_size: int) -> CacheSpec:
    return CacheSpec(num_blocks=TOKEN_SLOTS // block_size, block_size=block_size,
                     max_blocks_per_seq=MAX_SEQ_LEN // block_size, max_batch_slots=N_SEQS, **MODEL)


def fresh_manager(spec: CacheSpec, seq_ids: list[int], lengths: np.ndarray) -> KVCacheManager:
    mgr = KVCacheManager(spec)
    for s, n in zip(seq_ids, lengths.tolist()):
        mgr.admit(s, n)
    return mgr


# ---------------------------------------------------------------------------------
# baselines
# ---------------------------------------------------------------------------------
def naive_append(pool: BlockPool, table: PageTable, rows_of: dict, seq_ids: list[int], bs: int) -> list[int]:
    """Baseline A: one token per sequence, one Python iteration per sequence, over
    the allocator's own BlockPool / PageTable (numpy arrays indexed per element)."""
    kv, nb, bt = table.kv_lens, table.num_blocks, table.block_tables
    slots = []
    for s in seq_ids:
        r = rows_of[s]
        n = int(kv[r])
        if n % bs == 0:  # the new token starts a new block
            bt[r, nb[r]] = pool.allocate(1)[0]
            nb[r] += 1
        kv[r] = n + 1
        slots.append(int(bt[r, n // bs]) * bs + n % bs)
    return slots


class ListAllocator:
    """Baseline A': the same naive loop over plain Python lists (no numpy per element)."""

    def __init__(self, mgr: KVCacheManager, seq_ids: list[int]):
        pool, table = mgr.pool, mgr.table
        self.free = pool._free[: pool.num_free].tolist()  # stack, popped from the end
        self.refs = pool.ref_counts.tolist()
        self.lens = {s: int(table.kv_lens[mgr.rows_by_id[s]]) for s in seq_ids}
        self.blocks = {s: table.blocks_of(mgr.rows_by_id[s]).tolist() for s in seq_ids}

    def append(self, seq_ids: list[int], bs: int) -> list[int]:
        lens, blocks, free, refs = self.lens, self.blocks, self.free, self.refs
        slots = []
        for s in seq_ids:
            n = lens[s]
            row = blocks[s]
            if n % bs == 0:
                b = free.pop()
                refs[b] = 1
                row.append(b)
            lens[s] = n + 1
            slots.append(row[n // bs] * bs + n % bs)
        return slots


# ---------------------------------------------------------------------------------
# 1. decode step, batched vs loops
# ---------------------------------------------------------------------------------
def bench_decode(contexts: np.ndarray, episodes: int, warmup: int, rng: np.random.Generator) -> dict:
    bs = BLOCK_SIZE
    spec = decode_spec(bs)
    ids = list(range(N_SEQS))
    names = ("batched", "batched_meta", "loop_pool_table", "loop_lists", "per_seq_api")
    t = {k: [] for k in names}
    t_app_part, t_meta_part = [], []
    crossings = []
    widths: set[int] = set()
    for ep in range(episodes):
        lengths = rng.choice(contexts, N_SEQS)
        assert int(lengths.max()) + EPISODE <= spec.max_seq_len
        m_a, m_b, m_c, m_d = (fresh_manager(spec, ids, lengths) for _ in range(4))
        rows_c = dict(m_c.rows_by_id)
        lists = ListAllocator(m_c, ids)
        gc.collect()
        gc.disable()
        try:
            for step in range(EPISODE):
                crossings.append(int(np.count_nonzero(m_a.table.kv_lens[m_a.table.in_use] % bs == 0)))
                t0 = time.perf_counter_ns()
                sa = m_a.append(ids, 1)
                t1 = time.perf_counter_ns()
                sb = m_b.append(ids, 1)
                t2 = time.perf_counter_ns()
                md = m_b.step_metadata(ids, 1)
                t3 = time.perf_counter_ns()
                sc = naive_append(m_c.pool, m_c.table, rows_c, ids, bs)
                t4 = time.perf_counter_ns()
                sl = lists.append(ids, bs)
                t5 = time.perf_counter_ns()
                sd = [m_d.append([s], 1) for s in ids]
                t6 = time.perf_counter_ns()
                if ep > 0 or step >= warmup:
                    t["batched"].append(t1 - t0)
                    t["batched_meta"].append(t3 - t1)
                    t_app_part.append(t2 - t1)
                    t_meta_part.append(t3 - t2)
                    t["loop_pool_table"].append(t4 - t3)
                    t["loop_lists"].append(t5 - t4)
                    t["per_seq_api"].append(t6 - t5)
                # ---- honesty checks (untimed): same slots from every contender ----
                assert np.array_equal(sa, sb)
                assert np.array_equal(md.slot_mapping[:N_SEQS, 0], sa[0]), "step_metadata slots != append slots"
                ref = sa[0].tolist()
                assert ref == sc, f"episode {ep} step {step}: loop slots differ"
                assert ref == sl, f"episode {ep} step {step}: list-loop slots differ"
                assert ref == np.concatenate([x[0] for x in sd]).tolist(), "per-seq API slots differ"
        finally:
            gc.enable()
        # ... and the same tables, lengths and free lists at the end of the episode.
        for m in (m_b, m_c, m_d):
            assert m.rows_by_id == m_a.rows_by_id
            assert np.array_equal(m.table.block_tables, m_a.table.block_tables)
            assert np.array_equal(m.table.kv_lens, m_a.table.kv_lens)
            assert np.array_equal(m.table.num_blocks, m_a.table.num_blocks)
            assert m.pool.num_free == m_a.pool.num_free
            assert np.array_equal(m.pool._free[: m.pool.num_free], m_a.pool._free[: m_a.pool.num_free])
            assert np.array_equal(m.pool.ref_counts, m_a.pool.ref_counts)
            m.check_integrity()
        for s in ids:
            assert lists.blocks[s] == m_a.block_table(s).tolist() and lists.lens[s] == m_a.kv_len(s)
        assert lists.free == m_a.pool._free[: m_a.pool.num_free].tolist()
        widths.add(md.table_width)
        del m_a, m_b, m_c, m_d, lists, md
    return {"times": t, "append_part": t_app_part, "meta_part": t_meta_part,
            "crossings_per_step_mean": float(np.mean(crossings)), "table_widths": sorted(widths)}


# ---------------------------------------------------------------------------------
# 2. whole-trace replay
# ---------------------------------------------------------------------------------
def bench_replay(limit: int | None, runs: int) -> dict:
    from paged_kv.sim.simulate import simulate
    from paged_kv.sim.trace import load_trace

    trace = load_trace()
    if limit is not None:
        trace = trace.head(limit)
    # cli.py's defaults: --num-blocks 8192 --block-size 16 --max-blocks-per-seq 1024
    # --max-batch 256 --watermark 0.01.
    spec = CacheSpec(num_blocks=8192, block_size=16, max_blocks_per_seq=1024, max_batch_slots=256, **MODEL)
    walls = []
    for _ in range(runs):  # the median run is reported: one replay is seconds, exposed to outside load
        gc.collect()
        t0 = time.perf_counter()
        report = simulate(trace, spec, max_batch=256, watermark=0.01)
        walls.append(time.perf_counter() - t0)
    wall = statistics.median(walls)
    return {"requests": len(trace), "runs": runs, "wall_s": round(wall, 3), "wall_s_runs": [round(w, 3) for w in walls],
            "steps": report.steps, "us_per_step": round(wall / max(report.steps, 1) * 1e6, 1),
            "requests_served": report.requests_served, "preemptions": report.preemptions,
            "tokens_generated": report.tokens_generated, "mean_running": round(report.mean_running, 1)}


# ---------------------------------------------------------------------------------
# 3. block-size sweep at equal memory
# ---------------------------------------------------------------------------------
def bench_sweep(contexts: np.ndarray, episodes: int, warmup: int, rng: np.random.Generator) -> dict:
    ids = list(range(N_SEQS))
    specs = {bs: decode_spec(bs) for bs in BLOCK_SIZES}
    t_app = {bs: [] for bs in BLOCK_SIZES}
    t_meta = {bs: [] for bs in BLOCK_SIZES}
    width: dict[int, set] = {bs: set() for bs in BLOCK_SIZES}
    for ep in range(episodes):
        lengths = rng.choice(contexts, N_SEQS)
        mgrs = {bs: fresh_manager(specs[bs], ids, lengths) for bs in BLOCK_SIZES}
        gc.collect()
        gc.disable()
        try:
            for step in range(EPISODE):
                for bs, m in mgrs.items():  # interleaved: outside load hits every size alike
                    t0 = time.perf_counter_ns()
                    m.append(ids, 1)
                    t1 = time.perf_counter_ns()
                    md = m.step_metadata(ids, 1)
                    t2 = time.perf_counter_ns()
                    if ep > 0 or step >= warmup:
                        t_app[bs].append(t1 - t0)
                        t_meta[bs].append(t2 - t1)
                    width[bs].add(md.table_width)
        finally:
            gc.enable()
        for bs, m in mgrs.items():
            assert m.pool.num_blocks * bs == TOKEN_SLOTS and m.spec.max_seq_len == MAX_SEQ_LEN
            m.check_integrity()
        del mgrs
    out = {}
    for bs in BLOCK_SIZES:
        total = [a + b for a, b in zip(t_app[bs], t_meta[bs])]
        out[str(bs)] = {"num_blocks": specs[bs].num_blocks, "max_blocks_per_seq": specs[bs].max_blocks_per_seq,
                        "table_widths": sorted(width[bs]), "append_us": round(_median_us(t_app[bs]), 1),
                        "step_metadata_us": round(_median_us(t_meta[bs]), 1),
                        "step_us": round(_median_us(total), 1)}
    return out


# ---------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="few episodes, first 3000 trace requests (smoke test)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    q = args.quick
    rng = np.random.default_rng(args.seed)
    t_start = time.perf_counter()
    dec_episodes, sweep_episodes, warmup = (1, 1, 16) if q else (10, 8, 16)
    replay_runs = 1 if q else 3

    print(f"bench_allocator: numpy {np.__version__}, python {platform.python_version()} "
          f"({os.cpu_count()} cpus, {platform.machine()}){' [quick]' if q else ''}")
    res: dict = {"quick": q, "seed": args.seed, "n_seqs": N_SEQS,
                 "host": {"cpus": os.cpu_count(), "loadavg_start": [round(x, 2) for x in os.getloadavg()],
                          "numpy": np.__version__, "python": platform.python_version()}}
    contexts = _context_lengths()

    # 1. decode step ------------------------------------------------------------------
    d = bench_decode(contexts, dec_episodes, warmup, rng)
    med = {k: _median_us(v) for k, v in d["times"].items()}
    n_timed = len(d["times"]["batched"])
    print(f"(1) decode step, {N_SEQS} seqs, block {BLOCK_SIZE}, lengths from the trace; "
          f"{d['crossings_per_step_mean']:.1f} new blocks/step on average "
          f"(1/{N_SEQS / max(d['crossings_per_step_mean'], 1e-9):.1f} of seqs); "
          f"median of {n_timed} steps; slots/tables identical across contenders: ok")
    labels = {
        "batched": "a. append(seq_ids, 1)",
        "batched_meta": "b. append + step_metadata",
        "loop_pool_table": "c. loop over BlockPool/PageTable",
        "loop_lists": "c'. loop over Python lists",
        "per_seq_api": "d. append([s], 1) per seq",
    }
    for k, label in labels.items():
        ratio = f"   = {med[k] / med['batched']:6.2f}x batched append" if k != "batched" else ""
        print(f"    {label:<34} {med[k]:9.1f} us  ({_spread(d['times'][k])}){ratio}")
    app_part, meta_part = _median_us(d["append_part"]), _median_us(d["meta_part"])
    print(f"    (b split: append {app_part:.1f} us + step_metadata {meta_part:.1f} us, "
          f"table width W in {d['table_widths']})")
    res["decode"] = {
        "block_size": BLOCK_SIZE, "steps_timed": n_timed, "episode_steps": EPISODE,
        "new_blocks_per_step_mean": round(d["crossings_per_step_mean"], 2),
        "table_widths": d["table_widths"],
        "us": {k: round(v, 1) for k, v in med.items()},
        "b_append_us": round(app_part, 1), "b_step_metadata_us": round(meta_part, 1),
        "ratio_loop_pool_table_over_batched": round(med["loop_pool_table"] / med["batched"], 2),
        "ratio_loop_lists_over_batched": round(med["loop_lists"] / med["batched"], 2),
        "ratio_per_seq_api_over_batched": round(med["per_seq_api"] / med["batched"], 2),
        "ratio_batched_meta_over_batched": round(med["batched_meta"] / med["batched"], 2),
        "ratio_loop_pool_table_over_batched_meta": round(med["loop_pool_table"] / med["batched_meta"], 2),
        "ratio_per_seq_api_over_batched_meta": round(med["per_seq_api"] / med["batched_meta"], 2),
    }
    gc.collect()

    # 2. whole-trace replay -----------------------------------------------------------
    limit = 3000 if q else None
    try:  # the simulator is under active development: never lose the other figures to it
        r = bench_replay(limit, replay_runs)
    except Exception as exc:  # noqa: BLE001
        print(f"(2) trace replay: skipped ({type(exc).__name__}: {exc})")
        res["replay"] = {"error": f"{type(exc).__name__}: {exc}"[:200]}
    else:
        print(f"(2) trace replay, CLI default spec (8192 x 16-token blocks, batch 256), {r['requests']:,} requests: "
              f"{r['wall_s']:.2f} s wall (median of {r['runs']}), {r['steps']:,} steps, "
              f"{r['us_per_step']:.1f} us/step, "
              f"{r['requests_served']:,} served, {r['preemptions']} preemptions"
              f"{'' if q or r['wall_s'] < 5 else '   (over the 5 s aim)'}")
        res["replay"] = r
    gc.collect()

    # 3. block-size sweep -------------------------------------------------------------
    s = bench_sweep(contexts, sweep_episodes, warmup, rng)
    print(f"(3) block-size sweep at equal memory ({TOKEN_SLOTS:,} token slots) and max_seq_len {MAX_SEQ_LEN}: "
          f"decode step of {N_SEQS} seqs (append + step_metadata, median)")
    for bs, v in s.items():
        print(f"    block {int(bs):>3}: {v['num_blocks']:>6} blocks, W in {str(v['table_widths']):<11}: "
              f"append {v['append_us']:7.1f} us + step_metadata {v['step_metadata_us']:7.1f} us "
              f"= {v['step_us']:7.1f} us")
    res["sweep"] = {"token_slots": TOKEN_SLOTS, "max_seq_len": MAX_SEQ_LEN, "by_block_size": s}

    res["wall_s"] = round(time.perf_counter() - t_start, 1)
    res["host"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    print(f"total {res['wall_s']:.1f} s")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
