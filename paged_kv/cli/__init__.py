"""Command line: ``paged-kv`` (or ``python -m paged_kv``), one subcommand per module.

- ``paged-kv simulate`` (`paged_kv.cli.simulate`): replay a request trace through the
  block allocator (host only: never imports JAX).
- ``paged-kv generate`` (`paged_kv.cli.generate`): greedy generation from a Hugging Face
  checkpoint through the cache (the model and JAX load when it runs).
- `paged_kv.cli.arguments`: the argparse types they share.
- `paged_kv.cli.sizes`: the memory their size flags ask for, checked before anything is built.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from paged_kv import __version__
from paged_kv.cli import generate as _generate
from paged_kv.cli import simulate as _simulate


def build_parser() -> argparse.ArgumentParser:
    """The ``paged-kv`` argument parser: ``--version`` and one subparser per command."""
    parser = argparse.ArgumentParser(prog="paged-kv", description="Paged-block KV cache manager tools.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _simulate.add_parser(commands)
    _generate.add_parser(commands)  # argparse only: the model loads when it runs
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 for bad input, as for bad arguments)."""
    args = build_parser().parse_args(argv)
    if args.command == "generate":
        return _generate.run(args)
    return _simulate.run(args)


__all__ = ["build_parser", "main"]
