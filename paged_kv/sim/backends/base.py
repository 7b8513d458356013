"""What the scheduler simulator asks of a memory backend.

The scheduler decides *who* runs (FCFS, batch limit, token budget); a backend decides
*whether memory allows it* and reports what it holds. Keeping that split lets the
paged manager and the contiguous baselines be compared on the same trace with the
same admission order, so every difference in the figures is the allocator's.
"""

from __future__ import annotations

import abc

import attrs
import numpy as np

from paged_kv.spec import CacheSpec


@attrs.frozen
class Sample:
    """A backend's memory state after one step, in token slots (one slot holds one
    token's keys and values in every layer)."""

    slots_allocated: int
    """Slots reserved by running sequences, whether or not a token is in them yet."""
    free_slots: int
    largest_free_run: int
    """The biggest reservation that could be made now. Paged: all free slots (any free
    block serves any sequence); an arena: its longest contiguous free run."""
    sliding_blocks: int = 0
    """Blocks held by sliding-window layer groups (paged only)."""
    used_bytes: int = 0
    group_blocks: tuple[int, ...] = ()
    """Blocks held per layer group (paged; empty: one group of ``slots_allocated``)."""
    group_cached: tuple[int, ...] = ()
    """Blocks per group that no sequence holds but the prefix cache keeps (evictable)."""


def equal_memory_slots(spec: CacheSpec) -> int:
    """Token slots a contiguous cache gets from the bytes of ``spec``'s usable blocks.

    Contiguous caches keep every layer at full length, so with sliding layers the
    same bytes hold fewer all-layer slots than the paged full-attention group has.
    """
    usable_bytes = sum((g.num_blocks - 1) * spec.group_bytes_per_block(i) for i, g in enumerate(spec.groups))
    return usable_bytes // spec.bytes_per_token


class Backend(abc.ABC):
    """Memory for the sequences the scheduler runs, addressed by request index.

    Calls mirror `KVCacheManager`: ``admit`` the first tokens of a sequence,
    ``append`` tokens to running ones (raising `OutOfBlocksError`, changing nothing,
    when memory is short), ``release`` a finished or preempted one.
    """

    name: str
    caches_prefixes: bool = False
    """True when admission goes through `admit_prompt` (token ids, prefix-cache hits)."""
    reserves_ahead: bool = False
    """True when ``admit`` reserves everything a sequence will ever hold, so ``append``
    never allocates or fails. The scheduler then skips ahead over steps in which
    nothing but decoding happens (their figures are exact, recorded as one span)."""

    def __init__(self, spec: CacheSpec, capacity_slots: int):
        self.spec = spec
        self.capacity_slots = int(capacity_slots)
        self.block_size = spec.block_size

    @abc.abstractmethod
    def can_admit(self, seq: int, tokens: int, final_tokens: int, busy: bool) -> bool:
        """Whether ``admit`` would succeed and leave enough headroom. ``final_tokens`` is
        the length the sequence will reach (used only by exact-length reservation);
        ``busy`` says whether other sequences are running."""

    @abc.abstractmethod
    def admit(self, seq: int, tokens: int, final_tokens: int) -> None:
        """Reserve memory for request ``seq`` holding ``tokens`` now (``final_tokens`` at its end)."""

    @abc.abstractmethod
    def append(self, seqs: list[int], counts: np.ndarray) -> None:
        """Grow each of ``seqs`` by its count, all or nothing; `OutOfBlocksError` when memory is short."""

    @abc.abstractmethod
    def release(self, seq: int) -> None:
        """Free everything ``seq`` holds."""

    @abc.abstractmethod
    def sample(self) -> Sample:
        """The memory state now, for the step's profile row."""

    @property
    def group_kinds(self) -> tuple[str, ...]:
        """Each layer group's attention (`paged_kv.sim.profile.group_kind`); contiguous caches are one full group."""
        return ("full",)

    def can_admit_prompt(self, seq: int, token_ids: np.ndarray, chunk: int, first: bool, busy: bool) -> bool:
        """Whether `admit_prompt` would succeed now and leave enough headroom (prefix-caching backends)."""
        raise NotImplementedError(f"the {self.name} backend has no prefix cache")

    def admit_prompt(self, seq: int, token_ids: np.ndarray, chunk: int, first: bool) -> int | None:
        """Admit ``seq`` with prompt ``token_ids``, reusing cached leading blocks; hold the
        cached tokens plus the next ``chunk`` prompt tokens, and the first output token
        too when that ends the prompt and ``first``. Returns the cached tokens, or None
        when the admission did not fit after all (then nothing is held)."""
        raise NotImplementedError(f"the {self.name} backend has no prefix cache")

    def end_step(self, seqs: list[int], held: np.ndarray, added: np.ndarray) -> None:
        """The step ran: ``seqs`` hold ``held`` tokens, ``added`` of them new this step
        (the paged backend commits what was written)."""

    def finish(self, seq: int, token_ids: np.ndarray | None) -> None:
        """``seq`` leaves (done, or preempted by recompute): a prefix-caching backend keys
        its tokens ``token_ids`` (all it holds) for later requests, then releases it."""
        self.release(seq)

    def can_fork(self, parent: int, child: int, tokens: int, final_tokens: int) -> bool:
        """Whether `fork` would succeed now. Default: room for a copy of the parent's ``tokens``."""
        return self.can_admit(child, tokens, final_tokens, True)

    def fork(self, parent: int, child: int, tokens: int, final_tokens: int) -> None:
        """``child`` continues from ``parent``'s ``tokens`` (parallel sampling). Default: a
        copy in memory of its own, as a cache that cannot share blocks must make."""
        self.admit(child, tokens, final_tokens)

    def swap_out(self, seq: int) -> int:
        """Move ``seq``'s memory to the host and free it; return the bytes moved."""
        raise NotImplementedError(f"the {self.name} backend never preempts, so it has no swap")

    def can_swap_in(self, seq: int, busy: bool) -> bool:
        """Whether `swap_in` would succeed now and leave enough headroom (``busy``: others run)."""
        raise NotImplementedError(f"the {self.name} backend never preempts, so it has no swap")

    def swap_in(self, seq: int) -> int:
        """Bring a swapped-out ``seq`` back; return the bytes moved."""
        raise NotImplementedError(f"the {self.name} backend never preempts, so it has no swap")

    def check_integrity(self) -> None:
        """Raise AssertionError if the backend's bookkeeping is inconsistent."""


__all__ = ["Backend", "Sample", "equal_memory_slots"]
