"""Disaggregated serving: a prefill process and a decode process on 127.0.0.1.

Requests arrive over time at the prefill process. It runs each prompt's prefill
through its own paged cache (reusing its prefix cache), takes the greedy first
token, and moves the sequence's pages to the decode process with
`paged_kv.transfer.TransferSender` (control messages over ZeroMQ, pages over
`jax.experimental.transfer`). The decode process receives them
(`TransferReceiver.poll`, between its decode steps) and generates the rest with the
continuous-batching `Generator`, whose ``arrivals`` hook admits each received
sequence as a `Prefilled` request. With ``--check`` the same requests are generated
in one process and the greedy tokens compared, token for token.

Run: ``python examples/disaggregated.py --requests 8 --check`` (CPU; the tiny Llama
fixture of tests/fixtures/hf/llama; about half a minute, most of it compiling).
Both processes stop by themselves (every request served, or ``--timeout``); the
parent kills them if they do not.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "hf" / "llama"
FAST_COMPILE = {"xla_backend_optimization_level": 0}
BLOCK, MAX_LEN, SLOTS = 4, 64, 4


def workload(n: int, seed: int = 0, gap: float = 0.15) -> list[dict]:
    """``n`` requests: prompts of 5-30 tokens (some sharing a prefix), 4-20 new tokens,
    arriving ``gap`` seconds apart on average."""
    rng = np.random.default_rng(seed)
    shared = rng.integers(3, 256, 12).tolist()
    out, t = [], 0.0
    for i in range(n):
        length = int(rng.integers(5, 31))
        prompt = (shared[: length // 2] if i % 3 == 0 else []) + rng.integers(3, 256, length).tolist()
        prompt = prompt[:length]
        out.append({"id": 100 + i, "prompt": prompt, "max_new": int(rng.integers(4, 21)), "arrival": round(t, 3)})
        t += float(rng.exponential(gap))
    return out


def model():
    from paged_kv.models import llama
    from paged_kv.models.loader import load_model

    cfg, params = load_model(FIXTURE)
    return cfg, params, llama.cache_spec(cfg, num_blocks=96, block_size=BLOCK, max_seq_len=MAX_LEN,
                                         max_batch_slots=SLOTS)


# ---- the decode process ---------------------------------------------------------------------
def decode(args) -> dict:
    import jax

    from paged_kv.models.generate import Generator, Prefilled, Request
    from paged_kv.transfer import TransferReceiver

    cfg, params, spec = model()
    gen = Generator(cfg, params, spec, compiler_options=FAST_COMPILE)
    # Received pages come back committed to their device (`TransferReceiver.poll`); commit the
    # cache now, so the steps compiled below are the ones that run (jit compiles per placement).
    gen.cache = jax.device_put(gen.cache, jax.devices()[0])
    if args.warmup:  # compile the decode steps of every table width before the clock starts
        gen.generate([Request([6] * 3, 6)])  # alone: widths 1 and 2
        gen.generate([Request([5] * 9, MAX_LEN - 9)])  # then 4, 8 and 16
    receiver = TransferReceiver(gen.manager)
    print(json.dumps({"address": receiver.address}), flush=True)
    deadline, expected = time.monotonic() + args.timeout, args.requests
    arrived: dict[int, float] = {}  # when each sequence was received
    first_decoded: dict[int, float] = {}  # when its first decode step had run

    def arrivals(idle: bool):
        now = time.time()
        for rid in arrived:
            c = gen._by_id[rid].completion
            if rid not in first_decoded and c is not None and len(c.tokens) >= min(2, gen._by_id[rid].max_new_tokens):
                first_decoded[rid] = now
        if len(arrived) >= expected:
            return None
        if time.monotonic() > deadline:
            raise SystemExit(f"decode: {len(arrived)} of {expected} requests arrived within {args.timeout} s")
        gen.cache, received = receiver.poll(gen.cache, timeout=0.02 if idle else 0.0)
        out = []
        for r in received:
            if r.info.get("warmup"):  # the sender compiling its transfers (and ours): not a request
                gen.manager.release(r.seq_id)
                continue
            arrived[r.seq_id] = time.time()
            out.append(Prefilled(r.tokens.tolist(), r.info["max_new"], request_id=r.seq_id,
                                 first_token=r.info["first_token"]))
        return out

    completions, stats = gen.generate([], arrivals=arrivals)
    done = time.time()
    gen.manager.check_integrity()
    receiver.close()
    return {"tokens": {c.request_id: c.tokens for c in completions}, "arrived": arrived,
            "first_decoded": first_decoded, "finished": done, "stats": stats.as_dict(),
            "integrity": "ok", "used_blocks": gen.manager.num_used_blocks}


# ---- the prefill process --------------------------------------------------------------------
def prefill(args) -> dict:
    import jax
    import jax.numpy as jnp

    import paged_kv as pk
    from paged_kv.errors import ReceiverFullError
    from paged_kv.models.llama import forward
    from paged_kv.transfer import TransferSender

    cfg, params, spec = model()
    manager = pk.KVCacheManager(spec, prefix_cache=True)
    cache = pk.PagedKVCache.init(spec)
    step = jax.jit(lambda p, c, t, m: forward(cfg, p, c, t, m, last_only=True), donate_argnums=1,
                   compiler_options=FAST_COMPILE)
    sender = TransferSender(manager, timeout=30.0)

    def run(rid: int, prompt: list[int]) -> int:
        nonlocal cache
        cached = manager.admit_prompt(rid, prompt)
        meta = manager.step_metadata([rid], [len(prompt) - cached])
        tokens = np.zeros((meta.batch_size, meta.query_len), np.int32)
        tokens[0, : len(prompt) - cached] = prompt[cached:]
        logits, cache = step(params, cache, jnp.asarray(tokens), meta.to_device())
        manager.commit([rid])
        return int(np.argmax(np.asarray(logits)[0]))

    if args.warmup:  # compile every prefill shape (tokens x table width buckets) and transfer size
        warm, warm_cache, shapes = pk.KVCacheManager(spec, prefix_cache=True), pk.PagedKVCache.init(spec), set()
        for n in range(1, MAX_LEN // 2 + 1):
            for cached in range(0, n, BLOCK):  # a prefix hit leaves n - cached tokens to compute
                shape = (pk.bucket(n - cached, MAX_LEN), pk.bucket(spec.blocks_for(n), spec.max_blocks_per_seq))
                if shape not in shapes:
                    shapes.add(shape)
                    warm.admit(0, n)
                    meta = warm.step_metadata([0], [n - cached])
                    tokens = np.zeros((meta.batch_size, meta.query_len), np.int32)
                    _, warm_cache = step(params, warm_cache, jnp.asarray(tokens), meta.to_device())
                    warm.release(0)
        for n in (1, 2, 3, 7, 15, 31):
            rid = 10**6 + n
            run(rid, list(range(3, 3 + n)))
            sender.send(cache, rid, list(range(3, 3 + n)), args.to, info={"warmup": True})
    requests = workload(args.requests, args.seed, args.gap)
    start = time.time()  # the first arrival: after the warm-up
    ttft, sent_s, retries = {}, {}, 0
    for r in requests:
        time.sleep(max(0.0, start + r["arrival"] - time.time()))
        first = run(r["id"], r["prompt"])
        ttft[r["id"]] = time.time() - (start + r["arrival"])
        while True:
            try:
                sent = sender.send(cache, r["id"], r["prompt"], args.to,
                                   info={"first_token": first, "max_new": r["max_new"]})
                break
            except ReceiverFullError:  # the decode pool is full for now: nothing is held; retry
                retries += 1
                time.sleep(0.05)
        sent_s[r["id"]] = sent.seconds
    manager.check_integrity()
    sender.close()
    return {"ttft": ttft, "transfer_s": sent_s, "retries": retries, "integrity": "ok",
            "used_blocks": manager.num_used_blocks, "start": start}


# ---- the parent: both processes, then the single-process reference ------------------------------
def _start(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def _line(proc: subprocess.Popen, until: float) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], max(0.0, until - time.monotonic()))
    line = proc.stdout.readline() if ready else ""
    if not line:
        proc.kill()
        raise RuntimeError(f"process gave no output in time: {proc.stderr.read()[-3000:]}")
    return line


def serve(requests: int = 8, seed: int = 0, gap: float = 0.15, timeout: float = 120.0, warmup: bool = True) -> dict:
    """Run the two processes over ``requests`` requests; returns what each reported."""
    until = time.monotonic() + timeout
    common = ["--requests", str(requests), "--seed", str(seed), "--gap", str(gap), "--timeout", str(timeout)]
    common += ["--warmup"] if warmup else []
    procs = []
    try:
        dec = _start(["--role", "decode", *common])
        procs.append(dec)
        address = json.loads(_line(dec, until))["address"]
        pre = _start(["--role", "prefill", "--to", address, *common])
        procs.append(pre)
        prefill_out = json.loads(_line(pre, until))
        decode_out = json.loads(_line(dec, until))
        for p in procs:
            p.wait(max(1.0, until - time.monotonic()))
        return {"prefill": prefill_out, "decode": decode_out}
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(10)


def single_process(requests: list[dict], warmup: bool = True):
    """The same requests generated by one `Generator` (prefill and decode in one cache)."""
    from paged_kv.models.generate import Generator, Request

    cfg, params, spec = model()
    gen = Generator(cfg, params, spec, compiler_options=FAST_COMPILE)
    reqs = [Request(r["prompt"], r["max_new"], request_id=r["id"], arrival_step=int(r["arrival"] / 0.02))
            for r in requests]
    if warmup:
        gen.generate(reqs)
    return gen.generate(reqs)


def summary(out: dict, requests: list[dict], reference=None) -> dict:
    pre, dec = out["prefill"], out["decode"]
    start = pre["start"]
    generated = sum(len(t) for t in dec["tokens"].values())
    elapsed = dec["finished"] - start
    first_step = [dec["first_decoded"][str(r["id"])] - (start + r["arrival"]) for r in requests
                  if str(r["id"]) in dec["first_decoded"]]
    result = {
        "requests": len(requests), "generated_tokens": generated,
        "disaggregated": {"tokens_per_s": generated / elapsed, "decode_tokens_per_s": dec["stats"]["decode_tokens_per_s"],
                          "ttft_median_s": float(np.median(list(pre["ttft"].values()))),
                          "first_decode_step_median_s": float(np.median(first_step)) if first_step else None,
                          "transfer_median_s": float(np.median(list(pre["transfer_s"].values()))),
                          "receiver_full_retries": pre["retries"]},
        "integrity": {"prefill": pre["integrity"], "decode": dec["integrity"],
                      "blocks_held_after": [pre["used_blocks"], dec["used_blocks"]]},
    }
    if reference is not None:
        completions, stats = reference
        want = {str(c.request_id): c.tokens for c in completions}
        result["tokens_equal"] = want == dec["tokens"]
        result["single_process"] = {"tokens_per_s": stats.tokens_per_s, "decode_tokens_per_s": stats.decode_tokens_per_s}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--role", choices=("main", "prefill", "decode"), default="main")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gap", type=float, default=0.15, help="mean seconds between arrivals")
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--warmup", action="store_true", help="compile before the clock starts")
    parser.add_argument("--check", action="store_true", help="compare with single-process generation")
    parser.add_argument("--to", help="(prefill) the decode process's address")
    args = parser.parse_args(argv)
    if args.role == "decode":
        print(json.dumps(decode(args)), flush=True)
        return 0
    if args.role == "prefill":
        print(json.dumps(prefill(args)), flush=True)
        return 0
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    requests = workload(args.requests, args.seed, args.gap)
    out = serve(args.requests, args.seed, args.gap, args.timeout, warmup=True)
    result = summary(out, requests, single_process(requests) if args.check else None)
    print(json.dumps(result, indent=1))
    return 0 if result.get("tokens_equal", True) else 1


if __name__ == "__main__":
    sys.exit(main())
