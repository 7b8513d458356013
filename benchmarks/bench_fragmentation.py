"""Memory utilization and concurrency of the paged cache against contiguous caches
at equal memory, on the bundled Azure LLM conversation trace; plus a block-size sweep.

Model: 32 layers, 8 KV heads x 128 dim, bfloat16 (128 KiB of KV per token), a
16 GiB pool, max_seq_len 16,384, batch <= 256, 8,192-token step budget (the CLI's
defaults). Host-only: no device memory is touched.

1. Offline replay (every request queued at step 0: sustained full load, where
   memory decides how many sequences run), one scheduler over three backends:
   paged (block 16), contiguous max_seq_len buffers (the seed numpy KVCache and
   EasyDeL TransformerCache layout) and exact-length first-fit reservations in one
   linear arena. Figures: time-averaged and p1/p50/p99 utilization (tokens stored /
   slots allocated; aim >= 0.98 for paged), mean running sequences and the ratios
   paged / each baseline (aim >= 4x over max-length), steps to serve the trace,
   the arena's largest free run / total free.
2. Online replay at 3x the trace's arrival rate (25 ms steps): queueing delay. At
   that rate paged keeps up (it serves ~0.49 requests a step offline) and the
   contiguous caches fall behind.
3. Block-size sweep (8 ... 128) at equal bytes and equal max_seq_len: utilization,
   concurrency, preemptions, and host time per step, so users can choose.

Prints a final JSON line. Trace: Azure/AzurePublicDataset (CC-BY 4.0), Patel et al., ISCA 2024.
"""

from __future__ import annotations

import argparse

from _report import finish_report, start_report

from paged_kv import CacheSpec
from paged_kv.sim import BUNDLED_ATTRIBUTION, SchedulerConfig, compare, load_trace, simulate

MODEL = dict(num_layers=32, num_kv_heads=8, head_dim=128, dtype="bfloat16")
POOL_SLOTS = 8192 * 16  # 16 GiB at 128 KiB per token, null block included
MAX_SEQ_LEN = 16384
MAX_BATCH = 256


def spec_for(block_size: int) -> CacheSpec:
    return CacheSpec(num_blocks=POOL_SLOTS // block_size, block_size=block_size,
                     max_blocks_per_seq=MAX_SEQ_LEN // block_size, max_batch_slots=MAX_BATCH, **MODEL)


def figures(r) -> dict:
    keys = ("steps", "preemptions", "time_avg_utilization", "p1_utilization", "p50_utilization", "p99_utilization",
            "mean_running", "peak_running", "mean_blocks_in_use", "peak_blocks_in_use", "mean_internal_fragmentation",
            "mean_free_run_ratio", "min_free_run_ratio", "queue_delay_mean", "queue_delay_p50", "queue_delay_p99",
            "wall_s")
    d = r.as_dict()
    return {k: round(d[k], 4) if isinstance(d[k], float) else d[k] for k in keys}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="first 3000 requests only")
    args = ap.parse_args()
    trace = load_trace()
    if args.quick:
        trace = trace.head(3000)
    out = start_report(trace=BUNDLED_ATTRIBUTION, requests=len(trace), quick=args.quick)

    # 1. offline, three backends at equal memory
    spec = spec_for(16)
    offline = SchedulerConfig(max_batch=MAX_BATCH)
    paged, maxlen, firstfit = compare(trace, spec, offline)
    out["offline"] = {r.backend: figures(r) for r in (paged, maxlen, firstfit)}
    out["ratios"] = {
        "concurrency_paged_over_max_len": round(paged.mean_running / maxlen.mean_running, 3),
        "concurrency_paged_over_first_fit": round(paged.mean_running / firstfit.mean_running, 3),
        "steps_max_len_over_paged": round(maxlen.steps / paged.steps, 3),
        "steps_first_fit_over_paged": round(firstfit.steps / paged.steps, 3),
    }
    print(f"offline, block 16: utilization paged {paged.time_avg_utilization:.4f} (p1 {paged.p1_utilization:.4f}), "
          f"max-len {maxlen.time_avg_utilization:.4f}, first-fit {firstfit.time_avg_utilization:.4f}")
    print(f"  mean running: paged {paged.mean_running:.1f}, max-len {maxlen.mean_running:.1f} "
          f"({out['ratios']['concurrency_paged_over_max_len']:.2f}x), first-fit {firstfit.mean_running:.1f} "
          f"({out['ratios']['concurrency_paged_over_first_fit']:.2f}x); first-fit largest free run / free "
          f"{firstfit.mean_free_run_ratio:.3f} mean, {firstfit.min_free_run_ratio:.3f} min")

    # 2. online at 4x arrival rate: queueing
    online = SchedulerConfig(max_batch=MAX_BATCH, arrivals="trace", step_s=0.025, speedup=3.0)
    reports = compare(trace, spec, online)
    out["online_3x"] = {r.backend: figures(r) for r in reports}
    print("online 3x: queue delay p50/p99 (steps) " + ", ".join(
        f"{r.backend} {r.queue_delay_p50:,.0f}/{r.queue_delay_p99:,.0f}" for r in reports))

    # 3. block-size sweep at equal memory
    sweep = {}
    for bs in (8, 16, 32, 64, 128):
        r = paged if bs == 16 else simulate(trace, spec_for(bs), config=offline)
        sweep[bs] = {**figures(r), "us_per_step": round(r.wall_s / r.steps * 1e6, 1)}
        print(f"block {bs:>3}: utilization {r.time_avg_utilization:.4f}, mean running {r.mean_running:.1f}, "
              f"preemptions {r.preemptions}, steps {r.steps:,}, host {sweep[bs]['us_per_step']} us/step")
    out["block_size_sweep"] = sweep
    out["aims"] = {"utilization_ge_0.98": paged.time_avg_utilization >= 0.98,
                   "concurrency_over_max_len_ge_4": out["ratios"]["concurrency_paged_over_max_len"] >= 4}
    finish_report(out)


if __name__ == "__main__":
    main()
