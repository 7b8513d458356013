"""The paged manager as a simulator backend: a thin adapter over `KVCacheManager`'s
public API (admit / append / release; with the prefix cache admit_prompt, commit and
cache_tokens; fork for parallel sampling; swap_out / swap_in)."""

from __future__ import annotations

from typing import Any

import numpy as np

from paged_kv.allocator.manager import KVCacheManager
from paged_kv.allocator.swap_record import SwapRecord
from paged_kv.errors import OutOfBlocksError
from paged_kv.sched import leaves_headroom
from paged_kv.sim.backends.base import Backend, Sample
from paged_kv.sim.profile import group_kind
from paged_kv.spec import CacheSpec


class PagedBackend(Backend):
    """`KVCacheManager` with a watermark: admission leaves ``watermark`` of the pool
    free while others run, so running sequences can grow a while before one must be
    preempted (vLLM keeps the same headroom).

    ``prefix_cache=True`` builds the manager with its prefix cache (a spec the manager
    refuses raises its `SpecError` here) and admits prompts by token ids. After every
    step the tokens the step held are committed as written -- the simulator counts a
    token as written in the step that produces it -- so their full blocks become
    hittable; a sequence that finishes or is preempted keys all its tokens
    (`cache_tokens`) before it is released, so a later turn or its own re-admission
    hits them. `fork` shares every block (parallel sampling); after a fork each step is
    described with zero new tokens and committed, which retires the copy-on-write copies
    the manager queued.
    """

    name = "paged"
    reserves_ahead = False

    def __init__(self, spec: CacheSpec, watermark: float = 0.01, prefix_cache: bool = False,
                 tiers: dict[str, Any] | None = None):
        super().__init__(spec, spec.usable_blocks * spec.block_size)
        self.manager = KVCacheManager(spec, prefix_cache=prefix_cache)
        # Tiers below the device (`paged_kv.tiers`), bookkeeping only: keys and bytes moved.
        self.tiers = None
        if tiers:
            from paged_kv.tiers import CacheTiers

            self.tiers = CacheTiers(self.manager, keep_bytes=False, **tiers)
        self.caches_prefixes = bool(prefix_cache)
        self.reserve = watermark * spec.usable_blocks
        self.swapped: dict[int, SwapRecord] = {}
        self._forked = False  # a fork queues copy-on-write copies that only a commit retires
        self._kinds = tuple(group_kind(g) for g in spec.groups)
        self._group_bytes = tuple(spec.group_bytes_per_block(g) for g in range(len(spec.groups)))

    @property
    def group_kinds(self) -> tuple[str, ...]:
        return self._kinds

    def can_admit(self, seq: int, tokens: int, final_tokens: int, busy: bool) -> bool:
        m = self.manager
        if not m.can_admit(tokens):
            return False
        # num_free_blocks is the scarcest group's, so the headroom holds for every group.
        return not busy or leaves_headroom(m.num_free_blocks, self.spec.blocks_for(tokens), self.reserve)

    def admit(self, seq: int, tokens: int, final_tokens: int) -> None:
        self.manager.admit(seq, tokens)

    def can_admit_prompt(self, seq: int, token_ids: np.ndarray, chunk: int, first: bool, busy: bool) -> bool:
        # Cached blocks are block-aligned, so the blocks allocated beyond the hits are at
        # most those of the chunk and the first output token. (Hits on cached blocks no
        # one holds also leave the free count; the manager's check below counts them,
        # the watermark does not: it reserves room for growth, not for reuse.) The
        # headroom goes first: it needs no hashing of the prompt, and a blocked queue
        # head is asked again every step.
        if busy and not leaves_headroom(self.manager.num_free_blocks, self.spec.blocks_for(chunk + int(first)),
                                        self.reserve):
            return False
        return self.manager.can_admit_prompt(token_ids, chunk=chunk)

    def admit_prompt(self, seq: int, token_ids: np.ndarray, chunk: int, first: bool) -> int | None:
        m = self.manager
        cached = m.admit_prompt(seq, token_ids, chunk=chunk)
        if first and m.kv_len(seq) == token_ids.size:
            try:
                m.append([seq], 1)
            except OutOfBlocksError:
                # The hits took the last free block: undo (nothing was written, nothing keyed).
                m.release(seq)
                return None
        return cached

    def append(self, seqs: list[int], counts: np.ndarray) -> None:
        self.manager.append(seqs, counts)

    def end_step(self, seqs: list[int], held: np.ndarray, added: np.ndarray) -> None:
        if not (self.caches_prefixes or self._forked):
            return  # nothing to key, no copy to retire: a commit would change nothing
        m = self.manager
        if m.num_pending_copies:
            # A plain commit of a described step is what retires copy-on-write copies.
            m.step_metadata(seqs, 0)
            m.commit(seqs)
        elif self.caches_prefixes and seqs:
            # Only a row that filled a block has something new to key.
            bs = self.block_size
            crossed = np.flatnonzero(held // bs > (held - added) // bs)
            if crossed.size:
                m.commit([seqs[k] for k in crossed.tolist()], held[crossed])

    def finish(self, seq: int, token_ids: np.ndarray | None) -> None:
        m = self.manager
        if self.caches_prefixes and token_ids is not None:
            m.commit([seq], m.kv_len(seq))
            m.cache_tokens(seq, token_ids)
        m.release(seq)

    def release(self, seq: int) -> None:
        self.manager.release(seq)

    def can_fork(self, parent: int, child: int, tokens: int, final_tokens: int) -> bool:
        return True  # fork shares every block; the copy-on-write block comes with the child's first append

    def fork(self, parent: int, child: int, tokens: int, final_tokens: int) -> None:
        self.manager.fork(parent, child)
        self._forked = True

    def _record_bytes(self, record: SwapRecord) -> int:
        return sum(n * self.spec.group_bytes_per_block(g) for g, n in enumerate(record.num_blocks))

    def swap_out(self, seq: int) -> int:
        record = self.manager.swap_out(seq)
        self.swapped[seq] = record
        return self._record_bytes(record)

    def can_swap_in(self, seq: int, busy: bool) -> bool:
        record = self.swapped[seq]
        if not self.manager.can_swap_in(record):
            return False
        return not busy or leaves_headroom(self.manager.num_free_blocks, max(record.num_blocks), self.reserve)

    def swap_in(self, seq: int) -> int:
        record = self.swapped.pop(seq)
        self.manager.swap_in(record)
        if self.caches_prefixes:
            self.manager.commit([seq], record.num_tokens)  # the bytes are back: written
        return self._record_bytes(record)

    def sample(self) -> Sample:
        bs = self.block_size
        pools = [g.pool for g in self.manager.groups]
        used = tuple(p.num_used for p in pools)
        free = pools[0].num_free * bs
        return Sample(
            slots_allocated=used[0] * bs,
            free_slots=free,
            largest_free_run=free,
            sliding_blocks=sum(used[1:]),
            used_bytes=sum(n * b for n, b in zip(used, self._group_bytes)),
            group_blocks=used,
            group_cached=tuple(p.num_cached for p in pools) if self.caches_prefixes else (0,) * len(used),
        )

    def check_integrity(self) -> None:
        self.manager.check_integrity()
        if self.tiers is not None:
            self.tiers.check_integrity()

    def tier_report(self) -> dict[str, Any] | None:
        """Tokens hit per medium and bytes moved each way, with tiers; else None."""
        if self.tiers is None:
            return None
        st = self.tiers.stats
        return {"hit_tokens": self.tiers.hit_tokens(), "bytes_down": st.bytes_down, "bytes_up": st.bytes_up,
                "bytes_to_disk": st.bytes_to_disk, "bytes_from_disk": st.bytes_from_disk, "dropped": st.dropped}


__all__ = ["PagedBackend"]
