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
import os
import sys
from collections.abc import Sequence

from paged_kv.errors import PagedKVError, SpecError, TraceError
from paged_kv.sim.progress import ProgressBar
from paged_kv.sim.scheduler import ARRIVALS, SchedulerConfig, SimulationError
from paged_kv.sim.simulate import compare, format_table, simulate
from paged_kv.sim.trace import BUNDLED_ATTRIBUTION, load_trace
from paged_kv.spec import CacheSpec

# The model shape only sets how many bytes the pool stands for; the simulation
# itself is host-only bookkeeping and allocates no device memory.
MODEL = dict(num_layers=32, num_kv_heads=8, head_dim=128, dtype="bfloat16")

BUNDLED = "azure-conv"
SYNTHETIC = "synthetic"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def _number(low: float, high: float | None = None):
    """An argparse type: a float in [low, high), or >= low when ``high`` is None."""

    def number(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (value >= low and (high is None or value < high)):  # NaN fails both
            bound = f"in [{low}, {high})" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"{value} must be {bound}")
        return value

    return number


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="paged-kv", description="Paged-block KV cache manager tools.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sim = commands.add_parser(
        "simulate",
        help="replay a request trace through the block allocator",
        description="Replay a request trace through a KVCacheManager with continuous batching and "
        "profile memory: utilization, fragmentation, concurrency, preemptions. With --compare, "
        "replay it over contiguous caches at equal memory too.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sim.add_argument("--trace", default=BUNDLED, metavar="azure-conv|synthetic|FILE",
                     help="the bundled Azure LLM conversation trace 2023, a seeded synthetic trace "
                     "(bursts, long outliers, cancellations), or a CSV file (TIMESTAMP,ContextTokens,"
                     "GeneratedTokens[,CancelAfterTokens])")
    sim.add_argument("--requests", type=_positive_int, default=5000, help="requests in a synthetic trace")
    sim.add_argument("--seed", type=int, default=0, help="seed of a synthetic trace")
    sim.add_argument("--limit", type=_positive_int, metavar="N", help="replay only the first N requests")
    sim.add_argument("--block-size", type=_positive_int, default=16, help="tokens per block")
    sim.add_argument("--num-blocks", type=_positive_int, default=8192, help="blocks in the pool, null block included")
    sim.add_argument("--max-seq-len", type=_positive_int, default=16384,
                     help="tokens one sequence may hold (rounded up to whole blocks)")
    sim.add_argument("--max-batch", type=_positive_int, default=256, help="most sequences in one step")
    sim.add_argument("--token-budget", type=_positive_int, default=8192,
                     help="tokens one step may process: decodes plus prefill chunks")
    sim.add_argument("--watermark", type=_number(0.0, 1.0), default=0.01,
                     help="fraction of the pool admission keeps free for running sequences to grow")
    sim.add_argument("--arrivals", choices=ARRIVALS, default="offline",
                     help="offline: all requests wait at step 0 (sustained load); trace: at their arrival times")
    sim.add_argument("--step-ms", type=_number(1e-6), default=25.0,
                     help="model time of one step, for --arrivals trace")
    sim.add_argument("--speedup", type=_number(1e-6), default=1.0,
                     help="divide arrival times by this, for --arrivals trace")
    sim.add_argument("--preemption", choices=("recompute", "swap"), default="recompute",
                     help="when memory runs short, drop the newest sequence's blocks (recompute them later) "
                     "or copy them to host memory and back (swap)")
    sim.add_argument("--compare", action="store_true",
                     help="also replay over contiguous max-length buffers and a first-fit exact-length arena "
                     "with the same bytes")
    sim.add_argument("--plot", metavar="PNG", help="write utilization / blocks / running over time (needs matplotlib)")
    sim.add_argument("--series", metavar="CSV|JSON", help="write the per-step profile (.json, else CSV)")
    sim.add_argument("--json", action="store_true", help="print the figures as one JSON line")
    sim.add_argument("--progress", choices=("auto", "on", "off"), default="auto",
                     help="progress bar on stderr (auto: when stderr is a terminal)")
    # So that an inconsistent option combination is reported with this
    # subcommand's usage line, as argparse reports a single bad option.
    sim.set_defaults(subparser=sim)
    return parser


