"""The paged manager as a simulator backend: a thin adapter over `KVCacheManager`."""

from __future__ import annotations

import numpy as np

from paged_kv.allocator.manager import KVCacheManager
from paged_kv.allocator.swap_record import SwapRecord
from paged_kv.sim.backends.base import Backend, Sample
from paged_kv.spec import CacheSpec


class PagedBackend(Backend):
    """`KVCacheManager` with a watermark: admission leaves ``watermark`` of the pool
    free while others run, so running sequences can grow a while before one must be
    preempted (vLLM keeps the same headroom)."""

    name = "paged"
    reserves_ahead = False

    def __init__(self, spec: CacheSpec, watermark: float = 0.01):
        super().__init__(spec, spec.usable_blocks * spec.block_size)
        self.manager = KVCacheManager(spec)
        self.reserve = watermark * spec.usable_blocks
        self.swapped: dict[int, SwapRecord] = {}

    def can_admit(self, seq: int, tokens: int, final_tokens: int, busy: bool) -> bool:
        m = self.manager
        if not m.can_admit(tokens):
            return False
        # num_free_blocks is the scarcest group's, so the headroom holds for every group.
        return not busy or m.num_free_blocks - self.spec.blocks_for(tokens) >= self.reserve

    def admit(self, seq: int, tokens: int, final_tokens: int) -> None:
        self.manager.admit(seq, tokens)

    def append(self, seqs: list[int], counts: np.ndarray) -> None:
        self.manager.append(seqs, counts)

    def release(self, seq: int) -> None:
        self.manager.release(seq)

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
        return not busy or self.manager.num_free_blocks - max(record.num_blocks) >= self.reserve

    def swap_in(self, seq: int) -> int:
        record = self.swapped.pop(seq)
        self.manager.swap_in(record)
        return self._record_bytes(record)

    def sample(self) -> Sample:
        m = self.manager
        bs = self.block_size
        pool = m.groups[0].pool
        return Sample(
            slots_allocated=pool.num_used * bs,
            free_slots=pool.num_free * bs,
            largest_free_run=pool.num_free * bs,
            sliding_blocks=sum(g.pool.num_used for g in m.groups[1:]),
            used_bytes=m.used_bytes,
        )

    def check_integrity(self) -> None:
        self.manager.check_integrity()


__all__ = ["PagedBackend"]
