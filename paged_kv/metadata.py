"""`StepMetadata`: the one object the host hands the device each step.

Host bookkeeping and device arrays meet only here. Every array is padded to a
bucketed shape (powers of two, capped by the spec) so the jitted ops compile once
per bucket instead of once per batch size, query length or table width.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import TYPE_CHECKING, Any

import numpy as np

from paged_kv.errors import InvalidArgumentError

if TYPE_CHECKING:  # annotations only: importing JAX here would cost every host-only user
    import jax

    from paged_kv.spec import CacheSpec


def pad_slot(spec: CacheSpec, group: int) -> int:
    """The flat slot padding tokens of layer group ``group`` write to: one past the group's
    last token slot (``num_blocks * block_size``). Every write scatters with
    ``mode="drop"``, so a padding token lands nowhere; this is the only definition."""
    pad: int = spec.groups[group].num_blocks * spec.block_size
    return pad


def step_layout(kv: np.ndarray, q: np.ndarray, spec: CacheSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(kv_lens [B], query_lens [B], positions [B, T], valid [B, T])`` of a step whose
    rows hold ``kv`` tokens, the last ``q`` of them new: ``B`` and ``T`` bucketed, padding
    rows empty, ``valid`` marking real tokens."""
    n = kv.size
    B, T = bucket(n, spec.max_batch_slots), bucket(int(q.max(initial=1)), spec.max_seq_len)
    kv_lens = np.zeros(B, dtype=np.int32)
    kv_lens[:n] = kv
    query_lens = np.zeros(B, dtype=np.int32)
    query_lens[:n] = q
    t = np.arange(T, dtype=np.int32)[None, :]
    valid = t < query_lens[:, None]
    # Padding tokens sit at the row's last real position so a causal mask built from
    # `positions` never leaves a padding query with nothing to attend to.
    positions = np.where(valid, (kv_lens - query_lens)[:, None] + t, np.maximum(kv_lens[:, None] - 1, 0))
    return kv_lens, query_lens, positions.astype(np.int32), valid


def bucket(n: int, cap: int) -> int:
    """Smallest power of two >= n, clipped to ``cap`` (which is itself a bucket)."""
    for name, value in (("n", n), ("cap", cap)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise InvalidArgumentError(f"bucket({name}={value!r}): sizes are integers")
    n = max(int(n), 1)
    return min(1 << (n - 1).bit_length(), int(cap))


@dataclasses.dataclass(frozen=True)
class GroupMetadata:
    """Tables of one layer group (see `CacheSpec.groups`) for one step.

    ``block_tables[b]`` lists the blocks the view gathers for row ``b``, starting at
    logical token ``start[b]`` (0 for full attention; for a sliding window, the first
    block any of this step's queries can see). ``slot_mapping[b, t]`` is the flat
    page slot of new token ``t`` in this group's pages.
    """

    block_tables: np.ndarray  # int32 [B, W]
    slot_mapping: np.ndarray  # int32 [B, T]
    start: np.ndarray  # int32 [B]
    # Copy-on-write: the first copy_len[i] token slots of block copy_src[i] are copied
    # into block copy_dst[i] in every layer of the group before this step's write, in
    # order (padding: length 0). See `paged_kv.allocator.pending_copies` for why partial.
    copy_src: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int32))  # int32 [C]
    copy_dst: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int32))  # int32 [C]
    copy_len: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int32))  # int32 [C]
    # Binding (see `paged_kv.binding`): the generation each named block had when
    # the step was described (`BlockPool.generation`; 0 for the null block). The device
    # reads and writes a block only while it is still that generation, so metadata kept
    # past its blocks changing hands touches nothing of the new owner's. None: all 0
    # (hand-built metadata: a fresh cache's blocks only).
    block_gens: np.ndarray | None = None  # int32 [B, W]
    copy_src_gen: np.ndarray | None = None  # int32 [C]
    copy_dst_gen: np.ndarray | None = None  # int32 [C]

    def __post_init__(self) -> None:
        # Own fields, set once at construction (a frozen dataclass's only way to default
        # one field from another's shape).
        if self.block_gens is None:
            object.__setattr__(self, "block_gens", np.zeros(np.shape(self.block_tables), np.int32))
        for name in ("copy_src_gen", "copy_dst_gen"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, np.zeros(np.shape(self.copy_src), np.int32))


