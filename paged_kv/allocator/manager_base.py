"""`ManagerBase`: what `KVCacheManager`'s mixins (`hot_path`, `manager_commit`,
`manager_prompts`, `manager_swap`, `manager_state`) read and call of the manager,
declared once so that each mixin type-checks in its own file.

Declarations only: the attributes are set by `KVCacheManager.__init__` (and
`StateMixin.from_state`), the methods are defined by `KVCacheManager` or another
mixin. At run time this class holds nothing but annotations, so inheriting it
changes no behaviour; a type checker checks each definition against its
declaration here (an override with another signature is an error).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

if TYPE_CHECKING:
    import numpy as np

    from paged_kv.allocator.block_pool import BlockPool
    from paged_kv.allocator.groups import GroupAllocator
    from paged_kv.allocator.page_table import PageTable
    from paged_kv.allocator.pending_copies import PendingCopies
    from paged_kv.allocator.prefix_cache import PrefixCache
    from paged_kv.allocator.slot_claims import SlotClaims
    from paged_kv.allocator.steps import Step, StepLog
    from paged_kv.allocator.written import WrittenBlocks
    from paged_kv.spec import CacheSpec


class TierHooks(Protocol):
    """What the manager calls on the tiers attached to it (`paged_kv.tiers.CacheTiers`,
    which imports the allocator: the allocator names the tiers by this protocol only)."""

    def retention_plan(self, retention: object, num_tokens: int) -> dict[int, int]: ...

    def prepare(self, token_ids: Sequence[int] | np.ndarray, cache_key: bytes | str | int | None = None,
                chunk: int | None = None) -> int: ...

    # ``seq_id``'s chain is now ``hashes`` over ``num_tokens`` tokens: admitted
    # (``previous`` None) or given by cache_tokens (``previous``: the chain it replaces).
    # retention: a `paged_kv.tiers.Retention` that `retention_plan` accepted, or None
    # (Any: the allocator does not import the tiers).
    def retain(self, seq_id: int, hashes: Sequence[int], num_tokens: int, plan: dict[int, int] | None,
               retention: Any, previous: Sequence[int] | None) -> None: ...


class ManagerBase:
    """The manager's own state and the methods its parts call on one another (see the
    module docstring; `KVCacheManager` documents each)."""

    SAVED_ATTRS: ClassVar[frozenset[str]]
    spec: CacheSpec
    groups: list[GroupAllocator]
    _rows: dict[int, int]
    _copies: tuple[PendingCopies, ...]
    steps: StepLog
    signature: tuple[Any, ...]
    _described: dict[int, int]
    _written: WrittenBlocks
    _slotted: SlotClaims
    _forked: bool
    tiers: TierHooks | None

    if TYPE_CHECKING:
        def __init__(self, spec: CacheSpec, prefix_cache: bool = False) -> None: ...

        @property
        def pool(self) -> BlockPool: ...

        @property
        def table(self) -> PageTable: ...

        @property
        def pad_slot(self) -> int: ...

        @property
        def prefix_cache(self) -> PrefixCache | None: ...

        def release(self, seq_id: int) -> int: ...

        def _row(self, seq_id: object) -> int: ...

        def _new_id(self, seq_id: object) -> int: ...

        def _add_row(self, seq_id: int) -> int: ...

        def _check_not_slotted(self, seq_id: int, what: str) -> None: ...

        def _rows_and_counts(self, seq_ids: Iterable[int],
                             num_tokens: int | Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

        def _nothing_to_commit(self, seq_ids: object) -> bool: ...

        def _key_written(self, row: int) -> int: ...

        def note_step(self, step_id: int, seq_ids: Sequence[int], rows: Sequence[int] | np.ndarray,
                      lengths: Sequence[int] | np.ndarray) -> Step: ...


__all__ = ["ManagerBase", "TierHooks"]
