"""`KVCacheManager`'s integrity and saved state: `check_integrity`, `snapshot`, and
the `state` / `from_state` pair checkpoints use.

A part of the manager class (a mixin `KVCacheManager` inherits), in its own file so
that each file holds one idea; it reads and writes the manager's own state.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np

from paged_kv.allocator.manager_base import ManagerBase
from paged_kv.allocator.restore_checks import check_restored
from paged_kv.allocator.saved_state import check_captured, prefixed, scoped, take
from paged_kv.allocator.written import WrittenBlocks
from paged_kv.errors import CheckpointError
from paged_kv.spec import CacheSpec


_M = TypeVar("_M", bound="StateMixin")


class StateMixin(ManagerBase):
    # ---- integrity and state -----------------------------------------------------------
    def check_integrity(self) -> None:
        """Raise AssertionError if any invariant is broken. Tests call it after every operation.

        Invariants, per group: every usable block is free xor referenced; ref counts
        equal the number of table entries naming the block (and copy pins); each row
        holds exactly ceil(len / block_size) blocks and null padding after them; rows
        in use are the rows of admitted sequences; every group holds the same lengths;
        a local group never returned a block a query can still see.
        """
        rows = np.array(sorted(self._rows.values()), dtype=np.int64)
        for g in self.groups:
            g.check_integrity(rows, self.table.kv_lens)

    def snapshot(self) -> tuple[object, ...]:
        """A comparable copy of all host state (tests check a failed call left it unchanged)."""
        rows = sorted(self._rows.items())
        return (
            tuple(rows),
            tuple((sid, int(self.table.kv_lens[r]), tuple(g.table.block_tables[r].tobytes() for g in self.groups))
                  for sid, r in rows),
            tuple((g.pool.ref_counts.tobytes(), g.pool.num_free) for g in self.groups),
            tuple(g.cache.snapshot() for g in self.groups if g.cache is not None),
            tuple(c.snapshot() for c in self._copies),
            self._written.snapshot(),
            self._slotted.snapshot(),
        )

    def state(self) -> dict[str, np.ndarray]:
        """Every array a restored manager needs to continue exactly: ``group{g}.*`` (each
        group's own state), ``manager.rows`` ((seq_id, row) in admission order) and, with
        the prefix cache, ``written.*``. `CheckpointError` if copies are pending or an
        object holds state it does not save (`saved_state.check_captured`)."""
        check_captured(self, self.SAVED_ATTRS)
        state = {"manager.rows": np.array(list(self._rows.items()), np.int64).reshape(-1, 2)}
        for g in self.groups:
            state.update(prefixed(f"group{g.index}.", g.state()))
        if self.prefix_cache is not None:
            state.update(prefixed("written.", self._written.state()))
        return state

    @classmethod
    def from_state(cls: type[_M], spec: CacheSpec, prefix_cache: bool, state: dict[str, np.ndarray]) -> _M:
        """The manager `state` describes, checked by `restore_checks.check_restored` (every
        cross-field invariant) and `check_integrity`; `CheckpointError` naming the first
        malformed or inconsistent array. Nothing is returned unless all pass."""
        manager = cls(spec, prefix_cache)
        manager.groups = [type(g).from_state(spec, g.index, prefix_cache, scoped(state, f"group{g.index}."))
                          for g in manager.groups]
        manager._copies = tuple(g.copies for g in manager.groups)
        manager.steps.table = manager.groups[0].table
        capacity = {g.table.capacity for g in manager.groups}
        if len(capacity) != 1:
            raise CheckpointError(f"the groups' page tables have {sorted(capacity)} rows; they grow in lockstep")
        seq_rows, rows = take(state, "manager.rows", np.int64, (None, 2)), capacity.pop()
        manager._rows = {int(s): int(r) for s, r in seq_rows}
        if len(manager._rows) != seq_rows.shape[0]:
            raise CheckpointError("manager.rows names a sequence id twice")
        bad = [int(r) for r in seq_rows[:, 1] if not 0 <= r < rows]
        if bad:
            raise CheckpointError(f"manager.rows points at rows {bad} outside [0, {rows})")
        manager._forked = any(bool((g.pool.ref_counts > 1).any()) for g in manager.groups)
        if prefix_cache:
            manager._written = WrittenBlocks.from_state(scoped(state, "written."), set(manager._rows.values()))
        # Explicit cross-field checks first (messages naming the array), then the
        # integrity check as the last guard: digests only catch accidents.
        check_restored(manager)
        try:
            manager.check_integrity()
        except (AssertionError, IndexError, ValueError) as exc:
            raise CheckpointError(f"the restored allocator state is inconsistent: {exc}") from exc
        return manager


__all__ = ["StateMixin"]
