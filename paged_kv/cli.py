"""Command line: ``paged-kv simulate`` (or ``python -m paged_kv simulate``).

The defaults model one serving replica of an 8B-class model (32 layers, 8 KV heads
of dim 128, bfloat16: 128 KiB of KV per token) with a 16 GiB KV pool. That pool
holds ~131k tokens, fewer than 256 of the trace's average requests need, so memory
rather than the batch limit decides how many sequences run: the regime where the
allocator matters.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from paged_kv.errors import SpecError, TraceError
from paged_kv.sim.simulate import SimulationError, simulate
from paged_kv.sim.trace import BUNDLED_ATTRIBUTION, load_trace
from paged_kv.spec import CacheSpec

# The model shape only sets how many bytes the pool stands for; the simulation
# itself is host-only bookkeeping and allocates no device memory.
MODEL = dict(num_layers=32, num_kv_heads=8, head_dim=128, dtype="bfloat16")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{value} must be in [0, 1)")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="paged-kv", description="Paged-block KV cache manager tools.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sim = commands.add_parser(
        "simulate",
        help="replay a request trace through the block allocator",
        description="Replay a request trace through a KVCacheManager with continuous batching "
        "(offline: all requests queued at once) and report memory use and preemptions.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sim.add_argument("--trace", metavar="PATH", help="trace CSV (TIMESTAMP,ContextTokens,GeneratedTokens); "
                     "default: the bundled Azure LLM conversation trace 2023")
    sim.add_argument("--limit", type=_positive_int, metavar="N", help="replay only the first N requests")
    sim.add_argument("--block-size", type=_positive_int, default=16, help="tokens per block")
    sim.add_argument("--num-blocks", type=_positive_int, default=8192, help="blocks in the pool, null block included")
    sim.add_argument("--max-blocks-per-seq", type=_positive_int, default=1024,
                     help="blocks one sequence may hold (x block size = max_seq_len)")
    sim.add_argument("--max-batch", type=_positive_int, default=256, help="most sequences decoding in one step")
    sim.add_argument("--watermark", type=_fraction, default=0.01,
                     help="fraction of the pool admission keeps free for running sequences to grow")
    sim.add_argument("--json", action="store_true", help="print the report as one JSON line")
    # So that an inconsistent option combination is reported with this
    # subcommand's usage line, as argparse reports a single bad option.
    sim.set_defaults(subparser=sim)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 for a bad trace, as for bad arguments)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        spec = CacheSpec(num_blocks=args.num_blocks, block_size=args.block_size,
                         max_blocks_per_seq=args.max_blocks_per_seq, max_batch_slots=args.max_batch, **MODEL)
    except SpecError as exc:
        args.subparser.error(str(exc))  # exits 2 with the usage line, like any other bad option
    try:
        trace = load_trace(args.trace)
    except TraceError as exc:
        print(f"paged-kv: error: {exc}", file=sys.stderr)
        return 2
    if args.limit is not None:
        trace = trace.head(args.limit)
    try:
        report = simulate(trace, spec, max_batch=args.max_batch, watermark=args.watermark)
    except SimulationError as exc:
        print(f"paged-kv: error: {exc}", file=sys.stderr)
        return 2

    # CC-BY 4.0 asks for the credit wherever results from the bundled trace appear.
    source = BUNDLED_ATTRIBUTION if args.trace is None else f"Trace: {args.trace}"
    if args.json:
        print(json.dumps({"trace": source, "requests": len(trace), "block_size": spec.block_size,
                          "num_blocks": spec.num_blocks, "pool_bytes": spec.pool_bytes, **report.as_dict()}))
        return 0
    print(source)
    print(f"Requests: {len(trace):,}   max_seq_len: {spec.max_seq_len:,}   max batch: {args.max_batch}")
    print(f"KV pool: {spec.describe()} ({spec.pool_bytes / 2**30:.2f} GiB, {spec.usable_blocks * spec.block_size:,} token slots)")
    print()
    print(report.format())
    return 0


__all__ = ["build_parser", "main"]
