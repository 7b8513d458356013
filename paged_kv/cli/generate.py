"""``paged-kv generate``: greedy generation from a local Hugging Face checkpoint directory.

Only argparse runs when the parser is built; the model, JAX and the tokenizer are
imported when the command runs.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from paged_kv.cli.arguments import positive_int
from paged_kv.errors import PagedKVError, SpecError


def _token_ids(text: str) -> list[int]:
    """An argparse type: ``"1,2,3"`` or ``"1 2 3"`` -> ``[1, 2, 3]``."""
    parts = text.replace(",", " ").split()
    try:
        ids = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of integer token ids (e.g. '1,2,3')") from None
    if not ids:
        raise argparse.ArgumentTypeError("an empty prompt; give at least one token id")
    return ids


def add_parser(commands) -> argparse.ArgumentParser:
    """Register the ``generate`` subcommand on ``commands`` (an argparse subparsers object)."""
    gen = commands.add_parser(
        "generate",
        help="greedy generation from a Hugging Face Llama/Mistral checkpoint through the paged cache",
        description="Load config.json and *.safetensors from DIR and greedily complete every prompt with "
        "continuous batching over a paged KV cache (decode slots, prefix cache, preemption). Prints the "
        "completions, tokens/s and KV cache usage.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    gen.add_argument("--checkpoint", required=True, metavar="DIR", help="Hugging Face checkpoint directory")
    prompts = gen.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt-ids", action="append", type=_token_ids, metavar="IDS",
                         help="a prompt as token ids ('1,2,3'); repeat for more prompts")
    prompts.add_argument("--prompt", action="append", metavar="TEXT",
                         help="a text prompt, tokenized with DIR/tokenizer.json (needs the tokenizers package); repeat")
    gen.add_argument("--max-new-tokens", type=positive_int, default=32, help="greedy tokens per prompt at most")
    gen.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="weights, activations and KV")
    gen.add_argument("--block-size", type=positive_int, default=16, help="tokens per block")
    gen.add_argument("--num-blocks", type=positive_int, metavar="N",
                     help="blocks in the pool, null block included (default: every prompt's full length at once)")
    gen.add_argument("--max-batch", type=positive_int, default=8, help="decode slots: sequences decoded together")
    gen.add_argument("--prefill-chunk", type=positive_int, metavar="N",
                     help="compute at most N prompt tokens of a sequence per step (default: whole prompts)")
    gen.add_argument("--no-prefix-cache", action="store_true", help="do not reuse cached prompt blocks")
    gen.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    gen.add_argument("--progress", choices=("auto", "on", "off"), default="auto",
                     help="progress bar on stderr (auto: when stderr is a terminal)")
    gen.add_argument("--json", action="store_true", help="print completions and figures as one JSON line")
    gen.set_defaults(subparser=gen)
    return gen


def _prompts(args, directory: pathlib.Path):
    """(token-id prompts, tokenizer or None)."""
    if args.prompt_ids:
        return args.prompt_ids, None
    path = directory / "tokenizer.json"
    if not path.is_file():
        raise PagedKVError(f"--prompt needs {path}; give --prompt-ids instead")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise PagedKVError("--prompt needs the tokenizers package: pip install 'paged_kv[models]'") from None
    tokenizer = Tokenizer.from_file(str(path))
    return [tokenizer.encode(text).ids for text in args.prompt], tokenizer


def _progress(show: bool):
    if not show:
        return None, None
    from paged_kv.sim.progress import ProgressBar

    bar = ProgressBar("generate")

    def progress(done, total, stats) -> None:
        bar.label = f"generate {stats.tokens_per_s:8.1f} tokens/s, KV {stats.kv_usage_mean:4.0%}"
        bar(done, total)

    return progress, bar


def _spec(args, cfg, prompts):
    from paged_kv.models.llama import cache_spec

    max_seq_len = max(len(p) for p in prompts) + args.max_new_tokens
    blocks = -(-max_seq_len // args.block_size)
    # Default: every sequence that can run at once at full length, plus the generator's
    # admission headroom (one block per running sequence) and the null block.
    num_blocks = args.num_blocks or min(len(prompts), args.max_batch) * (blocks + 1) + 1
    try:
        return cache_spec(cfg, num_blocks=max(num_blocks, blocks + 1), block_size=args.block_size,
                          max_seq_len=max_seq_len, max_batch_slots=args.max_batch, dtype=args.dtype)
    except SpecError as exc:  # in the spec's words: say which flags set those fields
        raise SpecError(f"--max-new-tokens {args.max_new_tokens}, --block-size {args.block_size}, --num-blocks "
                        f"{args.num_blocks or 'default'}, --max-batch {args.max_batch}: {exc}") from None


def run(args) -> int:
    """Run ``paged-kv generate``; returns the exit status (2 for bad input)."""
    from paged_kv.cli.sizes import check_generate
    from paged_kv.models.generate import Generator, Request
    from paged_kv.models.loader import load_config, load_params

    directory = pathlib.Path(args.checkpoint)
    try:
        cfg = load_config(directory)
        prompts, tokenizer = _prompts(args, directory)
        spec = _spec(args, cfg, prompts)  # the spec checks its host structures against the machine
        check_generate(spec, cfg, args.dtype)  # and the pool and weights where they go: before either exists
        params = load_params(directory, cfg, dtype=args.dtype)
        generator = Generator(cfg, params, spec, prefix_cache=not args.no_prefix_cache,
                              eos_token_ids=() if args.ignore_eos else cfg.eos_token_ids,
                              prefill_chunk=args.prefill_chunk)
        show = args.progress == "on" or (args.progress == "auto" and sys.stderr.isatty())
        progress, bar = _progress(show)
        try:
            completions, stats = generator.generate([Request(p, args.max_new_tokens) for p in prompts], progress)
        finally:
            if bar is not None:
                bar.close()
    except PagedKVError as exc:
        print(f"paged-kv: error: {exc}", file=sys.stderr)
        return 2
    _report(args, completions, stats, tokenizer, spec)
    return 0


def _report(args, completions, stats, tokenizer, spec) -> None:
    rows = []
    for c in completions:
        row = dict(request_id=c.request_id, prompt=c.prompt, tokens=c.tokens, finish_reason=c.finish_reason,
                   preemptions=c.preemptions, cached_tokens=c.cached_tokens)
        if tokenizer is not None:
            row["text"] = tokenizer.decode(c.tokens)
        rows.append(row)
    if args.json:
        print(json.dumps(dict(checkpoint=str(args.checkpoint), kv_pool=spec.describe(), completions=rows,
                              stats=stats.as_dict())))
        return
    for row in rows:
        shown = repr(row["text"]) if "text" in row else " ".join(map(str, row["tokens"]))
        print(f"[{row['request_id']}] {len(row['prompt'])} prompt tokens -> {len(row['tokens'])} "
              f"({row['finish_reason']}): {shown}")
    print(f"KV pool: {spec.describe()}")
    print(stats.summary())


__all__ = ["add_parser", "run"]
