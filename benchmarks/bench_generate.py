"""Greedy generation throughput of a Hugging Face checkpoint through the paged cache.

The same requests (seeded random prompts of 8-40 tokens, 32 new tokens each) are
served by `paged_kv.models.generate.Generator` with decode batches of several sizes;
batch 1 (one sequence at a time) is the baseline measured in the same process. Each
configuration first serves a warm-up set of different prompts on the same generator
(so the timed runs reuse its compiled steps), then the timed set ``--repeats`` times
with fresh prompts; figures are medians. Default checkpoint: the test fixture (a
2-layer, 64-wide Llama), whose step cost is dispatch and host bookkeeping, not FLOPs.

Prints a final JSON line.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics

import numpy as np
from _report import finish_report, start_report

from paged_kv.models.generate import Generator, Request
from paged_kv.models.llama import cache_spec
from paged_kv.models.loader import load_model

ROOT = pathlib.Path(__file__).resolve().parents[1]


def requests(cfg, n: int, new: int, seed: int) -> list[Request]:
    rng = np.random.default_rng(seed)
    return [Request(rng.integers(3, cfg.vocab_size, int(rng.integers(8, 41))).tolist(), new) for _ in range(n)]


def measure(cfg, params, batch: int, args) -> dict:
    spec = cache_spec(cfg, num_blocks=args.num_blocks, block_size=16, max_seq_len=40 + args.new_tokens,
                      max_batch_slots=batch, dtype=args.dtype)
    gen = Generator(cfg, params, spec)
    gen.generate(requests(cfg, args.requests, args.new_tokens, seed=1000 + batch))  # compiles
    runs = [gen.generate(requests(cfg, args.requests, args.new_tokens, seed=r))[1] for r in range(args.repeats)]
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=str(ROOT / "tests" / "fixtures" / "hf" / "llama"))
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batches", default="1,8,32", help="decode batch sizes; the first is the baseline")
    ap.add_argument("--num-blocks", type=int, default=129, help="pool blocks of 16 tokens, null block included")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    out = start_report(checkpoint=args.checkpoint, dtype=args.dtype, requests=args.requests,
                       new_tokens=args.new_tokens, repeats=args.repeats)
    cfg, params = load_model(args.checkpoint, dtype=args.dtype)
    rows = [measure(cfg, params, int(b), args) for b in args.batches.split(",")]
    base = rows[0]
    for row in rows:
        row["speedup_tokens_per_s"] = row["tokens_per_s"] / base["tokens_per_s"]
        print(f"batch {row['batch']:3d}: {row['tokens_per_s']:8.1f} tokens/s end to end "
              f"({row['speedup_tokens_per_s']:.2f}x batch {base['batch']}), {row['decode_tokens_per_s']:8.1f} in "
              f"decode steps; KV usage mean {row['kv_usage_mean']:.1%} peak {row['kv_usage_peak']:.1%}; "
              f"{row['preemptions']} preemptions, {row['compilations_in_timed_runs']} compilations in timed runs")
    out["runs"] = rows
    finish_report(out)


if __name__ == "__main__":
    main()