def _load(args) -> tuple:
    """The trace the arguments name and the credit line to print with its results."""
    if args.trace == BUNDLED:
        return load_trace(), BUNDLED_ATTRIBUTION
    if args.trace == SYNTHETIC:
        from paged_kv.sim.synthetic import synthetic_trace

        trace = synthetic_trace(args.requests, seed=args.seed, max_total_tokens=args.max_seq_len)
        return trace, f"Trace: synthetic ({args.requests:,} requests, seed {args.seed})"
    return load_trace(args.trace), f"Trace: {args.trace}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 for bad input, as for bad arguments)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        spec = CacheSpec(num_blocks=args.num_blocks, block_size=args.block_size,
                         max_blocks_per_seq=-(-args.max_seq_len // args.block_size),
                         max_batch_slots=args.max_batch, **MODEL)
        config = SchedulerConfig(max_batch=args.max_batch, token_budget=args.token_budget, watermark=args.watermark,
                                 arrivals=args.arrivals, step_s=args.step_ms / 1000, speedup=args.speedup,
                                 preemption=args.preemption)
    except (SpecError, SimulationError) as exc:
        args.subparser.error(str(exc))  # exits 2 with the usage line, like any other bad option
    if args.plot:
        from paged_kv.sim.plot import PlotUnavailableError, require_matplotlib

        try:
            require_matplotlib()  # before a long replay, not after it
        except PlotUnavailableError as exc:
            print(f"paged-kv: error: --plot: {exc}", file=sys.stderr)
            return 2
    try:
        trace, source = _load(args)
    except TraceError as exc:
        print(f"paged-kv: error: {exc}", file=sys.stderr)
        return 2
    if args.limit is not None:
        trace = trace.head(args.limit)

    show = args.progress == "on" or (args.progress == "auto" and sys.stderr.isatty())
    bars: dict[str, ProgressBar] = {}

    def progress(name: str, done: int, total: int) -> None:
        if name not in bars:
            if bars:
                list(bars.values())[-1].close()  # one line per backend's replay
            bars[name] = ProgressBar(f"{name:>20}")
        bars[name](done, total)

    try:
        if args.compare:
            reports = compare(trace, spec, config, progress=progress if show else None)
        else:
            reports = [simulate(trace, spec, config=config,
                                progress=(lambda d, t: progress("paged", d, t)) if show else None)]
    except (SimulationError, PagedKVError) as exc:
        print(f"paged-kv: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if bars:
            list(bars.values())[-1].close()

    series = {r.backend: r.series for r in reports}
    try:
        if args.series:
            from paged_kv.sim.profile import write_series

            write_series(args.series, series)
        if args.plot:
            from paged_kv.sim.plot import plot_series

            credit = "Azure LLM conversation trace 2023 (CC-BY 4.0)" if args.trace == BUNDLED else source
            plot_series(series, args.plot, title=f"{credit}: {len(trace):,} requests, "
                        f"{spec.pool_bytes / 2**30:.1f} GiB KV pool, block size {spec.block_size}")
    except OSError as exc:
        print(f"paged-kv: error: cannot write {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 2

    paged = reports[0]
    ratios = {f"mean_running_paged_over_{r.backend}": paged.mean_running / r.mean_running
              for r in reports[1:] if r.mean_running}
    # CC-BY 4.0 asks for the credit wherever results from the bundled trace appear.
    if args.json:
        out = {"trace": source, "requests": len(trace), "block_size": spec.block_size,
               "num_blocks": spec.num_blocks, "pool_bytes": spec.pool_bytes, **paged.as_dict()}
        if args.compare:
            out["baselines"] = {r.backend: r.as_dict() for r in reports[1:]}
            out["ratios"] = ratios
        print(json.dumps(out))
        return 0
    print(source)
    print(f"Requests: {len(trace):,}   max_seq_len: {spec.max_seq_len:,}   max batch: {args.max_batch}   "
          f"token budget: {args.token_budget:,}   arrivals: {args.arrivals}")
    print(f"KV pool: {spec.describe()} ({spec.pool_bytes / 2**30:.2f} GiB, {spec.usable_blocks * spec.block_size:,} token slots)")
    print()
    print(format_table(reports))
    if ratios:
        print()
        for name, value in ratios.items():
            print(f"concurrency (mean running), paged / {name.rsplit('_over_', 1)[1]}: {value:.2f}x")
    for what, path in (("profile", args.series), ("plot", args.plot)):
        if path:
            print(f"{what} written to {os.fspath(path)}")
    return 0


__all__ = ["build_parser", "main"]
