"""Moving sequences between two processes (`paged_kv.transfer`), and disaggregated vs
single-process generation.

1. Pages: a receiver process and this process (the sender) with a Llama-3-8B-shaped
   cache (32 layers, 8 KV heads x 128, bfloat16, block 16: 128 KiB per token), both
   on 127.0.0.1. One 1,024-token sequence (128 MiB) and a batch of 16 of them sent
   one after another: median seconds per transfer (from the offer until the sender
   hears the receiver wrote the pages into its pool: `TransferSender.send`'s time),
   throughput as a fraction of a same-process numpy memcpy of the same bytes
   (``over_memcpy``; the memcpy timed between the transfers, under the same load),
   and the latency from the offer to the end of the receiver's
   first decode step on the sequence (one in-place attention write + read of every
   layer; the two processes' wall clocks, one machine; without the report's trip
   back), also as a fraction of the memcpy (``with_first_decode_step_over_memcpy``:
   what earlier versions of this benchmark called ``over_memcpy``). ``path``: how the
   pages went (``shm``: the same-host shared-memory ring; ``tcp``: ``--tcp``, or no
   memfd and /proc). For scale: raw TCP over loopback between two threads, same bytes.
2. Generation on the tiny Llama fixture (examples/disaggregated.py): a prefill and a
   decode process against one `Generator`, the same 16 requests arriving over time
   (0.5 s apart on average, then 0.02 s), both warmed up (compiled) first: generated
   tokens/s and median time to first token.

Prints a final JSON line (medians; the machine's load average at start and end).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import select
import socket
import statistics
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path

import numpy as np

from _report import finish_report, start_report

ROOT = Path(__file__).resolve().parents[1]
MODEL = dict(num_layers=32, num_kv_heads=8, head_dim=128, dtype="bfloat16", block_size=16)
TOKENS = 1024


def spec(sequences: int, room: int = 0):
    """Pool for ``sequences`` sequences of TOKENS tokens, each with ``room`` blocks to grow
    (the receiver's decode step); pools may differ between the two sides."""
    import paged_kv as pk

    per_seq = TOKENS // MODEL["block_size"] + room
    return pk.CacheSpec(num_blocks=sequences * per_seq + 1, max_blocks_per_seq=per_seq, max_batch_slots=16, **MODEL)


# ---- the receiver process -------------------------------------------------------------------
def receiver_main(sequences: int, limit: float, shared_memory: bool) -> None:
    import jax
    import jax.numpy as jnp

    import paged_kv as pk
    from paged_kv.transfer import TransferReceiver

    s = spec(sequences, room=1)
    manager = pk.KVCacheManager(s, prefix_cache=False)
    cache = pk.PagedKVCache.init(s)
    receiver = TransferReceiver(manager, offer_timeout=60.0, pull_timeout=60.0, shared_memory=shared_memory)

    @partial(jax.jit, donate_argnums=0)
    def first_decode_step(cache, q, k, v, meta):  # the cache's part of a decode step: write + attend, every layer
        outs, views = [], []
        for view in cache.views:
            out, view = view.attention(q, k, v, meta)
            outs.append(out.sum())
            views.append(view)
        return jnp.stack(outs).sum(), pk.PagedKVCache(tuple(views))

    print(json.dumps({"address": receiver.address}), flush=True)
    end = time.monotonic() + limit
    while time.monotonic() < end:
        cache, got = receiver.poll(cache, timeout=0.05)
        for r in got:
            manager.append([r.seq_id], 1)
            meta = manager.step_metadata([r.seq_id], 1)
            shape = (meta.batch_size, 1, s.num_kv_heads, s.head_dim)
            q = jnp.ones(shape, jnp.bfloat16)
            total, cache = first_decode_step(cache, q, q, q, meta.to_device())
            float(total)
            done = time.time()
            manager.release(r.seq_id)
            print(json.dumps({"seq_id": r.seq_id, "first_step_at": done, "write_s": r.seconds}), flush=True)
        if sys.stdin in select.select([sys.stdin], [], [], 0)[0] and not sys.stdin.readline():
            break
    manager.check_integrity()
    receiver.close()


# ---- the sender (this process) ----------------------------------------------------------------
def pages_benchmark(reps: int, batch: int, shared_memory: bool = True) -> dict:
    import jax.numpy as jnp

    import paged_kv as pk
    from paged_kv.transfer import TransferSender

    proc = subprocess.Popen([sys.executable, __file__, "--receiver", str(batch), *([] if shared_memory else ["--tcp"])],
                            stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    try:
        address = json.loads(_line(proc, 300))["address"]
        s = spec(batch)
        manager = pk.KVCacheManager(s)
        cache = pk.PagedKVCache.init(s)
        rng = np.random.default_rng(0)
        for i in range(batch):
            kv = jnp.asarray(rng.standard_normal((s.num_layers, TOKENS, s.num_kv_heads, s.head_dim)), jnp.bfloat16)
            cache = pk.insert_prefill(cache, manager, i, kv, kv)
        tokens = np.arange(TOKENS)
        sender = TransferSender(manager, timeout=120.0, shared_memory=shared_memory)
        paths = set()

        def send(i: int) -> tuple[float, float, float, int]:
            """(offer to done, offer to the report of the first step read, offer to the first step's end, bytes)"""
            t0 = time.perf_counter()
            offered = time.time()
            sent = sender.send(cache, i, tokens, address, release=False)
            t1 = time.perf_counter()
            step = json.loads(_line(proc, 120))
            assert step["seq_id"] == i
            paths.add(sent.path)
            return t1 - t0, time.perf_counter() - t0, step["first_step_at"] - offered, sent.nbytes

        for _ in range(2):  # compile both sides
            nbytes = send(0)[3]
        # The memcpy runs between the transfers (the receiver idle), so both see the same
        # load on this shared machine: each ratio is of figures taken side by side.
        src = np.ones(nbytes, np.uint8)
        dst = np.empty_like(src)
        np.copyto(dst, src)  # fault the pages in once
        memcpy = []

        def copy() -> None:
            t0 = time.perf_counter()
            np.copyto(dst, src)
            memcpy.append(time.perf_counter() - t0)

        one, with_step, latency = [], [], []
        for _ in range(reps):
            seconds, stepped, lat, nbytes = send(0)
            one.append(seconds)
            with_step.append(stepped)
            latency.append(lat)
            copy()
        batch_s, batch_latency = [], []
        for _ in range(max(1, reps // 3)):
            total = 0.0
            for i in range(batch):  # one after another; the receiver's decode step between two is not counted
                seconds, _, lat, _ = send(i)
                total += seconds
                batch_latency.append(lat)
            batch_s.append(total)
            copy()
        proc.stdin.close()
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
    m_one, m_batch, m_copy = statistics.median(one), statistics.median(batch_s), statistics.median(memcpy)
    tcp = tcp_loopback(nbytes, reps)
    return {
        "path": "+".join(sorted(paths)),
        "sequence_mib": round(nbytes / 2**20, 1),
        "one_sequence": {"transfer_ms": round(m_one * 1e3, 1), "gib_per_s": round(nbytes / m_one / 2**30, 3),
                         "over_memcpy": round(m_copy / m_one, 3),
                         "transfer_ms_range": [round(min(one) * 1e3, 1), round(max(one) * 1e3, 1)],
                         "with_first_decode_step_over_memcpy": round(m_copy / statistics.median(with_step), 3),
                         "latency_to_first_decode_step_ms": round(statistics.median(latency) * 1e3, 1)},
        f"batch_of_{batch}": {"transfer_s": round(m_batch, 3), "gib_per_s": round(batch * nbytes / m_batch / 2**30, 3),
                              "over_memcpy": round(batch * m_copy / m_batch, 3),
                              "latency_per_sequence_ms": round(statistics.median(batch_latency) * 1e3, 1)},
        "numpy_memcpy_ms": round(m_copy * 1e3, 1),
        "tcp_loopback_over_memcpy": round(m_copy / tcp, 3),
    }


def tcp_loopback(nbytes: int, reps: int) -> float:
    """Median seconds to push ``nbytes`` through a loopback TCP socket between two threads."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    src = np.ones(nbytes, np.uint8)

    def push():
        c = socket.create_connection(server.getsockname())
        for _ in range(reps + 1):
            c.sendall(memoryview(src))
        c.close()

    t = threading.Thread(target=push)
    t.start()
    conn, _ = server.accept()
    buf = np.empty(nbytes, np.uint8)
    view, times = memoryview(buf), []
    for _ in range(reps + 1):
        t0, got = time.perf_counter(), 0
        while got < nbytes:
            got += conn.recv_into(view[got:], nbytes - got)
        times.append(time.perf_counter() - t0)
    t.join()
    conn.close()
    server.close()
    return statistics.median(times[1:])


def _line(proc: subprocess.Popen, within: float) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], within)
    line = proc.stdout.readline() if ready else ""
    if not line:
        proc.kill()
        raise RuntimeError(f"receiver: no output within {within} s: {proc.stderr.read()[-3000:]}")
    return line


# ---- generation -------------------------------------------------------------------------------
def generation_benchmark(requests: int, gap: float) -> dict:
    spec_ = importlib.util.spec_from_file_location("disaggregated_example", ROOT / "examples" / "disaggregated.py")
    ex = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(ex)
    reqs = ex.workload(requests, seed=0, gap=gap)
    dis = ex.summary(ex.serve(requests, seed=0, gap=gap, timeout=300.0, warmup=True), reqs)
    one = single_process_timed(ex, reqs)
    return {"requests": requests, "mean_gap_s": gap, "disaggregated": dis["disaggregated"],
            "single_process": one, "integrity": dis["integrity"],
            "tokens_per_s_disaggregated_over_single": round(dis["disaggregated"]["tokens_per_s"] / one["tokens_per_s"], 3),
            "ttft_disaggregated_over_single": round(dis["disaggregated"]["ttft_median_s"] / one["ttft_median_s"], 3)}


def single_process_timed(ex, reqs: list[dict]) -> dict:
    """One `Generator`, the requests arriving at the same wall-clock offsets; the schedule
    runs again until a run compiles nothing, and that run is measured (the step shapes
    depend on which prompts arrive together and prefill in one step). No prefix cache,
    so every run computes the same prompts."""
    from paged_kv.models.generate import Generator, Request

    cfg, params, spec_ = ex.model()
    gen = Generator(cfg, params, spec_, compiler_options=ex.FAST_COMPILE, prefix_cache=False)
    gen.generate([Request([6] * 3, 6)])  # every decode table width
    gen.generate([Request([5] * 9, ex.MAX_LEN - 9)])

    def timed() -> dict:
        pending, first = list(reqs), {}
        start = time.time()

        def arrivals(idle: bool):
            now = time.time()
            for rid, s in gen._by_id.items():
                if rid not in first and s.completion is not None and s.completion.tokens:
                    first[rid] = now
            if not pending:
                return None
            if idle:
                time.sleep(max(0.0, start + pending[0]["arrival"] - now))
                now = time.time()
            out = []
            while pending and start + pending[0]["arrival"] <= now:
                r = pending.pop(0)
                out.append(Request(r["prompt"], r["max_new"], request_id=r["id"]))
            return out

        completions, stats = gen.generate([], arrivals=arrivals)
        elapsed = time.time() - start
        ttft = [first[r["id"]] - (start + r["arrival"]) for r in reqs if r["id"] in first]
        return {"tokens_per_s": sum(len(c.tokens) for c in completions) / elapsed,
                "decode_tokens_per_s": stats.decode_tokens_per_s, "ttft_median_s": float(np.median(ttft)),
                "compilations_while_measured": stats.compilations}

    for passes in range(1, 6):  # until a pass compiles nothing (how arrivals batch varies a little)
        result = timed()
        if not result["compilations_while_measured"]:
            break
    return {**result, "passes": passes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions, a batch of 4, fewer requests")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tcp", action="store_true", help="pages over TCP even on one host (shared_memory=False)")
    ap.add_argument("--pages-only", action="store_true", help="skip the generation benchmark")
    ap.add_argument("--receiver", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if args.receiver:
        receiver_main(args.receiver, 1800.0, not args.tcp)
        return
    batch = 4 if args.quick else args.batch
    out = start_report(model="llama3-8b-shaped", tokens_per_sequence=TOKENS, batch=batch, quick=args.quick,
                       tcp=args.tcp)
    out["pages"] = pages = pages_benchmark(3 if args.quick else 9, batch, not args.tcp)
    one, many = pages["one_sequence"], pages[f"batch_of_{batch}"]
    print(f"1 x {pages['sequence_mib']} MiB by {pages['path']}: {one['transfer_ms']} ms ({one['gib_per_s']} GiB/s, "
          f"{one['over_memcpy']}x memcpy; loopback TCP alone {pages['tcp_loopback_over_memcpy']}x), "
          f"offer to first decode step {one['latency_to_first_decode_step_ms']} ms; batch of {batch}: "
          f"{many['transfer_s']} s ({many['over_memcpy']}x memcpy), {many['latency_per_sequence_ms']} ms per sequence")
    # Arrivals 0.5 s apart (the machine keeps up: latency) and 0.02 s apart (a queue forms: throughput).
    for gap in () if args.pages_only else (0.5, 0.02):
        out[f"generation_gap_{gap}s"] = gen = generation_benchmark(6 if args.quick else 16, gap)
        print(f"generation, arrivals {gap} s apart: disaggregated {gen['disaggregated']['tokens_per_s']:.1f} tokens/s, "
              f"TTFT {gen['disaggregated']['ttft_median_s'] * 1e3:.0f} ms; single process "
              f"{gen['single_process']['tokens_per_s']:.1f} tokens/s, TTFT "
              f"{gen['single_process']['ttft_median_s'] * 1e3:.0f} ms")
    finish_report(out)


if __name__ == "__main__":
    main()
