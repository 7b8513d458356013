"""Blocks held with half the layers sliding (W=1024) vs every layer full, on the Azure trace.

Model: 32 layers, 8 KV heads x 128 dim, bfloat16 (a Llama-3-8B-sized KV cache),
block size 16. The hybrid model makes every other layer sliding with W = 1024
(Gemma-2 / Mistral style); its sliding layers return blocks behind the window.

1. Demand: both models replay the same trace with a pool large enough that memory
   never binds, so they run the identical schedule; the ratio of KV bytes held
   (time-averaged and peak) is what sliding saves.
2. Equal memory: the all-full model gets a 16 GiB pool; the hybrid model gets the
   same bytes, split between its two groups in proportion to their demand in (1).
   Memory now binds, and the mean number of running sequences (and the steps to
   serve the whole trace) show the concurrency the savings buy.

Prints a final JSON line.
"""

from __future__ import annotations

import argparse
import json

from paged_kv import CacheSpec
from paged_kv.sim import load_trace, simulate

LAYERS, HEADS, DIM, BLOCK, WINDOW = 32, 8, 128, 16, 1024
SLIDING = tuple(range(1, LAYERS, 2))


def spec(num_blocks: int, sliding_blocks: int | None, max_batch: int) -> CacheSpec:
    hybrid = sliding_blocks is not None
    return CacheSpec(
        num_layers=LAYERS, num_blocks=num_blocks, block_size=BLOCK, max_blocks_per_seq=1024,
        max_batch_slots=max_batch, num_kv_heads=HEADS, head_dim=DIM, dtype="bfloat16",
        sliding_window=WINDOW if hybrid else None, sliding_layers=SLIDING if hybrid else (),
        sliding_num_blocks=sliding_blocks,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=None, help="first N requests (default: all)")
    ap.add_argument("--pool-gib", type=float, default=16.0)
    ap.add_argument("--max-batch", type=int, default=1024)
    args = ap.parse_args()
    trace = load_trace()
    if args.limit:
        trace = trace.head(args.limit)

    # 1. Demand with memory unconstrained (same schedule for both models).
    big = 2**17
    full = simulate(trace, spec(big, None, args.max_batch), max_batch=args.max_batch)
    hyb = simulate(trace, spec(big, big, args.max_batch), max_batch=args.max_batch)
    assert full.steps == hyb.steps and full.preemptions == hyb.preemptions == 0
    mean_ratio = hyb.mean_used_bytes / full.mean_used_bytes
    peak_ratio = hyb.peak_used_bytes / full.peak_used_bytes
    print(f"demand: all-full holds {full.mean_used_bytes / 2**30:.2f} GiB on average "
          f"(peak {full.peak_used_bytes / 2**30:.2f}); hybrid {hyb.mean_used_bytes / 2**30:.2f} "
          f"(peak {hyb.peak_used_bytes / 2**30:.2f}): ratio {mean_ratio:.3f} mean, {peak_ratio:.3f} peak")

    # 2. Equal memory. A hybrid block (16 layers) is half an all-full block (32 layers).
    full_spec = spec(big, None, args.max_batch)
    n_full = int(args.pool_gib * 2**30) // full_spec.bytes_per_block
    d_full, d_slide = hyb.mean_group_blocks
    n_hyb_full = int(2 * n_full * d_full / (d_full + d_slide))
    n_hyb_slide = 2 * n_full - n_hyb_full
    eq_full = simulate(trace, spec(n_full, None, args.max_batch), max_batch=args.max_batch)
    eq_hyb = simulate(trace, spec(n_hyb_full, n_hyb_slide, args.max_batch), max_batch=args.max_batch)
    pool_full = spec(n_full, None, args.max_batch).pool_bytes
    pool_hyb = spec(n_hyb_full, n_hyb_slide, args.max_batch).pool_bytes
    concurrency = eq_hyb.mean_running / eq_full.mean_running
    print(f"equal memory ({pool_full / 2**30:.2f} vs {pool_hyb / 2**30:.2f} GiB; hybrid split "
          f"{n_hyb_full} full + {n_hyb_slide} sliding blocks): mean running {eq_full.mean_running:.1f} -> "
          f"{eq_hyb.mean_running:.1f} ({concurrency:.2f}x), steps {eq_full.steps} -> {eq_hyb.steps}, "
          f"preemptions {eq_full.preemptions} -> {eq_hyb.preemptions}")
    print(json.dumps({
        "requests": len(trace),
        "window": WINDOW,
        "sliding_layers": len(SLIDING),
        "layers": LAYERS,
        "bytes_held_hybrid_over_full_mean": round(mean_ratio, 4),
        "bytes_held_hybrid_over_full_peak": round(peak_ratio, 4),
        "mean_bytes_full_gib": round(full.mean_used_bytes / 2**30, 3),
        "mean_bytes_hybrid_gib": round(hyb.mean_used_bytes / 2**30, 3),
        "equal_memory_pool_gib": round(pool_full / 2**30, 3),
        "mean_running_full": round(eq_full.mean_running, 2),
        "mean_running_hybrid": round(eq_hyb.mean_running, 2),
        "concurrency_hybrid_over_full": round(concurrency, 3),
        "steps_full": eq_full.steps,
        "steps_hybrid": eq_hyb.steps,
        "throughput_hybrid_over_full": round(eq_full.steps / eq_hyb.steps, 3),
        "preemptions_full": eq_full.preemptions,
        "preemptions_hybrid": eq_hyb.preemptions,
    }))


if __name__ == "__main__":
    main()
