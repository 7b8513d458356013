"""``paged-kv simulate`` (or ``python -m paged_kv simulate``): replay a request trace through
the block allocator and profile memory.

The defaults model one serving replica of an 8B-class model (``--model llama3-8b``:
32 layers, 8 KV heads of dim 128, bfloat16: 128 KiB of KV per token) with a 16 GiB
KV pool; ``--model`` picks another preset and ``--num-layers``, ``--num-kv-heads``,
``--head-dim``, ``--kv-dtype`` override its fields; ``--pool-gib`` sizes the pool in
memory instead of blocks (`paged_kv.cli.pool`), so that the shape decides how many
blocks fit. The default pool holds ~131k tokens, fewer than 256 of the trace's
average requests need, so memory rather than the batch limit decides how many
sequences run: the regime where the allocator matters.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from paged_kv.cli import sizes
from paged_kv.cli.arguments import HelpFormatter, in_flag_words, number, plural, positive_int, positive_size
from paged_kv.cli.pool import (DEFAULT_BLOCK_SIZE, DEFAULT_NUM_BLOCKS, KV_DTYPES, KV_FORMATS, MAX_POOL_BYTES,
                               build_spec, overrides)
from paged_kv.errors import PagedKVError, SpecError, TraceError
from paged_kv.sim.layouts import LAYOUTS
from paged_kv.sim.models import DEFAULT_MODEL, MODELS
from paged_kv.sim.multiturn import multiturn_workload
from paged_kv.sim.output_path import OutputPathError, check_writable
from paged_kv.sim.profile import write_series
from paged_kv.sim.progress import ProgressBar, ProgressLog
from paged_kv.sim.scheduler import ARRIVALS, SchedulerConfig, SimulationError
from paged_kv.sim.simulate import compare, format_table, simulate
from paged_kv.sim.trace import BUNDLED_ATTRIBUTION, Trace, load_trace
from paged_kv.sim.workload import Workload
from paged_kv.spec import CacheSpec

if TYPE_CHECKING:
    from paged_kv.sim.simulate import SimReport

    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]

CONFIG_FLAGS = {"max_batch": "--max-batch", "token_budget": "--token-budget", "watermark": "--watermark",
                "step_s": "--step-ms (in seconds)", "speedup": "--speedup"}
"""`SchedulerConfig` fields by the flags that set them, for its refusals."""

PROGRESS_LOG_S = 10.0
"""Seconds between two progress lines when stderr is not a terminal."""

BUNDLED = "azure-conv"
SYNTHETIC = "synthetic"
WORKLOADS = ("requests", "multiturn")
"""``--workload``: the trace's requests as they are, or chat sessions whose turns'
lengths are drawn from it (`paged_kv.sim.multiturn_workload`)."""


def add_parser(commands: Subparsers) -> argparse.ArgumentParser:
    """Register the ``simulate`` subcommand on ``commands`` (an argparse subparsers object)."""
    default = MODELS[DEFAULT_MODEL]
    sim = commands.add_parser(
        "simulate",
        help="replay a request trace through the block allocator",
        description="Replay a request trace through a KVCacheManager with continuous batching and "
        "profile memory: utilization, fragmentation, concurrency, preemptions. With --compare, "
        "replay it over contiguous caches at equal memory too. No model runs and no device memory "
        "is allocated: the model shape only sets how many bytes a block stands for. By default that "
        f"is {DEFAULT_MODEL} ({default.describe()}), so the default pool of {DEFAULT_NUM_BLOCKS} blocks "
        f"of {DEFAULT_BLOCK_SIZE} tokens is "
        f"{DEFAULT_NUM_BLOCKS * DEFAULT_BLOCK_SIZE * default.bytes_per_token / 2**30:g} GiB.",
        formatter_class=HelpFormatter,
    )
    sim.add_argument("--trace", default=BUNDLED, metavar="azure-conv|synthetic|FILE",
                     help="the bundled Azure LLM conversation trace 2023, a seeded synthetic trace "
                     "(bursts, long outliers, cancellations), or a CSV file (TIMESTAMP,ContextTokens,"
                     "GeneratedTokens[,CancelAfterTokens]); a request with GeneratedTokens=0 is prefill only")
    sim.add_argument("--requests", type=positive_int, metavar="N", default=5000, help="requests in a synthetic trace")
    sim.add_argument("--seed", type=int, metavar="N", default=0, help="seed of a synthetic trace")
    sim.add_argument("--limit", type=positive_int, metavar="N", help="replay only the first N requests")
    _add_workload_arguments(sim)
    shape = sim.add_argument_group("model shape (sizes the pool in bytes)")
    shape.add_argument("--model", choices=tuple(MODELS), default=DEFAULT_MODEL, metavar="NAME",
                       help=f"a preset KV shape: {', '.join(MODELS)}")
    # SUPPRESS: an override left out is absent from the namespace (and from the
    # "(default: ...)" help text), so the preset's value stands.
    shape.add_argument("--num-layers", type=positive_int, default=argparse.SUPPRESS, metavar="N",
                       help="override the preset's layer count")
    shape.add_argument("--num-kv-heads", type=positive_int, default=argparse.SUPPRESS, metavar="N",
                       help="override the preset's KV heads")
    shape.add_argument("--head-dim", type=positive_int, default=argparse.SUPPRESS, metavar="N",
                       help="override the preset's head dimension")
    shape.add_argument("--kv-dtype", choices=KV_DTYPES + KV_FORMATS, default=argparse.SUPPRESS,
                       help="override the preset's KV dtype (every preset is bfloat16); int8 (per-token scales "
                       "included) and fp8 quantize the pages, the preset's dtype stays the compute dtype")
    pool = sim.add_argument_group("KV pool")
    pool.add_argument("--block-size", type=positive_int, metavar="N", default=DEFAULT_BLOCK_SIZE,
                      help="tokens per block")
    pool.add_argument("--num-blocks", type=positive_int, metavar="N",
                      help=f"blocks in the pool, null block included (default: {DEFAULT_NUM_BLOCKS}; refused with "
                      "--pool-gib)")
    pool.add_argument("--pool-gib", type=positive_size, metavar="GIB",
                      help="size the pool in memory instead, as CacheSpec.for_memory does: as many blocks as fit "
                      "in GIB GiB of pages (and their binding arrays) for the model shape, so --kv-dtype int8 or a "
                      "smaller --model fits more blocks; refused with --num-blocks")
    pool.add_argument("--max-seq-len", type=positive_int, metavar="N", default=16384,
                      help="tokens one sequence may hold (rounded up to whole blocks)")
    pool.add_argument("--layout", choices=LAYOUTS, default="full",
                      help="which layers slide: none, all but one in --full-every (Gemma 3: 6), or all of them")
    pool.add_argument("--sliding-window", type=positive_int, default=1024, metavar="W",
                      help="window of the sliding layers (--layout hybrid|sliding)")
    pool.add_argument("--full-every", type=positive_int, default=6, metavar="N",
                      help="one full-attention layer per N layers (--layout hybrid)")
    pool.add_argument("--sliding-blocks", type=positive_int, default=None, metavar="N",
                      help="blocks of the sliding layers' own pool (--layout hybrid; default: --num-blocks, or "
                      "half of --pool-gib)")
    pool.add_argument("--force", action="store_true",
                      help=f"run a pool larger than {MAX_POOL_BYTES // 2**40} TiB, which is refused otherwise "
                      "as a likely typo")
    tier = sim.add_argument_group("tiers below the device pool (prefix-cached blocks; paged_kv.tiers)")
    tier.add_argument("--host-tier-gib", type=number(0.0), metavar="GIB", default=0.0,
                      help="host-memory tier for keyed blocks the device evicts (needs the prefix cache)")
    tier.add_argument("--disk-tier-gib", type=number(0.0), metavar="GIB", default=0.0,
                      help="disk tier below the host tier (counted only: the replay writes no files)")
    tier.add_argument("--tier-policy", choices=("lru", "arc"), default="lru", help="eviction policy of each tier")
    tier.add_argument("--tier-write", choices=("back", "through"), default="back",
                      help="move blocks down when the device evicts them, or copy them down when keyed")
    sim.add_argument("--max-batch", type=positive_int, metavar="N", default=256, help="most sequences in one step")
    sim.add_argument("--token-budget", type=positive_int, metavar="N", default=8192,
                     help="tokens one step may process: decodes plus prefill chunks")
    sim.add_argument("--watermark", type=number(0.0, 1.0), metavar="FRACTION", default=0.01,
                     help="fraction of the pool admission keeps free for running sequences to grow")
    sim.add_argument("--arrivals", choices=ARRIVALS, default="offline",
                     help="offline: all requests wait at step 0 (sustained load); trace: at their arrival times")
    sim.add_argument("--step-ms", type=number(1e-6), metavar="MS", default=25.0,
                     help="model time of one step, for --arrivals trace")
    sim.add_argument("--speedup", type=number(1e-6), metavar="X", default=1.0,
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
                     help="progress on stderr: auto is a bar on a terminal and otherwise a line every "
                     f"{PROGRESS_LOG_S:g} s; on is always the bar")
    # So that an inconsistent option combination is reported with this
    # subcommand's usage line, as argparse reports a single bad option.
    sim.set_defaults(subparser=sim)
    return sim


def _add_workload_arguments(sim: argparse.ArgumentParser) -> None:
    work = sim.add_argument_group("workload (token ids: prefix cache, parallel sampling)")
    work.add_argument("--workload", choices=WORKLOADS, default="requests",
                      help="requests: the trace's requests; multiturn: chat sessions whose prompts are the "
                      "conversation so far plus new user tokens, each turn's lengths a row of --trace")
    work.add_argument("--sessions", type=positive_int, metavar="N", default=64,
                      help="chat sessions (--workload multiturn)")
    work.add_argument("--turns", type=positive_int, metavar="N", default=6,
                      help="most turns per session (--workload multiturn)")
    work.add_argument("--think-s", type=number(0.0), metavar="S", default=10.0,
                      help="mean think time between a turn's answer and the next turn (--workload multiturn)")
    work.add_argument("--samples", type=positive_int, metavar="N", default=1,
                      help="parallel samples per request: prefilled once, then forked (--workload requests)")
    work.add_argument("--prefix-cache", action=argparse.BooleanOptionalAction, default=None,
                      help="admit prompts through the manager's prefix cache (default: on for --workload "
                      "multiturn, off otherwise)")


def _workload(args: argparse.Namespace, trace: Trace, source: str) -> tuple[Trace | Workload, str]:
    """What the replay serves: the trace itself, or a `Workload` built on it (cut to ``--limit``)."""
    work: Trace | Workload
    if args.workload == "multiturn":
        work = multiturn_workload(args.sessions, turns=args.turns, seed=args.seed, think_s=args.think_s,
                                  max_total_tokens=args.max_seq_len, trace=trace, source=source)
        source = work.source
    elif args.samples > 1 or _prefix_cache(args):
        work = Workload.from_trace(trace, seed=args.seed, samples=args.samples, source=source)
    else:
        work = trace
    return (work if args.limit is None else work.head(args.limit)), source


def _prefix_cache(args: argparse.Namespace) -> bool:
    on: bool = args.workload == "multiturn" if args.prefix_cache is None else args.prefix_cache
    return on


def _load(args: argparse.Namespace) -> tuple[Trace, str]:
    """The trace the arguments name and the credit line to print with its results;
    `TraceError` if it has no request to replay."""
    if args.trace == BUNDLED:
        trace, source = load_trace(), BUNDLED_ATTRIBUTION
    elif args.trace == SYNTHETIC:
        from paged_kv.sim.synthetic import synthetic_trace

        trace = synthetic_trace(args.requests, seed=args.seed, max_total_tokens=args.max_seq_len)
        source = f"Trace: synthetic ({plural(args.requests, 'request')}, seed {args.seed})"
    else:
        trace, source = load_trace(args.trace), f"Trace: {args.trace}"
        if len(trace) == 0:
            raise TraceError(f"{args.trace}: no requests (a header line and no rows); nothing to replay")
    return trace, source


def _check_outputs(args: argparse.Namespace) -> None:
    """Refuse ``--plot``/``--series`` paths that could not be written, before the replay."""
    if args.plot:
        from paged_kv.sim.plot import check_plot_path

        check_plot_path(args.plot)  # also checks that matplotlib is installed
    if args.series:
        check_writable(args.series, "--series")


def _progress(mode: str) -> tuple[Callable[[str, int, int], None] | None, Callable[[], None]]:
    """``(progress(backend, done, total), close())`` for ``--progress``: a bar per
    backend on a terminal, periodic plain lines otherwise, or nothing."""
    if mode == "off":
        return None, lambda: None
    bar = mode == "on" or sys.stderr.isatty()
    shown: dict[str, ProgressBar | ProgressLog] = {}

    def close() -> None:
        if shown:
            list(shown.values())[-1].close()

    def progress(name: str, done: int, total: int) -> None:
        if name not in shown:
            close()  # one line per backend's replay
            shown[name] = ProgressBar(f"{name:>20}") if bar else ProgressLog(f"paged-kv simulate: {name}",
                                                                             every_s=PROGRESS_LOG_S)
        shown[name](done, total)

    return progress, close


def _replay(args: argparse.Namespace, trace: Trace | Workload, spec: CacheSpec, config: SchedulerConfig,
            ) -> list[SimReport]:
    """The paged replay's report, then the baselines' with ``--compare``."""
    progress, close = _progress(args.progress)
    try:
        if args.compare:
            reports = compare(trace, spec, config, progress=progress, prefix_cache=_prefix_cache(args),
                              tiers=_tiers(args))
        else:
            reports = [simulate(trace, spec, config=config, prefix_cache=_prefix_cache(args), tiers=_tiers(args),
                                progress=(lambda d, t: progress("paged", d, t)) if progress else None)]
    finally:
        close()
    if reports[0].skipped == len(trace):
        raise SimulationError(f"all {len(trace):,} requests are longer than --max-seq-len {args.max_seq_len}; "
                              "nothing ran: raise --max-seq-len")
    return reports


def _write_outputs(args: argparse.Namespace, reports: list[SimReport], trace: Trace | Workload, spec: CacheSpec,
                   source: str) -> None:
    series = {r.backend: r.series for r in reports}
    try:
        if args.series:
            write_series(args.series, series)
        if args.plot:
            from paged_kv.sim.plot import plot_series

            credit = "Azure LLM conversation trace 2023 (CC-BY 4.0)" if args.trace == BUNDLED else source
            plot_series(series, args.plot, title=f"{credit}: {plural(len(trace), 'request')}, "
                        f"{spec.pool_bytes / 2**30:.1f} GiB KV pool, block size {spec.block_size}")
    except OSError as exc:
        raise OutputPathError(f"cannot write {exc.filename}: {exc.strerror}") from exc


def _print_results(args: argparse.Namespace, reports: list[SimReport], trace: Trace | Workload, spec: CacheSpec,
                   source: str) -> None:
    paged = reports[0]
    ratios = {f"mean_running_paged_over_{r.backend}": paged.mean_running / r.mean_running
              for r in reports[1:] if r.mean_running}
    # CC-BY 4.0 asks for the credit wherever results from the bundled trace appear.
    if args.json:
        out = {"trace": source, "workload": args.workload, "requests": len(trace), "model": args.model,
               "layout": args.layout, "prefix_cache": _prefix_cache(args), "block_size": spec.block_size,
               "num_blocks": spec.num_blocks, "pool_bytes": spec.pool_bytes, **paged.as_dict()}
        if args.compare:
            out["baselines"] = {r.backend: r.as_dict() for r in reports[1:]}
            out["ratios"] = ratios
        print(json.dumps(out))
        return
    print(source)
    print(f"Requests: {len(trace):,} ({args.workload})   max_seq_len: {spec.max_seq_len:,}   max batch: "
          f"{args.max_batch}   token budget: {args.token_budget:,}   arrivals: {args.arrivals}   prefix cache: "
          f"{'on' if _prefix_cache(args) else 'off'}")
    print(f"Model shape: {args.model}{' with overrides' if overrides(args) else ''} ({spec.num_layers} layers, "
          f"{spec.key_heads} KV heads x {spec.key_dim}, {spec.dtype}; only sizes the pool)")
    print(f"KV pool: {spec.describe()} ({spec.pool_bytes / 2**30:.2f} GiB, "
          f"{spec.usable_blocks * spec.block_size:,} token slots)")
    print()
    print(format_table(reports))
    if ratios:
        print()
        for name, value in ratios.items():
            print(f"concurrency (mean running), paged / {name.rsplit('_over_', 1)[1]}: {value:.2f}x")
    for what, path in (("profile", args.series), ("plot", args.plot)):
        if path:
            print(f"{what} written to {os.fspath(path)}")


def run(args: argparse.Namespace) -> int:
    """Run ``paged-kv simulate``: check everything it can before the replay, replay, report;
    returns the exit status (2 for bad input, as for bad arguments)."""
    try:
        _check_workload_flags(args)
        spec = build_spec(args)
        config = _config(args)
        sizes.check_simulate(args)  # what the flags alone size: before a synthetic trace is generated
    except (SpecError, SimulationError) as exc:
        args.subparser.error(str(exc))  # exits 2 with the usage line, like any other bad option
    try:
        _check_outputs(args)  # before a long replay, not after it
        trace: Trace | Workload
        trace, source = _load(args)
        sizes.check_simulate(args, len(trace))  # and with the trace's length, before the workload is built
        trace, source = _workload(args, trace, source)
        reports = _replay(args, trace, spec, config)
        _write_outputs(args, reports, trace, spec, source)
    except (PagedKVError, SimulationError) as exc:
        print(f"paged-kv: error: {exc}", file=sys.stderr)
        return 2
    _print_results(args, reports, trace, spec, source)
    return 0


def _tiers(args: argparse.Namespace) -> dict[str, Any] | None:
    """`CacheTiers` arguments of the tier flags, or None without tiers."""
    if not (args.host_tier_gib or args.disk_tier_gib):
        return None
    return {"host_bytes": int(args.host_tier_gib * 2**30), "disk_bytes": int(args.disk_tier_gib * 2**30),
            "policy": args.tier_policy, "write": args.tier_write}


def _check_workload_flags(args: argparse.Namespace) -> None:
    """Refuse a flag the chosen workload would ignore: a multi-turn chat serves each turn
    once, so ``--samples`` there used to be dropped without a word; tiers keep prefix-cached
    blocks, so they need the prefix cache."""
    if (args.host_tier_gib or args.disk_tier_gib) and not _prefix_cache(args):
        raise SimulationError("--host-tier-gib/--disk-tier-gib keep prefix-cached blocks: add --prefix-cache "
                              "(on by default with --workload multiturn)")
    if args.workload == "multiturn" and args.samples > 1:
        raise SimulationError(f"--samples {args.samples} forks each request of --workload requests; --workload "
                              "multiturn serves each turn once: leave --samples out, or use --workload requests")


def _config(args: argparse.Namespace) -> SchedulerConfig:
    """The scheduler the flags describe; its refusals name the flags, not its fields."""
    try:
        return SchedulerConfig(max_batch=args.max_batch, token_budget=args.token_budget, watermark=args.watermark,
                               arrivals=args.arrivals, step_s=args.step_ms / 1000, speedup=args.speedup,
                               preemption=args.preemption)
    except SimulationError as exc:
        raise SimulationError(in_flag_words(str(exc), CONFIG_FLAGS, "")) from None


__all__ = ["MAX_POOL_BYTES", "add_parser", "run"]
