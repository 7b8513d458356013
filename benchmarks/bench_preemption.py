"""Preemption by recompute vs by swap on the Azure trace under memory pressure, and
what one swap costs on the device.

1. Host replay (offline load, 32 layers x 8 KV heads x 128, bfloat16, block 16,
   batch 256) with a 16 GiB and an 8 GiB pool: preemptions, prompt tokens
   prefilled again (recompute), bytes moved to host and back (swap), the most
   bytes parked in host memory at once, steps to serve the trace.
2. Device: `paged_kv.swap.swap_out` then `swap_in` of one 1,024-token sequence
   (8 layers of the same shape: 32 MiB of pages), median time against numpy
   copying the same bytes in the same process. On CPU both directions are memory
   copies; on an accelerator they cross PCIe.

Prints a final JSON line. Trace: Azure/AzurePublicDataset (CC-BY 4.0), Patel et al., ISCA 2024.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import paged_kv as pk
from _report import finish_report, start_report

from paged_kv.sim import BUNDLED_ATTRIBUTION, SchedulerConfig, load_trace, simulate
from paged_kv.swap import swap_in, swap_out

MODEL = dict(num_layers=32, num_kv_heads=8, head_dim=128, dtype="bfloat16")


def replay(trace, num_blocks: int, preemption: str) -> dict:
    spec = pk.CacheSpec(num_blocks=num_blocks, block_size=16, max_blocks_per_seq=1024, max_batch_slots=256, **MODEL)
    r = simulate(trace, spec, config=SchedulerConfig(max_batch=256, preemption=preemption))
    return dict(preemptions=r.preemptions, recomputed_prefill_tokens=r.prefill_tokens - int(trace.context_tokens.sum()),
                gib_swapped_out=round(r.bytes_swapped_out / 2**30, 3), gib_swapped_in=round(r.bytes_swapped_in / 2**30, 3),
                peak_gib_on_host=round(r.peak_swapped_bytes / 2**30, 3), steps=r.steps,
                mean_running=round(r.mean_running, 2), wall_s=round(r.wall_s, 2))


WARM = 6  # the first runs compile, then fresh host pages fault until the allocators hold enough


def device_swap(reps: int) -> dict:
    spec = pk.CacheSpec(num_layers=8, num_blocks=1024, block_size=16, max_blocks_per_seq=256, num_kv_heads=8,
                        head_dim=128, dtype="bfloat16")
    manager = pk.KVCacheManager(spec)
    cache = pk.PagedKVCache.init(spec)
    manager.admit(0, 1024)
    out_ns, in_ns, copy_ns = [], [], []
    dst = None  # memcpy into buffers allocated once: fresh ones would time page faults
    for i in range(reps + WARM):
        t0 = time.perf_counter_ns()
        gone = swap_out(cache, manager, 0)
        t1 = time.perf_counter_ns()
        cache = swap_in(cache, manager, gone)
        cache.views[-1].value_pages.block_until_ready()
        t2 = time.perf_counter_ns()
        flat = [a for layer in gone.pages for a in layer]
        if dst is None:
            dst = [np.empty_like(a) for a in flat]
            for d, a in zip(dst, flat):
                np.copyto(d, a)
        t3 = time.perf_counter_ns()
        for d, a in zip(dst, flat):
            np.copyto(d, a)
        t4 = time.perf_counter_ns()
        if i >= WARM:  # compile, and let the allocators settle (fresh pages fault)
            out_ns.append(t1 - t0)
            in_ns.append(t2 - t1)
            copy_ns.append(t4 - t3)
    nbytes = gone.nbytes
    med = {k: statistics.median(v) / 1e6 for k, v in (("out", out_ns), ("in", in_ns), ("copy", copy_ns))}
    return dict(mib=round(nbytes / 2**20, 1), swap_out_ms=round(med["out"], 2), swap_in_ms=round(med["in"], 2),
                numpy_copy_ms=round(med["copy"], 2),
                swap_out_over_memcpy=round(med["copy"] / med["out"], 3),
                swap_in_over_memcpy=round(med["copy"] / med["in"], 3))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="first 3000 requests, fewer repetitions")
    args = ap.parse_args()
    trace = load_trace()
    if args.quick:
        trace = trace.head(3000)
    out = start_report(trace=BUNDLED_ATTRIBUTION, requests=len(trace), quick=args.quick)
    for gib, blocks in ((16, 8192), (8, 4096)):
        for policy in ("recompute", "swap"):
            fig = replay(trace, blocks, policy)
            out[f"{gib}gib_{policy}"] = fig
            print(f"{gib} GiB, {policy:>9}: {fig['preemptions']} preemptions, {fig['recomputed_prefill_tokens']:,} "
                  f"tokens prefilled again, {fig['gib_swapped_out']} GiB out / {fig['gib_swapped_in']} GiB in "
                  f"(peak {fig['peak_gib_on_host']} GiB on host), {fig['steps']:,} steps")
    out["device_swap_1024_tokens"] = dev = device_swap(15)  # cheap; 5 moved the median by 1.5x between runs
    print(f"device: swap out {dev['swap_out_ms']} ms, in {dev['swap_in_ms']} ms for {dev['mib']} MiB; "
          f"numpy copy {dev['numpy_copy_ms']} ms ({dev['swap_out_over_memcpy']}x / {dev['swap_in_over_memcpy']}x memcpy speed)")
    finish_report(out)


if __name__ == "__main__":
    main()