@dataclasses.dataclass(frozen=True)
class StepMetadata:
    """Where this step's tokens go and what each batch row may attend to.

    Shapes: ``B`` batch rows (bucketed), ``T`` new tokens per row (bucketed),
    ``W`` block-table width (bucketed per group). Padding rows have ``kv_lens == 0``
    and tables of null blocks; padding tokens have an out-of-range slot the write
    drops. ``groups[g]`` serves the layers of ``spec.groups[g]``.
    """

    kv_lens: np.ndarray  # int32 [B]    tokens held after this step's write
    query_lens: np.ndarray  # int32 [B]    new tokens this step
    positions: np.ndarray  # int32 [B, T] logical position of each new token
    groups: tuple[GroupMetadata, ...]  # GroupMetadata per layer group
    # Static: `CacheSpec.pool_signature()` of the manager that built it. Views refuse
    # metadata built for other pages (its block ids would be dropped or read out of
    # range: zeros on CPU, undefined on accelerators).
    built_for: tuple[Any, ...] | None = None
    # Host only (not a pytree field: it never reaches the device and never recompiles):
    # the `Step` this metadata describes, for ``manager.commit(step)``. Lost by
    # `to_device` and by tree maps; keep ``meta.step`` before handing metadata over.
    # Flattening (a jitted call, `to_device`) refuses a step whose sequences were
    # released since (`Step.check_live`: `StaleStepError`). A `StepBatch`'s reused
    # metadata names the batch, which checks (and commits) its last step.
    step: object = dataclasses.field(default=None, compare=False)
    # The serial (`StepLog.owner`) of the manager that built it, an int32 scalar: a
    # cache's pages serve one manager (`paged_kv.binding`), and metadata of another
    # reads the null block and writes nothing. A device value, not static: replicas'
    # managers share compiled programs. None: 0 (hand-built; an unbound cache only).
    owner: np.ndarray | None = None

    @property
    def batch_size(self) -> int:
        """Rows ``B`` of this step, padding rows included (a bucket)."""
        n: int = self.kv_lens.shape[0]
        return n

    @property
    def query_len(self) -> int:
        """New tokens per row ``T``, padded (a bucket): feed tokens shaped ``[batch_size, query_len]``."""
        t: int = self.positions.shape[1]
        return t

    # The first group's tables: full attention's when the model has any full layer.
    @property
    def block_tables(self) -> np.ndarray:
        """The first group's ``[B, W]`` block tables (full attention's if the model has a full layer)."""
        return self.groups[0].block_tables

    @property
    def slot_mapping(self) -> np.ndarray:
        """The first group's ``[B, T]`` flat write slots; padding tokens get an out-of-range slot."""
        return self.groups[0].slot_mapping

    @property
    def table_width(self) -> int:
        """Block-table width ``W`` of the first group (a bucket)."""
        w: int = self.groups[0].block_tables.shape[1]
        return w

    def __post_init__(self) -> None:
        if self.owner is None:
            object.__setattr__(self, "owner", np.zeros((), np.int32))
        _register_if_jax()

    def to_device(self, device: jax.Device | jax.sharding.Sharding | None = None) -> "StepMetadata":
        """One transfer of every array (a pytree ``device_put``).

        The arrays are copied first: on CPU ``device_put`` may alias a numpy buffer,
        and a `StepBatch` rewrites its buffers in place on the next step."""
        register_pytrees()
        import jax

        on_device: StepMetadata = jax.device_put(jax.tree_util.tree_map(np.array, self), device)
        return on_device


_registered = False


def register_pytrees() -> None:
    """Make the metadata classes JAX pytrees (idempotent).

    Deferred so that the host side (allocator, simulator) never imports JAX: it runs
    when a device module is imported (`paged_kv.ops`), on `to_device`, and when
    metadata is built in a process that has already imported JAX.
    """
    global _registered
    if _registered:
        return
    import jax

    jax.tree_util.register_dataclass(GroupMetadata, data_fields=list(_GROUP_FIELDS), meta_fields=[])
    jax.tree_util.register_pytree_with_keys(StepMetadata, _flatten_with_keys, _unflatten, _flatten)
    _registered = True


_FIELDS = ("kv_lens", "query_lens", "positions", "groups", "owner")
_GROUP_FIELDS = ("block_tables", "slot_mapping", "start", "copy_src", "copy_dst", "copy_len", "block_gens",
                 "copy_src_gen", "copy_dst_gen")  # GroupMetadata's, in its constructor's order


def _flatten(meta: StepMetadata) -> tuple[tuple[Any, ...], tuple[Any, ...] | None]:
    # The device boundary: metadata whose sequences were released since it was
    # described would address blocks that may be another sequence's by now.
    step = meta.step
    if step is not None:
        step.check_live()  # type: ignore[attr-defined]  # a Step, or a StepBatch naming its last
        if getattr(step, "reuses_buffers", False):
            return _copied(meta), meta.built_for
    return (meta.kv_lens, meta.query_lens, meta.positions, meta.groups, meta.owner), meta.built_for


def _copied(meta: StepMetadata) -> tuple[Any, ...]:
    """The children of a `StepBatch`'s metadata, copied. Its arrays are the batch's
    buffers, rewritten in place by its next step, and on CPU a jitted call may take a
    numpy argument without copying it and run after the call returns: an engine that
    describes step N+1 while step N runs would otherwise change step N's slots under it
    (a token written into another row's block). A few small copies per call."""
    groups = tuple(GroupMetadata(*(_fresh(getattr(g, f)) for f in _GROUP_FIELDS)) for g in meta.groups)
    return np.array(meta.kv_lens), np.array(meta.query_lens), np.array(meta.positions), groups, meta.owner


def _fresh(array: Any) -> Any:
    return None if array is None else np.array(array)


def _flatten_with_keys(meta: StepMetadata) -> tuple[tuple[Any, ...], tuple[Any, ...] | None]:
    children, aux = _flatten(meta)
    import jax

    return tuple((jax.tree_util.GetAttrKey(name), child) for name, child in zip(_FIELDS, children)), aux


def _unflatten(built_for: tuple[Any, ...] | None, children: Any) -> StepMetadata:
    kv_lens, query_lens, positions, groups, owner = children
    return StepMetadata(kv_lens, query_lens, positions, groups, built_for, owner=owner)  # the host-only step stays behind


def _register_if_jax() -> None:
    # One flag and one dict lookup per metadata object: cheap beside its arrays.
    if not _registered and "jax" in sys.modules:
        register_pytrees()


_register_if_jax()

__all__ = ["GroupMetadata", "StepMetadata", "bucket", "pad_slot", "register_pytrees", "step_layout"]
