"""Planning a prompt's admission through the prefix cache: its keys, the hit every layer
group can serve, and what it holds now.

A hit must be valid in every group at once: a full-attention group needs the whole
chain up to the hit point, a sliding group only the blocks its next query reads, a
chunked group only the current chunk's (`GroupAllocator.longest_hit`). The longest
hit they all serve is a fixed point (`common_hit`). Planning reads the caches and
changes nothing, so `can_admit_prompt` and `admit_prompt` share it.
"""

from __future__ import annotations

from collections.abc import Container, Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from paged_kv.allocator.arguments import check_count, check_token_ids
from paged_kv.allocator.prefix_cache import chain_hashes
from paged_kv.errors import InvalidTokenCountError, SequenceTooLongError
from paged_kv.spec import CacheSpec

if TYPE_CHECKING:
    from paged_kv.allocator.groups import GroupAllocator


class PromptPlan(NamedTuple):
    """A validated prompt: its tokens, its full blocks' keys, the blocks hit, per group the
    cached blocks that hit revives, the tokens held now (all of them, or the hit plus one
    chunk) and the blocks those need."""

    tokens: np.ndarray
    hashes: list[int]
    hit: int
    hits: tuple[np.ndarray, ...]
    hold: int
    total: int


def common_hit(groups: Sequence[GroupAllocator], hashes: list[int], limit: int,
               present: Sequence[Container[int]] | None = None) -> int:
    """The longest hit (in blocks, at most ``limit``) every group can serve.

    Each group in turn proposes its longest hit no longer than the current candidate,
    until a whole round changes nothing (a fixed point, as vLLM's hybrid coordinator
    finds it). Each proposal is the longest valid one below the candidate, so no hit
    longer than the result is valid for every group. ``present``: per group, what
    counts as cached (default: the group's device cache; `paged_kv.tiers` passes the
    tiers below too)."""
    hit, agreed, i = limit, 0, 0
    while agreed < len(groups):  # until every group in a row accepts the candidate
        g = i % len(groups)
        proposal = groups[g].longest_hit(hashes, hit, None if present is None else present[g])
        agreed = agreed + 1 if proposal == hit else 1  # a group accepts its own proposal
        hit, i = proposal, i + 1
    return hit


def plan_prompt(spec: CacheSpec, groups: Sequence[GroupAllocator], token_ids: Sequence[int] | np.ndarray,
                cache_key: bytes | str | int | None, chunk: int | None) -> PromptPlan:
    """Validate a prompt and find its hit; typed errors, nothing changed."""
    tokens = check_token_ids(token_ids, "admit_prompt")
    bs, limit, blocks = spec.block_size, spec.max_blocks_per_seq, spec.blocks_for(tokens.size)
    if blocks > limit:
        raise SequenceTooLongError(f"a prompt of {tokens.size} tokens needs {blocks} blocks > max_blocks_per_seq={limit}")
    hashes = chain_hashes(tokens, bs, tokens.size // bs, cache_key)
    # The last token is always computed (its logits start decoding), so a hit covers
    # at most the full blocks before it.
    hit = common_hit(groups, hashes, (tokens.size - 1) // bs)
    hold, total = tokens.size, blocks
    if chunk is not None:
        chunk = check_count(chunk, "chunk")
        if chunk < 1:
            raise InvalidTokenCountError(f"chunk={chunk}: a prefill chunk computes at least 1 token")
        hold = min(hit * bs + chunk, tokens.size)
        total = spec.blocks_for(hold)
    return PromptPlan(tokens, hashes, hit, tuple(g.hit_blocks(hashes, hit) for g in groups), hold, total)


__all__ = ["PromptPlan", "common_hit", "plan_prompt"]
