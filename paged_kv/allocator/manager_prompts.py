"""`KVCacheManager`'s prefix-cache admissions: prompts admitted through the cache, conversations keyed
by their tokens.

A part of the manager class (a mixin `KVCacheManager` inherits), in its own file so
that each file holds one idea; it reads and writes the manager's own state.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from paged_kv.allocator.arguments import check_token_ids
from paged_kv.allocator.manager_base import ManagerBase
from paged_kv.allocator.prefix_cache import chain_hashes
from paged_kv.allocator.prompts import PromptPlan, plan_prompt
from paged_kv.errors import InvalidArgumentError, InvalidTokenCountError, OutOfBlocksError, PagedKVError, SpecError


class PromptsMixin(ManagerBase):
    # ---- prefix cache --------------------------------------------------------------------
    def can_admit_prompt(self, token_ids: Sequence[int] | np.ndarray, cache_key: bytes | str | int | None = None,
                         chunk: int | None = None) -> bool:
        """Whether ``admit_prompt(new_id, token_ids, cache_key, chunk)`` would succeed now."""
        try:
            plan = self._prompt(token_ids, cache_key, chunk)
        except PagedKVError:  # a predicate answers, never raises: bad tokens, salt or chunk, cache off
            return False
        return all(need <= free for need, free in (g.prompt_needs(h, plan.hit, plan.total)
                                                   for g, h in zip(self.groups, plan.hits)))

    def admit_prompt(self, seq_id: int, token_ids: Sequence[int] | np.ndarray, cache_key: bytes | str | int | None = None,
                     chunk: int | None = None, retention: object | None = None) -> int:
        """Admit ``seq_id`` with prompt ``token_ids``, reusing the longest cached chain of
        full blocks with the same tokens (and the same ``cache_key``: an adapter name,
        a tenant salt; bytes, str or int, compared as typed values -- see
        `paged_kv.allocator.salt` for what a salt promises). Returns how many leading tokens are cached; compute the rest:
        ``step_metadata([seq_id], kv_len(seq_id) - cached)``, then `commit`.

        With several layer groups the hit is the longest every group can serve: a
        full-attention group needs the whole chain up to it, a sliding-window group only
        the blocks covering the ``W - 1`` positions before it, a chunked group only the
        current chunk's (the row's earlier entries are null, as after a trim). Only
        blocks whose writing step was committed are ever hit, and this prompt's own
        full blocks become hittable when its step is committed (see
        `paged_kv.allocator.written`). ``chunk``: hold only the cached tokens plus the
        next ``chunk`` prompt tokens now and `append` the rest later (chunked
        prefill); the prompt's keys are kept, so each committed chunk's full blocks are
        cached. All or nothing: `DuplicateSequenceError`, `InvalidTokenIdError`,
        `InvalidTokenCountError`, `SequenceTooLongError`, `OutOfBlocksError`,
        `InvalidArgumentError` (a salt of another type), `SpecError` (cache off).

        ``retention``: a `paged_kv.tiers.Retention` -- priorities (0-100) for token
        ranges of this prompt, optionally for a duration -- ranking its blocks in every
        tier's eviction; needs `CacheTiers` attached (it may hold no host or disk bytes).
        A bad one is an `InvalidArgumentError` before anything changes."""
        seq_id = self._new_id(seq_id)
        plan = None
        if retention is not None:  # checked first: a failed admission changes nothing
            if self.tiers is None:
                raise InvalidArgumentError(f"retention={retention!r} ranks blocks in the tiers' eviction: attach "
                                           "paged_kv.tiers.CacheTiers(manager) first (host_bytes=0 ranks the device's)")
            plan = self.tiers.retention_plan(retention, check_token_ids(token_ids, "admit_prompt").size)
        if self.tiers is not None:  # hits below the device become device hits first (paged_kv.tiers)
            self._require_cache()
            self.tiers.prepare(token_ids, cache_key, chunk)
        tokens, hashes, hit, hits, hold, total = self._prompt(token_ids, cache_key, chunk)
        for g, h in zip(self.groups, hits):
            need, free = g.prompt_needs(h, hit, total)
            if need > free:
                raise OutOfBlocksError(need, free, f"admit_prompt(seq_id={seq_id}, {tokens.size} tokens, {hit} cached "
                                                   f"blocks; layer group {g.index})")
        row = self._add_row(seq_id)
        for g, h in zip(self.groups, hits):
            g.admit_prompt_row(row, h, hit, total, hold, tokens.size)
        self._written.start(row, hashes, hit, self.spec.block_size)
        if self.tiers is not None:  # always: an admission also ends a reused id's decode priority
            self.tiers.retain(seq_id, hashes, tokens.size, plan, retention, None)
        return hit * self.spec.block_size

    def _prompt(self, token_ids: Sequence[int] | np.ndarray, cache_key: bytes | str | int | None,
                chunk: int | None) -> PromptPlan:
        self._require_cache()
        return plan_prompt(self.spec, self.groups, token_ids, cache_key, chunk)

    def _require_cache(self) -> None:
        if self.prefix_cache is None:
            raise SpecError("prefix caching is off: build KVCacheManager(spec, prefix_cache=True)")

    def cache_tokens(self, seq_id: int, token_ids: Sequence[int] | np.ndarray, cache_key: bytes | str | int | None = None,
                     retention: object | None = None) -> int:
        """Key ``seq_id``'s full blocks by its tokens so far (prompt and output), so a
        later prompt that continues this conversation hits them after release (multi-
        turn chat). ``token_ids`` must be the sequence's tokens, ``kv_len`` of them.
        Blocks already written (committed) are keyed now, the rest when their step is
        committed. Returns how many blocks were newly keyed now (in the first group).

        With `CacheTiers` attached, generated blocks take the decode priority of the
        sequence's `Retention`; ``retention`` (a `paged_kv.tiers.Retention` over these
        tokens) ranks them anew, as at admission (a bad one: `InvalidArgumentError`,
        nothing changed)."""
        row = self._row(seq_id)
        self._require_cache()
        n = int(self.table.kv_lens[row])
        tokens = check_token_ids(token_ids, f"cache_tokens(seq_id={seq_id})")
        if tokens.size != n:
            raise InvalidTokenCountError(
                f"cache_tokens(seq_id={seq_id}): token_ids holds {tokens.size} tokens; need the sequence's {n} tokens "
                "(append generated tokens with manager.append before caching them)"
            )
        plan = None
        if retention is not None:  # checked first: a failed call changes nothing
            if self.tiers is None:
                raise InvalidArgumentError(f"retention={retention!r} ranks blocks in the tiers' eviction: attach "
                                           "paged_kv.tiers.CacheTiers(manager) first")
            plan = self.tiers.retention_plan(retention, tokens.size)
        hashes = chain_hashes(tokens, self.spec.block_size, n // self.spec.block_size, cache_key)
        previous = self._written.hashes.get(row)
        self._written.rehash(row, hashes)
        if self.tiers is not None:  # before keying: a block takes its priority as it is stored
            self.tiers.retain(seq_id, hashes, n, plan, retention, previous)
        return self._key_written(row)

    def _key_written(self, row: int) -> int:
        """Key ``row``'s full, written, hashed blocks not keyed yet in every group; returns
        how many were new in the first group. The chain's keyed end moves, so local
        groups move blocks no longer needed at that end to the front of eviction."""
        start, stop = self._written.keyable(row, self.spec.block_size)
        if stop <= start:
            return 0
        hashes = self._written.hashes[row]
        stored = [g.key_blocks(row, hashes, start, stop) for g in self.groups]
        for g in self.groups:
            g.retire_behind(hashes, start, stop)
        self._written.mark_keyed(row, stop)
        return stored[0]


__all__ = ["PromptsMixin"]
