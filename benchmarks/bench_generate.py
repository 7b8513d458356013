"""Greedy generation throughput: paged_kv's `Generator` against transformers, and its time to first token.

Three parts, in one run (each prints its figures; the final JSON line holds them all):

1. **Against transformers** (issue 26 item 4), on a ~32M-parameter Llama written by
   `make_bench_model.py` from a seeded config (hidden 512, 8 layers, vocabulary 32,000;
   outside the repository, made on first use): the same prompts (seeded random token ids,
   8-40 tokens, 64 new tokens each) served by paged_kv's `Generator` and, in a
   subprocess with a Python that has torch and transformers (``--peer-python``), by
   transformers' continuous batching (`generate_batch`, its paged cache) and its padded
   `generate`, at decode batch 32 and batch 1, all in float32. Every request's greedy
   tokens are compared across the three; a mismatch is printed and counted in the JSON,
   never hidden. Each side first serves a warm-up set (prompts covering every prefill
   shape and context length, so paged_kv's timed runs reuse compiled steps; shorter
   requests on transformers' side, which compiles nothing), then the timed sets; figures
   are medians of end-to-end tokens/s (generated tokens over the wall time of serving a
   set, prefill included), and ratios paged_kv ÷ transformers. Aims: ≥ 2× continuous
   batching at batch 32, ≥ 1× at batch 1.
2. **Time to first token of a second process**, one request in a fresh process as
   ``paged-kv generate`` runs it: JAX's persistent compilation cache on (every
   compilation kept) and the Generator's steps stored beside it (``program_cache``), on
   a new folder: the first process compiles (cold), the second reads the steps back
   (warm); not with ``--quick``, two more with JAX's cache alone (a warm one traces and
   lowers the steps). Timed from the parent's start of the process to the first generated token
   (`GenerationStats.first_token_seconds` where the Generator reports it; else when its
   progress callback first sees a token, after the first loop iteration, which holds
   the prefill and the first decode step: both are in the JSON). Aim: ≤ 1.5 s warm.
3. **Batch sweep on the test fixture** (a 2-layer, 64-wide Llama, whose step cost is
   dispatch and host bookkeeping, not FLOPs): 32 requests of 32 new tokens at several
   decode batches; batch 1, measured in the same process, is the baseline.

transformers and torch are benchmark-only dependencies (benchmarks/PEERS.md): without an
interpreter that imports them part 1 reports paged_kv alone and says why in the JSON.
``--quick`` (what `run_all.py` runs) uses fewer timed sets and requests.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
from _report import finish_report, start_report

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
FIXTURE = ROOT / "tests" / "fixtures" / "hf" / "llama"
PROMPT_LENGTHS = (8, 40)
COVER = (8, 16, 32, 40)
"""Warm-up prompt lengths that reach every prefill bucket (powers of two) a prompt of
8-40 tokens can take, so no timed run compiles."""
AIMS = {"32": 2.0, "1": 1.0}
"""paged_kv ÷ transformers' continuous batching, by batch (issue 26 item 4)."""
TTFT_AIM_S = 1.5
MODES = (("continuous", "continuous batching, generate_batch per set"),
         ("continuous_manager", "continuous batching, one running manager"),
         ("padded", "padded generate"))
"""transformers' sides (`_hf_peer.py`)."""


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def prompts(vocab: int, n: int, seed: int, cover: bool = False, longest: bool = False) -> list[list[int]]:
    """``n`` seeded random prompts of 8-40 token ids (3 and up: no special tokens);
    ``cover``: the first ones take the lengths of `COVER`; ``longest``: one of them
    (at a random place) is 40 tokens long."""
    rng = np.random.default_rng(seed)
    lengths = [int(rng.integers(PROMPT_LENGTHS[0], PROMPT_LENGTHS[1] + 1)) for _ in range(n)]
    if cover:
        lengths[: len(COVER)] = COVER[:n]
    if longest:
        lengths[int(rng.integers(n))] = PROMPT_LENGTHS[1]
    return [rng.integers(3, vocab, m).tolist() for m in lengths]


