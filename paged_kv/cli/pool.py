"""The KV pool ``paged-kv simulate``'s flags describe, refused in terms of those flags.

The pool is given either in blocks (``--num-blocks``) or in memory (``--pool-gib``,
sized as `CacheSpec.for_memory` sizes it: pages and binding arrays within the bytes).
Only the second lets the model shape decide how much fits: a block of int8 pages
costs about half a bfloat16 block, so the same memory holds about twice the blocks,
where the same block count would only report half the memory. Giving both is refused:
either would silently override the other.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

from paged_kv.cli.arguments import in_flag_words
from paged_kv.errors import SpecError
from paged_kv.sim.layouts import sliding_layers, spec_at_memory
from paged_kv.sim.models import MODELS, ModelShape, model_shape
from paged_kv.spec import CacheSpec

DEFAULT_BLOCK_SIZE = 16
DEFAULT_NUM_BLOCKS = 8192
KV_DTYPES = ("bfloat16", "float16", "float32", "float8_e4m3fn", "float8_e5m2")
KV_FORMATS = ("int8", "fp8")
"""``--kv-dtype`` values that quantize the pages (`CacheSpec.kv_format`, scales counted)
and keep the preset's dtype for compute."""

MAX_POOL_BYTES = 2**40
"""Pools above 1 TiB are refused without ``--force``: larger than any one serving
replica's accelerator memory today, so far more likely a typo in ``--block-size``,
``--num-blocks`` or ``--pool-gib`` than an intended run (which would report
meaningless figures)."""

SPEC_FLAGS = {
    "num_blocks": "--num-blocks", "sliding_num_blocks": "--sliding-blocks", "block_size": "--block-size",
    "sliding_window": "--sliding-window", "num_layers": "--num-layers", "num_kv_heads": "--num-kv-heads",
    "head_dim": "--head-dim", "max_batch_slots": "--max-batch",
    "max_blocks_per_seq": "{} blocks per sequence (--max-seq-len / --block-size)",
}
"""`CacheSpec` fields by the flags that set them (`paged_kv.cli.arguments.in_flag_words`)."""

