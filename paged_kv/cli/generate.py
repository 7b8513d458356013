"""``paged-kv generate``: generation from a local Hugging Face checkpoint directory
(greedy by default; sampling, stop and chat flags in `paged_kv.cli.generate_options`).

Only argparse runs when the parser is built; the model, JAX and the tokenizer are
imported when the command runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from paged_kv.cli import generate_options as options
from paged_kv.cli.arguments import HelpFormatter, in_flag_words, plural, positive_int
from paged_kv.cli.prompts import check_checkpoint, load_prompts, token_ids
from paged_kv.errors import PagedKVError, SpecError

if TYPE_CHECKING:
    from paged_kv.models.decoder import ModelConfig
    from paged_kv.models.requests import Completion, GenerationStats
    from paged_kv.sim.progress import ProgressBar
    from paged_kv.spec import CacheSpec

    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]

DEFAULT_BLOCK_SIZE = 16

SPEC_FLAGS = {
    "num_blocks": "--num-blocks", "block_size": "--block-size", "max_batch_slots": "--max-batch",
    "max_blocks_per_seq": "{} blocks per sequence (longest prompt + --max-new-tokens, over --block-size)",
    "sliding_window": "the checkpoint's sliding_window", "num_layers": "the checkpoint's num_hidden_layers",
    "num_kv_heads": "the checkpoint's num_key_value_heads", "head_dim": "the checkpoint's head_dim",
}
"""`CacheSpec` fields as ``generate``'s user knows them: flags, or the checkpoint's
config.json keys (`paged_kv.cli.arguments.in_flag_words`)."""


def add_parser(commands: Subparsers) -> argparse.ArgumentParser:
    """Register the ``generate`` subcommand on ``commands`` (an argparse subparsers object)."""
    gen = commands.add_parser(
        "generate",
        help="generation from a Hugging Face checkpoint (Llama, Mistral, Qwen2/2.5/3, Gemma 2/3) through the "
        "paged cache",
        description="Load config.json and *.safetensors from DIR and complete every prompt (greedy, or sampled "
        "with --temperature) with continuous batching over a paged KV cache (decode slots, prefix cache, "
        "preemption). Prints the completions, the time to first token, decode tokens/s and KV cache usage.",
        formatter_class=HelpFormatter,
    )
    gen.add_argument("--checkpoint", required=True, metavar="DIR",
                     help="a local Hugging Face checkpoint directory (config.json, *.safetensors); a hub model must "
                     "be downloaded first: huggingface-cli download ORG/MODEL --local-dir DIR")
    prompts = gen.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt-ids", action="append", type=token_ids, metavar="IDS",
                         help="a prompt as token ids ('1,2,3'); repeat for more prompts")
    prompts.add_argument("--prompt", action="append", metavar="TEXT",
                         help="a text prompt, tokenized with DIR/tokenizer.json (needs the tokenizers package); repeat")
    prompts.add_argument("--prompt-file", action="append", metavar="PATH",
                         help="a file holding one prompt: token ids if it holds only integers (separated by commas, "
                         "spaces or newlines), else text tokenized as --prompt is; repeat for more prompts")
    gen.add_argument("--max-new-tokens", type=positive_int, default=32, metavar="N", help="new tokens per prompt at most")
    gen.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="weights, activations and KV")
    gen.add_argument("--block-size", type=positive_int, metavar="N",
                     help=f"tokens per block (default: {DEFAULT_BLOCK_SIZE}, or the largest power of two within the "
                     "model's sliding window when that is smaller, since a window must span a block)")
    gen.add_argument("--num-blocks", type=positive_int, metavar="N",
                     help="blocks in the pool, null block included; at least one sequence's blocks + 1 "
                     "(default: every prompt's full length at once)")
    gen.add_argument("--max-batch", type=positive_int, default=8, metavar="N",
                     help="decode slots: sequences decoded together")
    gen.add_argument("--prefill-chunk", type=positive_int, metavar="N",
                     help="compute at most N prompt tokens of a sequence per step (default: whole prompts)")
    gen.add_argument("--no-prefix-cache", action="store_true", help="do not reuse cached prompt blocks")
    gen.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    gen.add_argument("--progress", choices=("auto", "on", "off"), default="auto",
                     help="progress bar on stderr, in generated tokens (auto: when stderr is a terminal)")
    gen.add_argument("--json", action="store_true", help="print completions and figures as one JSON line")
    options.add_flags(gen)
    gen.set_defaults(subparser=gen)
    return gen


def _progress(show: bool, total_tokens: int,
              ) -> tuple[Callable[[int, int, GenerationStats], None] | None, ProgressBar | None]:
    """``(progress(done, total, stats), bar)``: the bar counts generated tokens, out of
    every request's --max-new-tokens (a bar of finished requests sat at 0 % until the
    first request ended, with most requests ending together at the end)."""
    if not show:
        return None, None
    from paged_kv.sim.progress import ProgressBar

    bar = ProgressBar("generate", unit="tokens")

    def progress(done: int, total: int, stats: GenerationStats) -> None:
        bar.label = (f"generate {stats.tokens_per_s:8.1f} tokens/s, KV {stats.kv_usage_mean:4.0%}, "
                     f"{done}/{plural(total, 'request')} done")
        # A request that stops at EOS never produces the rest of its budget: the bar
        # fills when the last request ends, whatever the count then.
        bar(total_tokens if done == total else min(stats.generated_tokens, total_tokens), total_tokens)

    return progress, bar


def block_size_for(args: argparse.Namespace, cfg: ModelConfig, max_seq_len: int) -> int:
    """--block-size, else the default that works for the model: 16, or the largest power
    of two within a sliding window smaller than that (Mistral-style fixtures have
    windows of 10), since `CacheSpec` refuses a window smaller than a block. A window
    that does not bind (>= max_seq_len) is no sliding layer at all (`cache_spec`)."""
    window = cfg.sliding_window if cfg.layers_sliding and cfg.sliding_window < max_seq_len else None  # type: ignore[operator]  # sliding layers: a window
    if args.block_size is not None:
        if window is not None and window < args.block_size:
            raise SpecError(f"--block-size {args.block_size} is larger than the checkpoint's sliding_window {window}, "
                            f"and a window must span a block: use --block-size {1 << (window.bit_length() - 1)} (or "
                            "any size up to the window), or leave --block-size out")
        size: int = args.block_size
        return size
    if window is None or window >= DEFAULT_BLOCK_SIZE:
        return DEFAULT_BLOCK_SIZE
    return 1 << (window.bit_length() - 1)


def _spec(args: argparse.Namespace, cfg: ModelConfig, prompts: list[list[int]]) -> CacheSpec:
    from paged_kv.models.llama import cache_spec

    max_seq_len = max(len(p) for p in prompts) + args.max_new_tokens
    block_size = block_size_for(args, cfg, max_seq_len)
    blocks = -(-max_seq_len // block_size)
    if args.num_blocks is not None and args.num_blocks < blocks + 1:
        # Refused rather than raised: a pool sized up silently is not the pool asked for.
        raise SpecError(f"--num-blocks {args.num_blocks} is fewer than the {blocks + 1} blocks one sequence needs "
                        f"({plural(blocks, 'block')} of --block-size {block_size} for the longest prompt + "
                        f"--max-new-tokens {args.max_new_tokens} = {max_seq_len:,} tokens, and the reserved "
                        f"block 0): use --num-blocks {blocks + 1} or more, or leave it out")
    # Default: every sequence that can run at once at full length, plus the generator's
    # admission headroom (one block per running sequence) and the null block.
    num_blocks = args.num_blocks or min(len(prompts), args.max_batch) * (blocks + 1) + 1
    try:
        return cache_spec(cfg, num_blocks=num_blocks, block_size=block_size,
                          max_seq_len=max_seq_len, max_batch_slots=args.max_batch, dtype=args.dtype)
    except SpecError as exc:  # in the spec's words: say which flags set those fields
        raise SpecError(f"--max-new-tokens {args.max_new_tokens}, --block-size {block_size}, --num-blocks "
                        f"{args.num_blocks or f'{num_blocks} (the default)'}, --max-batch {args.max_batch}: "
                        + in_flag_words(str(exc), SPEC_FLAGS, "or give fewer --num-blocks")) from None


def run(args: argparse.Namespace) -> int:
    """Run ``paged-kv generate``; returns the exit status (2 for bad input)."""
    from paged_kv.cli.sizes import check_generate
    from paged_kv.models.generate import Generator, Request
    from paged_kv.models.loader import load_config, load_params

    try:
        directory = check_checkpoint(args.checkpoint)  # a hub id is not a directory: say how to download it
        cfg = load_config(directory)
        chat = options.chat_template(directory) if args.chat else None
        prompts, tokenizer = load_prompts(args, directory, options.needs_text(args), chat)
        spec = _spec(args, cfg, prompts)  # the spec checks its host structures against the machine
        check_generate(spec, cfg, args.dtype)  # and the pool and weights where they go: before either exists
        params = load_params(directory, cfg, dtype=args.dtype)
        requests = [Request(p, args.max_new_tokens, **options.request_fields(args, i)) for i, p in enumerate(prompts)]
        show = args.progress == "on" or (args.progress == "auto" and sys.stderr.isatty())
        progress, bar = _progress(show, len(prompts) * args.max_new_tokens)
        try:
            with options.compile_cache(args):
                generator = Generator(cfg, params, spec, prefix_cache=not args.no_prefix_cache,
                                      eos_token_ids=() if args.ignore_eos else cfg.eos_token_ids,
                                      prefill_chunk=args.prefill_chunk,
                                      detokenize=None if tokenizer is None else tokenizer.decode,
                                      program_cache=options.program_dir(args))
                completions, stats = generator.generate(requests, progress)
        finally:
            if bar is not None:
                bar.close()
    except PagedKVError as exc:
        print(f"paged-kv: error: {exc}", file=sys.stderr)
        return 2
    _report(args, completions, stats, spec)
    return 0


def _report(args: argparse.Namespace, completions: list[Completion], stats: GenerationStats, spec: CacheSpec) -> None:
    rows: list[dict[str, Any]] = []
    for c in completions:
        row: dict[str, Any] = dict(request_id=c.request_id, prompt=c.prompt, tokens=c.tokens, finish_reason=c.finish_reason,
                   stop_reason=c.stop_reason, preemptions=c.preemptions, cached_tokens=c.cached_tokens,
                   first_token_seconds=c.first_token_seconds)
        if c.text is not None:
            row["text"] = c.text  # cut before a stop string
        if c.logprobs is not None:
            row.update(logprobs=c.logprobs, top_logprobs=c.top_logprobs)
        rows.append(row)
    if args.json:
        print(json.dumps(dict(checkpoint=str(args.checkpoint), kv_pool=spec.describe(), completions=rows,
                              stats=stats.as_dict())))
        return
    for row in rows:
        shown = repr(row["text"]) if "text" in row else " ".join(map(str, row["tokens"]))
        print(f"[{row['request_id']}] {plural(len(row['prompt']), 'prompt token')} -> {len(row['tokens'])} "
              f"({row['finish_reason']}): {shown}")
    print(f"KV pool: {spec.describe()}")
    print(stats.summary())


__all__ = ["add_parser", "run"]
