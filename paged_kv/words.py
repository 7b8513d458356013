"""Counts in messages a person reads: ``1 request``, ``2 requests``.

At the bottom of the import graph (no paged_kv import) so that errors raised by the
allocator, the models' summaries and the CLI all speak the same way."""

from __future__ import annotations


def plural(count: int, word: str, many: str | None = None) -> str:
    """``1 request``, ``2 requests``, ``1,024 blocks`` (``many``: an irregular plural)."""
    return f"{count:,} {word if count == 1 else (many or word + 's')}"


__all__ = ["plural"]
