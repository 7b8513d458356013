"""Baseline: one contiguous ``max_seq_len`` buffer per batch slot.

This is the layout of the contiguous caches paged_kv replaces: a plain numpy KV
cache (``[batch, heads, max_seq_len, dim]`` per layer) and EasyDeL's
``TransformerCache`` (``[batch, sequence_length, heads, dim]``) both preallocate
the full length for every slot, so at equal memory they run
``capacity // max_seq_len`` sequences however short those are. Both have the same memory arithmetic; this backend stands for both.
"""

from __future__ import annotations

import numpy as np

from paged_kv.sim.backends.base import Backend, Sample
from paged_kv.spec import CacheSpec


class ContiguousMaxLenBackend(Backend):
    """One ``max_seq_len`` buffer per running sequence, as the contiguous caches paged_kv replaces reserve."""
    name = "contiguous-max-len"
    reserves_ahead = True

    def __init__(self, spec: CacheSpec, capacity_slots: int, max_seq_len: int | None = None):
        super().__init__(spec, capacity_slots)
        self.max_seq_len = int(spec.max_seq_len if max_seq_len is None else max_seq_len)
        self.num_slots = self.capacity_slots // self.max_seq_len
        self.holders: set[int] = set()

    def can_admit(self, seq: int, tokens: int, final_tokens: int, busy: bool) -> bool:
        return len(self.holders) < self.num_slots and final_tokens <= self.max_seq_len

    def admit(self, seq: int, tokens: int, final_tokens: int) -> None:
        assert self.can_admit(seq, tokens, final_tokens, True) and seq not in self.holders
        self.holders.add(seq)

    def append(self, seqs: list[int], counts: np.ndarray) -> None:
        pass  # the slot's buffer already spans max_seq_len

    def release(self, seq: int) -> None:
        self.holders.remove(seq)

    def sample(self) -> Sample:
        used = len(self.holders) * self.max_seq_len
        free = self.capacity_slots - used
        # A new sequence needs a whole max_seq_len buffer: leftover bytes below that serve no one.
        largest = self.max_seq_len if len(self.holders) < self.num_slots else 0
        return Sample(used, free, largest, 0, used * self.spec.bytes_per_token)

    def check_integrity(self) -> None:
        if len(self.holders) > self.num_slots:
            raise AssertionError(f"{len(self.holders)} sequences in {self.num_slots} buffers")


__all__ = ["ContiguousMaxLenBackend"]
