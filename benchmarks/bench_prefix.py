"""Memory saved by sharing blocks: a prefix cache for shared system prompts, fork
for parallel sampling; and what a prefix lookup costs per token.

Model: 32 layers, 8 KV heads x 128, bfloat16, block 16, a 16 GiB pool (8,192
blocks), batch <= 256 sequences. Host only. A small continuous-batching loop
(offline queue, FCFS, 1% free-block watermark, one decode token per sequence per
step, whole prompts admitted at once; on a shortage the newest request is
preempted and restarted) runs each workload twice, with sharing and without, and
reports blocks in use, sequences and requests running at once (time averages),
steps to serve everything and preemptions.

1. System prompts: 3,000 requests from many clients, each starting with one of 4
   system prompts of 2,048 tokens, then a lognormal user message (median 200) and
   output (median 150). Sharing: `admit_prompt` with the prefix cache; without:
   `admit` of the same lengths.
2. Parallel sampling n = 4 on the Azure conversation trace (first 3,000 requests):
   each request samples 4 outputs of its trace output length. Sharing: admit the
   prompt once and `fork` 3 children when it is prefilled (copy-on-write on the
   shared last block); without: 4 independent sequences with the prompt each.
3. Lookup cost: `admit_prompt` of a 2,248-token prompt whose first 2,048 tokens are
   cached, per prompt token, against `admit` of the same length.

Prints a final JSON line. Trace: Azure/AzurePublicDataset (CC-BY 4.0), Patel et al., ISCA 2024.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import deque

import numpy as np

import paged_kv as pk
from _report import finish_report, start_report

from paged_kv.sim import BUNDLED_ATTRIBUTION, load_trace

MODEL = dict(num_layers=32, num_kv_heads=8, head_dim=128, dtype="bfloat16")
SPEC = pk.CacheSpec(num_blocks=8192, block_size=16, max_blocks_per_seq=1024, max_batch_slots=256, **MODEL)
MAX_BATCH = 256


def serve(requests: list[tuple[np.ndarray, list[int]]], mode: str) -> dict:
    """requests: (prompt token ids, output length of each sample). mode: "plain",
    "prefix" (admit_prompt) or "fork" (one prompt, forked samples)."""
    m = pk.KVCacheManager(SPEC, prefix_cache=(mode == "prefix"))
    reserve = 0.01 * SPEC.usable_blocks
    queue = deque(range(len(requests)))
    running: dict[int, list[int]] = {}  # request -> its live sequence ids
    remaining: dict[int, int] = {}  # sequence -> tokens still to generate
    order: list[int] = []  # running requests, oldest first
    steps = preemptions = sum_blocks = sum_seqs = sum_reqs = 0
    next_id = 0
    while queue or running:
        if not running and queue and SPEC.blocks_for(len(requests[queue[0]][0])) > SPEC.usable_blocks:
            raise ValueError(f"request {queue[0]} cannot fit an empty pool")
        while queue:
            r = queue[0]
            prompt, outs = requests[r]
            width = 1 if mode != "plain" else len(outs)
            if len(remaining) + len(outs) > MAX_BATCH:
                break
            need = SPEC.blocks_for(len(prompt)) * width
            fits = m.can_admit_prompt(prompt) if mode == "prefix" else need <= m.num_free_blocks
            if not fits or (running and m.num_free_blocks - need < reserve):
                break
            queue.popleft()
            ids = list(range(next_id, next_id + len(outs)))
            next_id += len(outs)
            if mode == "fork":
                m.admit(ids[0], len(prompt))
                for child in ids[1:]:
                    m.fork(ids[0], child)
            else:
                for s in ids:
                    if mode == "prefix":
                        m.admit_prompt(s, prompt)
                    else:
                        m.admit(s, len(prompt))
            running[r] = ids
            order.append(r)
            remaining.update(zip(ids, outs))
        while True:
            try:
                m.append(list(remaining), 1)
                break
            except pk.OutOfBlocksError:
                victim = order.pop()  # newest request: release all its samples, start over later
                for s in running.pop(victim):
                    m.release(s)
                    del remaining[s]
                queue.appendleft(victim)
                preemptions += 1
        if remaining:
            # The step runs, then is committed, as an engine would: copy-on-write copies
            # retire and (prefix mode) the prompts' written blocks become hittable.
            m.step_metadata(list(remaining), 1)
            m.commit(list(remaining))
        steps += 1
        sum_blocks += m.num_used_blocks
        sum_seqs += len(remaining)
        sum_reqs += len(running)
        done = [s for s, left in remaining.items() if left <= 1]
        for s in list(remaining):
            remaining[s] -= 1
        for s in done:
            m.release(s)
            del remaining[s]
        for r in [r for r in order if all(s not in remaining for s in running[r])]:
            order.remove(r)
            del running[r]
    out = dict(steps=steps, preemptions=preemptions, mean_blocks_in_use=round(sum_blocks / steps, 1),
               mean_sequences_running=round(sum_seqs / steps, 2), mean_requests_running=round(sum_reqs / steps, 2))
    if mode == "prefix":
        st = m.prefix_cache.stats()
        out.update(hit_rate=round(st.hit_rate, 4), blocks_reused=st.blocks_reused, blocks_evicted=st.blocks_evicted)
    m.check_integrity()
    return out


def system_prompt_workload(n: int, rng) -> list:
    systems = [rng.integers(0, 32000, 2048) for _ in range(4)]
    user = np.maximum(1, rng.lognormal(np.log(200), 0.8, n)).astype(int)
    output = np.clip(rng.lognormal(np.log(150), 0.8, n), 1, 2000).astype(int)
    return [(np.concatenate([systems[i % 4], rng.integers(0, 32000, user[i])]), [int(output[i])]) for i in range(n)]


def sampling_workload(n: int, rng) -> list:
    trace = load_trace().head(n)
    out = []
    for ctx, gen in zip(trace.context_tokens.tolist(), trace.generated_tokens.tolist()):
        gen = max(1, min(gen, SPEC.max_seq_len - ctx))
        out.append((rng.integers(0, 32000, ctx), [gen] * 4))
    return out


def compare(requests) -> dict:
    shared_mode = "fork" if len(requests[0][1]) > 1 else "prefix"
    plain, shared = serve(requests, "plain"), serve(requests, shared_mode)
    return dict(plain=plain, shared=shared, mode=shared_mode,
                blocks_shared_over_plain=round(shared["mean_blocks_in_use"] / plain["mean_blocks_in_use"], 3),
                requests_running_shared_over_plain=round(
                    shared["mean_requests_running"] / plain["mean_requests_running"], 3),
                steps_plain_over_shared=round(plain["steps"] / shared["steps"], 3))


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
    out["system_prompts"] = sp = compare(system_prompt_workload(n, rng))
    print(f"system prompts: blocks in use {sp['plain']['mean_blocks_in_use']} -> {sp['shared']['mean_blocks_in_use']} "
          f"({sp['blocks_shared_over_plain']}x), requests running {sp['plain']['mean_requests_running']} -> "
          f"{sp['shared']['mean_requests_running']} ({sp['requests_running_shared_over_plain']}x), "
          f"hit rate {sp['shared']['hit_rate']}")
    out["parallel_sampling_n4"] = ps = compare(sampling_workload(n, rng))
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