def _spec(cfg, batch: int, max_prompt: int, new: int, dtype: str = "float32", block: int = 16):
    """A pool that holds ``batch`` sequences of ``max_prompt + new`` tokens, with a
    block of headroom each (no preemption)."""
    from paged_kv.models.llama import cache_spec

    longest = max_prompt + new
    num_blocks = batch * (-(-longest // block) + 1) + 1  # + the null block
    return cache_spec(cfg, num_blocks=num_blocks, block_size=block, max_seq_len=longest, max_batch_slots=batch,
                      dtype=dtype)


# ---- part 3: the batch sweep on the fixture -------------------------------------------------
def sweep_point(cfg, params, batch: int, args) -> dict:
    from paged_kv.models.generate import Generator, Request
    from paged_kv.models.llama import cache_spec

    def requests(seed, cover=False):
        return [Request(p, args.sweep_new_tokens) for p in prompts(cfg.vocab_size, args.requests, seed, cover)]

    spec = cache_spec(cfg, num_blocks=args.num_blocks, block_size=16, max_seq_len=40 + args.sweep_new_tokens,
                      max_batch_slots=batch, dtype=args.dtype)
    gen = Generator(cfg, params, spec)
    gen.generate(requests(1000 + batch, cover=True))  # compiles
    runs = [gen.generate(requests(r))[1] for r in range(args.sweep_repeats)]
    return dict(
        batch=batch,
        tokens_per_s=statistics.median(s.tokens_per_s for s in runs),
        decode_tokens_per_s=statistics.median(s.decode_tokens_per_s for s in runs),
        kv_usage_mean=statistics.median(s.kv_usage_mean for s in runs),
        kv_usage_peak=max(s.kv_usage_peak for s in runs),
        preemptions=sum(s.preemptions for s in runs),
        compilations_in_timed_runs=sum(s.compilations for s in runs),
        steps=runs[0].prefill_steps + runs[0].decode_steps,
    )


def sweep(args) -> list[dict]:
    from paged_kv.models.loader import load_model

    cfg, params = load_model(args.sweep_checkpoint, dtype=args.dtype)
    rows = [sweep_point(cfg, params, int(b), args) for b in args.sweep_batches.split(",")]
    base = rows[0]
    print(f"-- batch sweep on {args.sweep_checkpoint} ({args.requests} requests, {args.sweep_new_tokens} new tokens, "
          f"median of {args.sweep_repeats})")
    for row in rows:
        row["speedup_tokens_per_s"] = row["tokens_per_s"] / base["tokens_per_s"]
        print(f"batch {row['batch']:3d}: {row['tokens_per_s']:8.1f} tokens/s end to end "
              f"({row['speedup_tokens_per_s']:.2f}x batch {base['batch']}), {row['decode_tokens_per_s']:8.1f} in "
              f"decode steps; KV usage mean {row['kv_usage_mean']:.1%} peak {row['kv_usage_peak']:.1%}; "
              f"{row['preemptions']} preemptions, {row['compilations_in_timed_runs']} compilations in timed runs")
    return rows


# ---- part 1: against transformers -----------------------------------------------------------
def workload(vocab: int, args) -> list[dict]:
    """Per batch: the warm-up prompts and the timed sets (the same for every side)."""
    runs = []
    for batch in (int(b) for b in args.batches.split(",")):
        n = batch if batch > 1 else args.batch1_requests
        runs.append({"batch": batch,
                     "warmup": prompts(vocab, max(batch, len(COVER)), 1000 + batch, cover=True),
                     # A batch's prompts are prefilled together, padded to the longest one's bucket:
                     # each set holds a 40-token prompt, as the warm-up did (no compilation when timed).
                     "timed": [prompts(vocab, n, 10 * batch + r, longest=batch > 1) for r in range(args.repeats)]})
    return runs


def paged_side(cfg, params, runs: list[dict], args) -> list[dict]:
    from paged_kv.models.generate import Generator, Request

    out = []
    for run in runs:
        longest = max(len(p) for group in [run["warmup"], *run["timed"]] for p in group)
        gen = Generator(cfg, params, _spec(cfg, run["batch"], longest, args.new_tokens))
        t0 = time.perf_counter()
        # Compiles every step shape: the full new tokens, since the decode step's block tables
        # grow with the longest context (a shorter warm-up left a compilation in the timed runs).
        gen.generate([Request(p, args.new_tokens) for p in run["warmup"]])
        warmup_s = time.perf_counter() - t0
        seconds, tokens, compilations, decode = [], [], 0, []
        for group in run["timed"]:
            t0 = time.perf_counter()
            completions, stats = gen.generate([Request(p, args.new_tokens) for p in group])
            seconds.append(time.perf_counter() - t0)
            tokens.append([list(map(int, c.tokens)) for c in completions])
            compilations += stats.compilations
            decode.append(stats.decode_tokens_per_s)
        out.append({"batch": run["batch"], "seconds": seconds, "tokens": tokens, "warmup_s": round(warmup_s, 2),
                    "compilations_in_timed_runs": compilations,
                    "decode_tokens_per_s": statistics.median(decode)})
    return out


def find_peer(requested: str | None) -> tuple[str | None, str | None]:
    """``(python, None)`` for the transformers side, or ``(None, why not)``."""
    if requested:
        return requested, None
    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        return None, (f"{' and '.join(missing)} not importable in {sys.executable} and no --peer-python given "
                      "(benchmark-only dependencies: benchmarks/PEERS.md)")
    return sys.executable, None


def peer_side(python: str, checkpoint: str, runs: list[dict], args) -> dict:
    """The transformers side's answer (`_hf_peer.py`), or ``{"error": ...}``."""
    job = {"checkpoint": checkpoint, "new_tokens": args.new_tokens, "warmup_new_tokens": args.warmup_new_tokens,
           "modes": [m for m, _ in MODES], "threads": args.peer_threads, "runs": runs}
    try:
        done = subprocess.run([python, str(HERE / "_hf_peer.py")], input=json.dumps(job), capture_output=True,
                              text=True, env=_env(), timeout=args.peer_timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"error": f"{python}: {type(exc).__name__}: {exc}"[:400]}
    for line in reversed(done.stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = " | ".join((done.stdout + done.stderr).strip().splitlines()[-3:])
    return {"error": f"{python} exited {done.returncode} with no answer: {tail}"[:600]}


def _tps(seconds: list[float], tokens: list[list[list[int]]]) -> float:
    return statistics.median(sum(map(len, t)) / s for s, t in zip(seconds, tokens))


def _compare(a: list[list[list[int]]], b: list[list[list[int]]]) -> tuple[int, int, list[dict]]:
    """(equal requests, requests, the first few mismatches: set, request, first differing position)."""
    equal, total, diffs = 0, 0, []
    for s, (xs, ys) in enumerate(zip(a, b)):
        for r, (x, y) in enumerate(zip(xs, ys)):
            total += 1
            if x == y:
                equal += 1
                continue
            pos = next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
            if len(diffs) < 5:
                diffs.append({"set": s, "request": r, "position": pos, "paged_kv": x[pos: pos + 3],
                              "other": y[pos: pos + 3], "lengths": [len(x), len(y)]})
    return equal, total, diffs


def versus(args) -> dict:
    import make_bench_model
    from paged_kv.models.loader import load_model

    checkpoint = args.checkpoint or str(make_bench_model.make())
    cfg, params = load_model(checkpoint, dtype="float32")
    out = {"checkpoint": checkpoint, "parameters": make_bench_model.parameters() if not args.checkpoint else None,
           "new_tokens": args.new_tokens, "prompt_lengths": list(PROMPT_LENGTHS), "timed_sets": args.repeats,
           "dtype": "float32"}
    runs = workload(cfg.vocab_size, args)
    python, why = find_peer(args.peer_python)
    # Batch by batch, paged_kv then transformers (a process each batch), so the two sides of a
    # ratio run minutes apart at most on a machine whose load drifts.
    paged, peer, loads = [], {"error": why} if python is None else {"runs": []}, {}
    for run in runs:
        load0 = os.getloadavg()
        paged += paged_side(cfg, params, [run], args)
        loads[f"paged_kv_batch_{run['batch']}"] = [round(x, 2) for x in load0 + os.getloadavg()]
        if python is None or "error" in peer:
            continue
        load0 = os.getloadavg()
        answer = peer_side(python, checkpoint, [run], args)
        loads[f"transformers_batch_{run['batch']}"] = [round(x, 2) for x in load0 + os.getloadavg()]
        if "error" in answer:
            peer = answer
        else:
            peer = {**answer, "runs": peer["runs"] + answer["runs"]}
    out["loadavg_start_end"] = loads
    del params
    out["transformers"] = {k: v for k, v in peer.items() if k != "runs"}
    if "error" in peer:
        print(f"-- transformers side skipped: {peer['error']}")
    print(f"-- vs transformers on {checkpoint}: {args.new_tokens} new tokens, median of {args.repeats} timed sets"
          + (f"; transformers {peer['versions']['transformers']}, torch {peer['versions']['torch']}"
             if "versions" in peer else ""))
    out["batches"] = {}
    for run, mine, theirs in zip(runs, paged, peer.get("runs", [{}] * len(runs))):
        b = run["batch"]
        row = {"requests_per_set": len(run["timed"][0]), "paged_kv_tokens_per_s": _tps(mine["seconds"], mine["tokens"]),
               "paged_kv_decode_tokens_per_s": mine["decode_tokens_per_s"], "paged_kv_seconds": mine["seconds"],
               "paged_kv_warmup_s": mine["warmup_s"],
               "compilations_in_timed_runs": mine["compilations_in_timed_runs"]}
        if "torch_threads" in theirs:
            row["torch_threads"] = theirs["torch_threads"]
        threads = row.get("torch_threads", {}).get("threads", peer.get("torch_threads"))
        print(f"batch {b:2d}: paged_kv {row['paged_kv_tokens_per_s']:7.1f} tokens/s ({row['requests_per_set']} "
              f"request(s) a set; {row['compilations_in_timed_runs']} compilations in its timed runs)"
              + (f"; torch on {threads} thread(s)" if threads else ""))
        for mode, label in MODES:
            side = theirs.get(mode)
            if side is None:
                continue
            if "error" in side:
                row[f"{mode}_error"] = side["error"]
                print(f"    {label}: failed: {side['error']}")
                continue
            tps = _tps(side["seconds"], side["tokens"])
            equal, total, diffs = _compare(mine["tokens"], side["tokens"])
            row.update({f"{mode}_tokens_per_s": tps, f"ratio_{mode}": row["paged_kv_tokens_per_s"] / tps,
                        f"{mode}_seconds": side["seconds"], f"equal_{mode}": f"{equal}/{total}"})
            if diffs:
                row[f"mismatches_{mode}"] = diffs
            if mode == "continuous":
                row["attn_implementation"] = side.get("attn_implementation")
                row["continuous_config"] = side.get("config")
            print(f"    {label:48s} {tps:7.1f} tokens/s: paged_kv {row[f'ratio_{mode}']:.2f}x; greedy tokens equal "
                  f"in {equal}/{total} requests" + ("" if equal == total else "  MISMATCH"))
            for d in diffs:
                print(f"      MISMATCH: set {d['set']} request {d['request']} differs from token {d['position']}: "
                      f"paged_kv {d['paged_kv']} vs {d['other']}")
        ratios = [row[k] for k in ("ratio_continuous", "ratio_continuous_manager") if k in row]
        if ratios and str(b) in AIMS:
            # against the faster of transformers' two ways of running its continuous batching
            row.update(ratio_continuous_best=min(ratios), aim_ratio_continuous=AIMS[str(b)],
                       aim_met=min(ratios) >= AIMS[str(b)])
            print(f"    aim: >= {AIMS[str(b)]:.1f}x transformers' continuous batching (the faster way): "
                  f"{min(ratios):.2f}x, {'met' if row['aim_met'] else 'NOT met'}")
        out["batches"][str(b)] = row
    return out


# ---- part 2: time to first token of a second process ---------------------------------------
def ttft_child(checkpoint: str, cache_dir: str, batch: int, new: int, programs: bool = True) -> None:
    """The measured process: persistent compilation cache on (and the Generator's stored
    programs, unless ``programs`` is false), load, one request."""
    import jax

    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    marks = {"imported_jax": time.time()}
    from paged_kv.models.generate import Generator, Request
    from paged_kv.models.loader import load_model

    marks["imported"] = time.time()
    cfg, params = load_model(checkpoint, dtype="float32")
    marks["loaded"] = time.time()
    prompt = prompts(cfg.vocab_size, 1, 7)[0]
    gen = Generator(cfg, params, _spec(cfg, batch, PROMPT_LENGTHS[1], new),
                    program_cache=os.path.join(cache_dir, "paged_kv-programs") if programs else None)
    marks["built"] = time.time()

    def progress(done, total, stats) -> None:
        if "first_token" not in marks and stats.generated_tokens:
            marks["first_token"] = time.time()

    _, stats = gen.generate([Request(prompt, new)], progress)
    marks["done"] = time.time()
    exact = getattr(stats, "first_token_seconds", 0) or None  # the Generator's own figure, where it has one
    print(json.dumps({"marks": marks, "compilations": stats.compilations, "generated": stats.generated_tokens,
                      "loaded_programs": stats.loaded_programs, "first_token_seconds_stats": exact}), flush=True)


def ttft(checkpoint: str, args) -> dict:
    caches = [tempfile.mkdtemp(prefix="paged_kv-bench-jax-cache-") for _ in range(2)]
    out: dict = {"checkpoint": checkpoint, "batch_slots": args.ttft_batch, "new_tokens": args.ttft_new_tokens,
                 "aim_warm_s": TTFT_AIM_S}
    runs = ("cold", "warm") + (() if args.quick else ("cold_jax_only", "warm_jax_only"))
    try:
        for which in runs:
            t0, cache = time.time(), caches["jax_only" in which]
            done = subprocess.run([sys.executable, str(HERE / "bench_generate.py"), "--ttft-child", checkpoint, cache,
                                   str(args.ttft_batch), str(args.ttft_new_tokens), str("jax_only" not in which)],
                                  capture_output=True, text=True, env=_env(), timeout=600)
            wall = time.time() - t0
            line = next((x for x in reversed(done.stdout.splitlines()) if x.startswith("{")), None)
            if line is None:
                tail = " | ".join((done.stdout + done.stderr).strip().splitlines()[-3:])
                out[which] = {"error": f"exit {done.returncode}: {tail}"[:400]}
                continue
            child = json.loads(line)
            marks = {k: round(v - t0, 3) for k, v in child["marks"].items()}
            out[which] = {"first_token_s": marks.get("first_token"), "process_s": round(wall, 2), "marks_s": marks,
                          "compilations": child["compilations"], "loaded_programs": child["loaded_programs"],
                          "loadavg": [round(x, 2) for x in os.getloadavg()],
                          "cache_entries": sum(1 for _ in pathlib.Path(cache).rglob("*") if _.is_file())}
            if child.get("first_token_seconds_stats"):
                out[which]["first_token_s_from_stats"] = round(marks["built"] + child["first_token_seconds_stats"], 3)
    finally:
        for cache in caches:
            shutil.rmtree(cache, ignore_errors=True)
    # the Generator's own figure where it has one (the prefill's token), else the progress one
    warm, cold, jax_only = (out.get(w, {}).get("first_token_s_from_stats", out.get(w, {}).get("first_token_s"))
                            for w in ("warm", "cold", "warm_jax_only"))
    out.update(warm_s=warm, cold_s=cold, warm_jax_only_s=jax_only)
    out["source"] = ("GenerationStats.first_token_seconds" if "first_token_s_from_stats" in out.get("warm", {})
                     else "the first progress callback with a token (prefill and one decode step)")
    out["aim_met"] = None if warm is None else warm <= TTFT_AIM_S
    for which in runs:
        d = out[which]
        if "error" in d:
            print(f"time to first token, {which} cache: failed ({d['error']})")
            continue
        m = d["marks_s"]
        exact = (f" ({d['first_token_s_from_stats']:.2f} s by GenerationStats.first_token_seconds)"
                 if "first_token_s_from_stats" in d else "")
        label = {"cold": "cold caches", "warm": "warm caches (stored programs read back)",
                 "cold_jax_only": "JAX's cache alone, cold"}.get(which, "JAX's cache alone, warm (steps traced)")
        print(f"time to first token, {label}: {d['first_token_s']:.2f} s from the process's start "
              f"to the first progress callback{exact} "
              f"(jax imported {m['imported_jax']:.2f}, paged_kv {m['imported']:.2f}, model loaded {m['loaded']:.2f}, "
              f"generator built {m['built']:.2f}; whole process {d['process_s']:.2f} s, {d['compilations']} "
              f"compilations, {d['loaded_programs']} programs read back, {d['cache_entries']} cache files after it; "
              f"load average {d['loadavg'][0]:.2f})")
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--ttft-child":
        ckpt, cache, batch, new, programs = sys.argv[2:7]
        return ttft_child(ckpt, cache, int(batch), int(new), programs == "True")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", help="the model to compare on (default: make_bench_model.py's, made if missing)")
    ap.add_argument("--peer-python", default=os.environ.get("PEER_PYTHON"),
                    help="a Python that imports torch and transformers (default: this one if it does, else the "
                    "transformers side is skipped; benchmarks/PEERS.md)")
    ap.add_argument("--quick", action="store_true", help="fewer timed sets and requests (what run_all.py runs)")
    ap.add_argument("--batches", default="32,1", help="decode batches of the comparison")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--warmup-new-tokens", type=int, default=8,
                    help="new tokens per warm-up request on transformers' side (paged_kv's warm-up generates "
                    "--new-tokens: its step shapes depend on the context length)")
    ap.add_argument("--repeats", type=int, help="timed sets per batch (default 5, quick 3)")
    ap.add_argument("--batch1-requests", type=int, help="requests per timed set at batch 1 (default 4, quick 1)")
    ap.add_argument("--peer-threads", type=int, default=-1,
                    help="torch threads: 0 torch's default (every core), -1 the faster of that and 1 per batch, "
                    "probed on the warm-up prompts (on a busy shared machine one thread can be several times faster)")
    ap.add_argument("--peer-timeout", type=int, default=1200)
    ap.add_argument("--ttft-batch", type=int, default=32, help="decode slots of the time-to-first-token generator")
    ap.add_argument("--ttft-new-tokens", type=int, default=16)
    ap.add_argument("--skip", default="", help="comma-separated parts to leave out: versus, ttft, sweep")
    ap.add_argument("--sweep-checkpoint", default=str(FIXTURE))
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="of the sweep")
    ap.add_argument("--requests", type=int, default=32, help="requests per sweep run")
    ap.add_argument("--sweep-new-tokens", type=int, default=32)
    ap.add_argument("--sweep-batches", help="the sweep's decode batches, the first the baseline (default "
                    "1,8,32; quick 1,32)")
    ap.add_argument("--num-blocks", type=int, default=129, help="the sweep's pool blocks of 16 tokens, null included")
    ap.add_argument("--sweep-repeats", type=int, help="(default 3, quick 1)")
    args = ap.parse_args()
    q = args.quick
    args.repeats = args.repeats or (3 if q else 5)
    args.batch1_requests = args.batch1_requests or (1 if q else 4)
    args.sweep_batches = args.sweep_batches or ("1,32" if q else "1,8,32")
    args.sweep_repeats = args.sweep_repeats or (1 if q else 3)
    skip = {s for s in args.skip.split(",") if s}
    out = start_report(quick=q, new_tokens=args.new_tokens, repeats=args.repeats)
    if "versus" not in skip:
        out["vs_transformers"] = versus(args)
    if "ttft" not in skip:
        import make_bench_model

        out["ttft"] = ttft(args.checkpoint or str(make_bench_model.make()), args)
    if "sweep" not in skip:
        out.update(checkpoint=args.sweep_checkpoint, dtype=args.dtype, requests=args.requests,
                   sweep_new_tokens=args.sweep_new_tokens, sweep_repeats=args.sweep_repeats)
        out["runs"] = sweep(args)
    out["host"]["loadavg_now"] = [round(x, 2) for x in os.getloadavg()]
    print(f"load average at the start {[round(x, 2) for x in out['host']['loadavg_start']]}, "
          f"now {out['host']['loadavg_now']} ({out['host']['cpus']} CPUs)")
    finish_report(out)


if __name__ == "__main__":
    main()
