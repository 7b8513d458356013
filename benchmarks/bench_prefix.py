"""Memory saved by sharing blocks: a prefix cache for shared system prompts, fork
for parallel sampling; and what a prefix lookup costs per token.

Model: 32 layers, 8 KV heads x 128, bfloat16, block 16, a 16 GiB pool (8,192
blocks), batch <= 256 sequences. The simulator's continuous-batching scheduler
(`paged_kv.sim.run_schedule`: offline queue, FCFS, 8,192-token step budget with
chunked prefill, 1% free-block watermark, recompute preemption of the newest) runs
each workload twice over the paged manager, with sharing and without, and reports
blocks in use, sequences running at once (time averages; requests running counts
a request's n samples as one), steps to serve everything and preemptions.

1. System prompts: 3,000 requests from many clients, each starting with one of 4
   system prompts of 2,048 tokens, then a lognormal user message (median 200) and
   output (median 150). Sharing: the prefix cache (`admit_prompt`, `commit`);
   without: `admit` of the same lengths.
2. Parallel sampling n = 4 on the Azure conversation trace (first 3,000 requests):
   each request samples 4 outputs of its trace output length. Sharing: prefill the
   prompt once and `fork` 3 children when it is done (they share the prompt and the
   first output token; copy-on-write on the shared last block); without: 4
   independent requests with the prompt each.
3. Lookup cost: `admit_prompt` of a 2,248-token prompt whose first 2,048 tokens are
   cached, per prompt token, against `admit` of the same length.

Prints a final JSON line. Trace: Azure/AzurePublicDataset (CC-BY 4.0), Patel et al., ISCA 2024.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import paged_kv as pk
from _report import finish_report, start_report

from paged_kv.sim import BUNDLED_ATTRIBUTION, PagedBackend, SchedulerConfig, Trace, Workload, load_trace, run_schedule
from paged_kv.sim.simulate import SimReport
from paged_kv.sim.workload import SHARED, stream_key

MODEL = dict(num_layers=32, num_kv_heads=8, head_dim=128, dtype="bfloat16")
SPEC = pk.CacheSpec(num_blocks=8192, block_size=16, max_blocks_per_seq=1024, max_batch_slots=256, **MODEL)
CONFIG = SchedulerConfig(max_batch=256)


def serve(work: Workload | Trace, prefix_cache: bool, samples: int = 1) -> dict:
    """Replay ``work`` over a fresh manager; ``samples``: sequences per request, for
    the request-equivalents running."""
    backend = PagedBackend(SPEC, CONFIG.watermark, prefix_cache=prefix_cache)
    result = run_schedule(work, backend, CONFIG, SPEC.max_seq_len)
    report = SimReport.from_result(backend, result)
    out = dict(steps=report.steps, preemptions=report.preemptions,
               mean_blocks_in_use=round(report.mean_blocks_in_use, 1),
               mean_sequences_running=round(report.mean_running, 2),
               mean_requests_running=round(report.mean_running / samples, 2))
    if prefix_cache:
        st = backend.manager.prefix_cache.stats()
        out.update(hit_rate=round(report.token_hit_rate, 4), blocks_reused=st.blocks_reused,
                   blocks_evicted=st.blocks_evicted)
    backend.check_integrity()
    return out


def system_prompt_workload(n: int, rng) -> Workload:
    """n requests, request i starting with system prompt i % 4 (2,048 shared tokens)."""
    user = np.maximum(1, rng.lognormal(np.log(200), 0.8, n)).astype(int)
    output = np.clip(rng.lognormal(np.log(150), 0.8, n), 1, 2000).astype(int)
    trace = Trace(np.zeros(n), 2048 + user, output)
    systems = np.array([stream_key(SHARED, 0, k) for k in range(4)], np.uint64)
    return Workload(trace=trace, follows=np.full(n, -1), think_s=np.zeros(n), samples=np.ones(n, np.int64),
                    stream=systems[np.arange(n) % 4], shared_len=np.full(n, 2048))


def compare(plain: dict, shared: dict, mode: str) -> dict:
    return dict(plain=plain, shared=shared, mode=mode,
                blocks_shared_over_plain=round(shared["mean_blocks_in_use"] / plain["mean_blocks_in_use"], 3),
                requests_running_shared_over_plain=round(
                    shared["mean_requests_running"] / plain["mean_requests_running"], 3),
                steps_plain_over_shared=round(plain["steps"] / shared["steps"], 3))


def system_prompts(n: int, rng) -> dict:
    work = system_prompt_workload(n, rng)
    return compare(serve(work.trace, False), serve(work, True), "prefix")


def parallel_sampling(n: int) -> dict:
    trace = load_trace().head(n)
    copies = Trace(np.repeat(trace.arrival_s, 4), np.repeat(trace.context_tokens, 4),
                   np.repeat(trace.generated_tokens, 4))
    return compare(serve(copies, False, samples=4), serve(Workload.from_trace(trace, samples=4), False, samples=4),
                   "fork")


def lookup_cost(rng, reps: int) -> dict:
    m = pk.KVCacheManager(SPEC, prefix_cache=True)
    system = rng.integers(0, 32000, 2048)
    m.admit_prompt(0, np.concatenate([system, rng.integers(0, 32000, 200)]))
    m.commit([0], 2248)  # its prefill ran: the system prompt's blocks are hittable
    cached, plain = [], []
    for i in range(reps):
        prompt = np.concatenate([system, rng.integers(0, 32000, 200)])
        t0 = time.perf_counter_ns()
        hit = m.admit_prompt(1, prompt)
        t1 = time.perf_counter_ns()
        m.release(1)
        t2 = time.perf_counter_ns()
        m.admit(1, prompt.size)
        t3 = time.perf_counter_ns()
        m.release(1)
        assert hit == 2048
        cached.append(t1 - t0)
        plain.append(t3 - t2)
    n = 2248
    return dict(prompt_tokens=n, cached_tokens=2048, admit_prompt_us=round(statistics.median(cached) / 1e3, 1),
                admit_us=round(statistics.median(plain) / 1e3, 1),
                admit_prompt_ns_per_token=round(statistics.median(cached) / n, 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="500 requests per workload")
    args = ap.parse_args()
    n = 500 if args.quick else 3000
    rng = np.random.default_rng(0)
    out = start_report(trace=BUNDLED_ATTRIBUTION, quick=args.quick)
    out["system_prompts"] = sp = system_prompts(n, rng)
    print(f"system prompts: blocks in use {sp['plain']['mean_blocks_in_use']} -> {sp['shared']['mean_blocks_in_use']} "
          f"({sp['blocks_shared_over_plain']}x), requests running {sp['plain']['mean_requests_running']} -> "
          f"{sp['shared']['mean_requests_running']} ({sp['requests_running_shared_over_plain']}x), "
          f"hit rate {sp['shared']['hit_rate']}")
    out["parallel_sampling_n4"] = ps = parallel_sampling(n)
    print(f"parallel sampling n=4: blocks in use {ps['plain']['mean_blocks_in_use']} -> "
          f"{ps['shared']['mean_blocks_in_use']} ({ps['blocks_shared_over_plain']}x), requests running "
          f"{ps['plain']['mean_requests_running']} -> {ps['shared']['mean_requests_running']} "
          f"({ps['requests_running_shared_over_plain']}x), steps {ps['plain']['steps']} -> {ps['shared']['steps']}")
    out["lookup"] = lk = lookup_cost(rng, 50 if args.quick else 300)
    print(f"lookup: admit_prompt {lk['admit_prompt_us']} us for {lk['prompt_tokens']} tokens "
          f"({lk['admit_prompt_ns_per_token']} ns/token), plain admit {lk['admit_us']} us")
    finish_report(out)


if __name__ == "__main__":
    main()
