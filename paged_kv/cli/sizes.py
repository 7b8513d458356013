"""Host (and device) memory the ``paged-kv`` commands' size flags ask for, checked before
anything is allocated (issue 23 item 9).

Every flag is a positive integer to argparse, so ``--requests 1e9`` or ``--num-blocks``
past the machine used to run until the OOM killer or a swap storm ended it. The pool
and the allocator's tables are `CacheSpec`'s to check (`paged_kv.spec.fields`); what
is checked here is what the commands build beside them: trace rows, replayed
sequences, and for ``generate`` the pages and weights where they will live. A refusal
is a `SpecError` naming the flags, which the commands turn into exit status 2.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from paged_kv.cli.arguments import plural
from paged_kv.errors import SpecError
from paged_kv.spec.fields import check_host_bytes

if TYPE_CHECKING:
    from paged_kv.models.decoder import ModelConfig
    from paged_kv.spec import CacheSpec

BYTES_PER_TRACE_ROW = 512
"""Host bytes one request of a trace or workload costs while it is built (the synthetic
generator's temporaries, the multi-turn builder's; measured 40-450 B)."""

BYTES_PER_SEQUENCE = 4 * 2**10
"""Host bytes one replayed sequence costs the simulator (scheduler state, per-request
figures; measured 0.3-3 KiB)."""


def check_simulate(args: argparse.Namespace, trace_rows: int | None = None) -> None:
    """`SpecError` when the workload the flags describe would not fit in host memory.
    ``trace_rows``: the loaded trace's length, once known (None: before loading, when
    only a synthetic or multi-turn workload's size is known from the flags)."""
    multiturn = args.workload == "multiturn"
    rows, flags = 0, []
    if args.trace == "synthetic":
        rows, flags = args.requests, [f"--requests {args.requests:,}"]
    elif trace_rows is not None:
        rows, flags = trace_rows, [f"a trace of {plural(trace_rows, 'request')}"]
    elif not multiturn:
        return  # a file's or the bundled trace's length is known once it is loaded
    if multiturn:
        built = args.sessions * args.turns
        rows, sequences = rows + built, built
        flags += [f"--sessions {args.sessions:,} x --turns {args.turns:,}"]
    else:
        sequences = rows * args.samples
        flags += [f"--samples {args.samples:,}"] if args.samples > 1 else []
    if args.limit is not None:
        sequences = min(sequences, args.limit * (1 if multiturn else args.samples))
        flags.append(f"--limit {args.limit:,}")
    replays = 3 if args.compare else 1  # the paged replay, then two baselines
    check_host_bytes(rows * BYTES_PER_TRACE_ROW + sequences * replays * BYTES_PER_SEQUENCE,
                     f"{', '.join(flags)} ({plural(sequences, 'sequence')} to replay"
                     f"{' three times' if replays > 1 else ''})",
                     hint="use fewer requests, sessions, turns or samples, or cut the replay with --limit")


def check_generate(spec: CacheSpec, cfg: ModelConfig, dtype: str) -> None:
    """`SpecError` when the KV pool (with its binding arrays) and the weights would not fit
    where they go: host memory on CPU, the device's memory limit elsewhere."""
    import jax
    import numpy as np

    from paged_kv.models.loader import parameter_count

    weights = parameter_count(cfg) * np.dtype(jax.numpy.dtype(dtype)).itemsize
    need = spec.device_bytes + weights
    what = (f"--num-blocks {spec.num_blocks:,} x --block-size {spec.block_size} (a {spec.device_bytes / 2**30:,.2f} GiB "
            f"KV pool) and {weights / 2**30:,.2f} GiB of weights")
    hint = "give fewer --num-blocks, a smaller --block-size, --max-new-tokens or --max-batch"
    device = jax.devices()[0]
    if device.platform == "cpu":
        check_host_bytes(need, what, hint=hint)
        return
    try:
        limit = (device.memory_stats() or {}).get("bytes_limit")
    except Exception:  # noqa: BLE001 - a backend without memory statistics: nothing to check against
        limit = None
    if limit and need > limit:
        raise SpecError(f"{what} would take about {need / 2**30:,.1f} GiB of {device.device_kind} memory, more than "
                        f"its {limit / 2**30:,.1f} GiB; {hint}")


__all__ = ["BYTES_PER_SEQUENCE", "BYTES_PER_TRACE_ROW", "check_generate", "check_simulate"]