HYBRID_SLIDING_SHARE = 0.5
"""With ``--pool-gib`` and ``--layout hybrid``, the share of the bytes given to the
sliding layers' pool (as `paged_kv.sim.layouts.spec_at_memory` splits it)."""


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The model-shape fields given on the command line, by `ModelShape` field name."""
    flags = {"num_layers": "num_layers", "num_kv_heads": "num_kv_heads", "head_dim": "head_dim", "kv_dtype": "dtype"}
    out = {field: getattr(args, flag) for flag, field in flags.items() if hasattr(args, flag)}
    if out.get("dtype") in KV_FORMATS:  # quantized pages: a storage format, not a compute dtype
        out["kv_format"] = out.pop("dtype")
    return out


def num_blocks(args: argparse.Namespace) -> int:
    """``--num-blocks``, or its default when neither it nor ``--pool-gib`` is given."""
    return DEFAULT_NUM_BLOCKS if args.num_blocks is None else args.num_blocks


def _pool_words(args: argparse.Namespace) -> str:
    return f"--pool-gib {args.pool_gib:g}" if args.pool_gib is not None else f"--num-blocks {num_blocks(args)}"


def build_spec(args: argparse.Namespace) -> CacheSpec:
    """The pool the arguments describe; `SpecError` in terms of their flags when it is
    inconsistent or implausibly large (a likely typo, e.g. ``--block-size 100000``)."""
    if args.pool_gib is not None and args.num_blocks is not None:
        raise SpecError(f"--pool-gib {args.pool_gib:g} and --num-blocks {args.num_blocks} both size the pool; give "
                        "one: --pool-gib to size it in memory (the model shape and --kv-dtype decide how many blocks "
                        "fit), --num-blocks to count blocks")
    shape = model_shape(args.model, **overrides(args))
    bs, max_len = args.block_size, args.max_seq_len
    if bs > max_len:
        raise SpecError(f"--block-size {bs} exceeds --max-seq-len {max_len}: every sequence would hold one "
                        f"mostly empty block; blocks are typically 8 to 128 tokens")
    per_seq = -(-max_len // bs)
    blocks = num_blocks(args)
    if args.pool_gib is None and blocks - 1 < per_seq:
        raise SpecError(
            f"--num-blocks {blocks} leaves {blocks - 1} usable block(s) (block 0 is reserved), "
            f"fewer than the {per_seq} blocks of --block-size {bs} one --max-seq-len {max_len} sequence needs; "
            f"use --num-blocks {per_seq + 1} or more, or a smaller --max-seq-len"
        )
    layers = sliding_layers(shape.num_layers, args.layout, args.full_every)
    if args.layout != "hybrid" and args.sliding_blocks is not None:
        raise SpecError(f"--sliding-blocks {args.sliding_blocks} is for --layout hybrid (the sliding layers' own "
                        f"pool); --layout {args.layout} has one pool of {_pool_words(args)}")
    if args.pool_gib is not None and args.sliding_blocks is not None:
        raise SpecError(f"--pool-gib {args.pool_gib:g} sizes both pools of --layout hybrid (half its bytes each); "
                        f"--sliding-blocks {args.sliding_blocks} would size one again: give --num-blocks with it "
                        "instead, or leave --sliding-blocks out")
    slide = dict(sliding_window=args.sliding_window, sliding_layers=layers) if layers else {}
    if args.layout == "hybrid":
        slide["sliding_num_blocks"] = args.sliding_blocks
    try:
        if args.pool_gib is None:
            spec = CacheSpec(num_blocks=blocks, block_size=bs, max_blocks_per_seq=per_seq,
                             max_batch_slots=args.max_batch, **shape.spec_fields(), **slide)
        else:
            spec = _spec_in_memory(args, shape, per_seq, slide)
    except SpecError as exc:  # in the spec's words: say which flags set those fields
        raise SpecError(f"{_pool_words(args)}, --block-size {bs}, --max-seq-len {max_len}, --max-batch "
                        f"{args.max_batch}: " + in_flag_words(str(exc), SPEC_FLAGS, "or size the pool with "
                                                              "--pool-gib")) from None
    pool = spec.pool_bytes  # every group's pool (a hybrid layout's sliding pool included)
    if pool > MAX_POOL_BYTES and not args.force:
        raise SpecError(
            f"{_pool_words(args)} x --block-size {bs} tokens of {args.model} ({shape.describe()}) is a "
            f"{pool / 2**30:,.0f} GiB KV pool, more than {MAX_POOL_BYTES // 2**40} TiB; check "
            f"{'--pool-gib' if args.pool_gib is not None else '--num-blocks and --block-size'}, or pass --force"
        )
    return spec


def _spec_in_memory(args: argparse.Namespace, shape: ModelShape, per_seq: int, slide: dict[str, Any]) -> CacheSpec:
    """The spec of a ``--pool-gib`` pool; `SpecError` when it cannot hold one
    ``--max-seq-len`` sequence (`for_memory` would shorten the sequences instead)."""
    pool_bytes = int(args.pool_gib * 2**30)
    if pool_bytes > MAX_POOL_BYTES and not args.force:  # before building tables for a typo's pool
        raise SpecError(f"--pool-gib {args.pool_gib:g} is more than {MAX_POOL_BYTES // 2**40} TiB; check --pool-gib, "
                        "or pass --force")
    fields = dict(shape.spec_fields(), block_size=args.block_size, **{k: v for k, v in slide.items()
                                                                      if k != "sliding_num_blocks"})
    probe = CacheSpec(num_blocks=2, max_blocks_per_seq=1, **fields)
    # What `for_memory` charges a block: its pages (the full-attention group's, which
    # must hold the sequence) and an int32 generation per layer.
    per_block = probe.group_bytes_per_block(0) + 4 * probe.num_layers
    share = 1 - HYBRID_SLIDING_SHARE if args.layout == "hybrid" else 1
    need = ((per_seq + 1) * per_block + 4 * probe.num_layers) / share
    if pool_bytes < need:
        raise SpecError(f"--pool-gib {args.pool_gib:g} holds {max(0, int(pool_bytes * share) // per_block):,} blocks "
                        f"of --block-size {args.block_size} ({per_block / 2**10:,.0f} KiB each for {args.model}"
                        f"{', half the bytes going to the sliding layers' if share < 1 else ''}), fewer than the "
                        f"{per_seq + 1} one --max-seq-len {args.max_seq_len} sequence needs with the reserved block 0; "
                        f"use --pool-gib {math.ceil(need / 2**30 * 1000) / 1000:g} or more, or a smaller --max-seq-len")
    return spec_at_memory(shape, args.layout, pool_bytes, window=args.sliding_window, full_every=args.full_every,
                          sliding_share=HYBRID_SLIDING_SHARE, block_size=args.block_size,
                          max_seq_len=args.max_seq_len, max_batch_slots=args.max_batch)


__all__ = ["DEFAULT_BLOCK_SIZE", "DEFAULT_NUM_BLOCKS", "KV_DTYPES", "KV_FORMATS", "MAX_POOL_BYTES", "MODELS",
           "build_spec", "num_blocks", "overrides"]
