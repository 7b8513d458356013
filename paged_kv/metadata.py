"""`StepMetadata`: the one object the host hands the device each step.

Host bookkeeping and device arrays meet only here. Every array is padded to a
bucketed shape (powers of two, capped by the spec) so the jitted ops compile once
per bucket instead of once per batch size, query length or table width.

Positions and slots may be *derived* rather than carried. They follow from the
lengths, block tables and starts by two rules (`derive_positions`, `derive_slots`),
so a step whose rows write many tokens (a prompt joining: ``T`` in the thousands)
need not build ``[B, T]`` arrays on the host: the builders of step metadata hand
``positions=None`` and ``slot_mapping=None`` with ``query_len=T``. Reading either
attribute computes it -- numpy on the host, jax.numpy under jit -- so every reader
sees the same arrays whichever way the step was built; the host's cost of a step is
then O(B x W), not O(B x T).
"""

from __future__ import annotations

import sys
from operator import attrgetter
from typing import TYPE_CHECKING, Any

import numpy as np

from paged_kv.derived import derive_positions, derive_slots
from paged_kv.errors import InvalidArgumentError, StateError

if TYPE_CHECKING:  # annotations only: importing JAX here would cost every host-only user
    import jax

    from paged_kv.spec import CacheSpec


def pad_slot(spec: CacheSpec, group: int) -> int:
    """The flat slot padding tokens of layer group ``group`` write to: one past the group's
    last token slot (``num_blocks * block_size``). Every write scatters with
    ``mode="drop"``, so a padding token lands nowhere; this is the only definition."""
    pad: int = spec.groups[group].num_blocks * spec.block_size
    return pad


def bucket(n: int, cap: int) -> int:
    """Smallest power of two >= n, clipped to ``cap`` (which is itself a bucket)."""
    for name, value in (("n", n), ("cap", cap)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise InvalidArgumentError(f"bucket({name}={value!r}): sizes are integers")
    n = max(int(n), 1)
    return min(1 << (n - 1).bit_length(), int(cap))


_EMPTY = np.zeros(0, dtype=np.int32)  # no copy-on-write copies (shared, read-only)
_EMPTY.flags.writeable = False
_NO_OWNER = np.zeros((), dtype=np.int32)  # hand-built metadata: an unbound cache only
_NO_OWNER.flags.writeable = False


def _field(name: str, doc: str) -> Any:
    """A read-only attribute (the metadata is immutable) read from its private slot at C
    speed; the class annotates each with its type."""
    return property(attrgetter(f"_{name}"), doc=doc)


class GroupMetadata:
    """Tables of one layer group (see `CacheSpec.groups`) for one step.

    ``block_tables[b]`` lists the blocks the view gathers for row ``b``, starting at
    logical token ``start[b]`` (0 for full attention; for a sliding window, the first
    block any of this step's queries can see). ``slot_mapping[b, t]`` is the flat
    page slot of new token ``t`` in this group's pages: given, or None to derive it
    (`derive_slots`; then ``pad``, the group's padding slot, and ``block_size`` are
    required) from the step it belongs to.

    Copy-on-write: the first ``copy_len[i]`` token slots of block ``copy_src[i]`` are
    copied into block ``copy_dst[i]`` in every layer of the group before this step's
    write, in order (padding: length 0). See `paged_kv.allocator.pending_copies` for
    why partial.

    Binding (see `paged_kv.binding`): ``block_gens`` is the generation each named block
    had when the step was described (`BlockPool.generation`; 0 for the null block).
    The device reads and writes a block only while it is still that generation, so
    metadata kept past its blocks changing hands touches nothing of the new owner's.
    None: all 0 (hand-built metadata: a fresh cache's blocks only).

    Immutable (read-only attributes; `replace` makes a changed copy).
    """

    __slots__ = ("_block_tables", "_slot_mapping", "_start", "_copy_src", "_copy_dst", "_copy_len", "_block_gens",
                 "_copy_src_gen", "_copy_dst_gen", "_pad", "_block_size", "_src")

    def __init__(self, block_tables: np.ndarray, slot_mapping: np.ndarray | None, start: np.ndarray,
                 copy_src: np.ndarray | None = None, copy_dst: np.ndarray | None = None,
                 copy_len: np.ndarray | None = None, block_gens: np.ndarray | None = None,
                 copy_src_gen: np.ndarray | None = None, copy_dst_gen: np.ndarray | None = None, *,
                 pad: int | None = None, block_size: int | None = None) -> None:
        if slot_mapping is None and (type(pad) is not int or type(block_size) is not int or block_size < 1):
            raise InvalidArgumentError(
                f"GroupMetadata(slot_mapping=None, pad={pad!r}, block_size={block_size!r}): a derived slot mapping "
                "needs the group's padding slot and block size as ints; or pass slot_mapping")
        self._block_tables, self._slot_mapping, self._start = block_tables, slot_mapping, start
        self._copy_src = _EMPTY if copy_src is None else copy_src
        self._copy_dst = _EMPTY if copy_dst is None else copy_dst
        self._copy_len = _EMPTY if copy_len is None else copy_len
        self._block_gens = np.zeros(np.shape(block_tables), np.int32) if block_gens is None else block_gens
        self._copy_src_gen = np.zeros(np.shape(self._copy_src), np.int32) if copy_src_gen is None else copy_src_gen
        self._copy_dst_gen = np.zeros(np.shape(self._copy_src), np.int32) if copy_dst_gen is None else copy_dst_gen
        self._pad, self._block_size = pad, block_size
        self._src: tuple[Any, Any, Any, int] | None = None  # a derived group's step: (kv, q, positions, T)

    block_tables: np.ndarray = _field("block_tables", "int32 [B, W]: the blocks each row's view gathers.")
    start: np.ndarray = _field("start", "int32 [B]: the logical token the row's table starts at.")
    copy_src: np.ndarray = _field("copy_src", "int32 [C]: copy-on-write sources.")
    copy_dst: np.ndarray = _field("copy_dst", "int32 [C]: copy-on-write destinations.")
    copy_len: np.ndarray = _field("copy_len", "int32 [C]: token slots each copy takes (0: padding).")
    block_gens: np.ndarray = _field("block_gens", "int32 [B, W]: each named block's generation (`paged_kv.binding`).")
    copy_src_gen: np.ndarray = _field("copy_src_gen", "int32 [C]: the copies' sources' generations.")
    copy_dst_gen: np.ndarray = _field("copy_dst_gen", "int32 [C]: the copies' destinations' generations.")
    pad: int | None = _field("pad", "A derived slot mapping's padding slot (`pad_slot`), or None.")
    block_size: int | None = _field("block_size", "A derived slot mapping's block size, or None.")

    @property
    def derived(self) -> bool:
        """True when the slot mapping is computed (`derive_slots`) rather than carried."""
        return self._slot_mapping is None

    @property
    def slot_mapping(self) -> np.ndarray:
        """int32 ``[B, T]``: the flat write slot of each new token; padding tokens get an
        out-of-range slot (computed each time it is read when derived)."""
        given = self._slot_mapping
        if given is not None:
            return given
        src = self._src
        if src is None:
            raise StateError("this GroupMetadata derives its slot mapping from its StepMetadata's lengths and "
                             "positions: read it through the StepMetadata (meta.groups[g].slot_mapping)")
        kv, q, positions, T = src
        if positions is None:
            positions = derive_positions(kv, q, T)
        pad, size = self._pad, self._block_size
        assert pad is not None and size is not None  # checked at construction: a derived group has both
        slots: np.ndarray = derive_slots(q, positions, self._block_tables, self._start, pad, size)
        return slots

    def fields(self) -> dict[str, Any]:
        """The constructor's arguments, by name (``slot_mapping`` None when derived)."""
        return {"block_tables": self._block_tables, "slot_mapping": self._slot_mapping, "start": self._start,
                "copy_src": self._copy_src, "copy_dst": self._copy_dst, "copy_len": self._copy_len,
                "block_gens": self._block_gens, "copy_src_gen": self._copy_src_gen,
                "copy_dst_gen": self._copy_dst_gen, "pad": self._pad, "block_size": self._block_size}

    def replace(self, **changes: Any) -> GroupMetadata:
        """A copy with ``changes`` (constructor arguments by name)."""
        return GroupMetadata(**{**self.fields(), **changes})

    __replace__ = replace  # `copy.replace` (Python 3.13)

    def _linked(self, src: tuple[Any, Any, Any, int]) -> GroupMetadata:
        """This group as part of a step with lengths, positions and ``T`` ``src``: itself
        (a carried slot mapping needs nothing; a derived one remembers the step's
        arrays), or a copy when it already belongs to a step with other arrays."""
        if self._slot_mapping is not None:
            return self
        cur = self._src
        if cur is None:
            self._src = src
            return self
        if cur[0] is src[0] and cur[1] is src[1] and cur[2] is src[2] and cur[3] == src[3]:
            return self
        copy = self.replace()
        copy._src = src
        return copy

    def __repr__(self) -> str:
        shape = tuple(np.shape(self._block_tables))
        how = "derived" if self._slot_mapping is None else "carried"
        return f"GroupMetadata(block_tables {shape}, slot_mapping {how}, {int(np.shape(self._copy_len)[0])} copies)"


class StepMetadata:
    """Where this step's tokens go and what each batch row may attend to.

    Shapes: ``B`` batch rows (bucketed), ``T`` new tokens per row (bucketed),
    ``W`` block-table width (bucketed per group). Padding rows have ``kv_lens == 0``
    and tables of null blocks; padding tokens have an out-of-range slot the write
    drops. ``groups[g]`` serves the layers of ``spec.groups[g]``.

    ``positions`` (int32 ``[B, T]``, the logical position of each new token) is given,
    or None to derive it (`derive_positions`): then ``query_len`` (``T``) is required.

    ``built_for``: `CacheSpec.pool_signature()` of the manager that built it (static).
    Views refuse metadata built for other pages (its block ids would be dropped or read
    out of range: zeros on CPU, undefined on accelerators).

    ``step`` (host only: not a pytree field, it never reaches the device and never
    recompiles): the `Step` this metadata describes, for ``manager.commit(step)``. Lost
    by `to_device` and by tree maps; keep ``meta.step`` before handing metadata over.
    Flattening (a jitted call, `to_device`) refuses a step whose sequences were
    released since (`Step.check_live`: `StaleStepError`). A `StepBatch`'s reused
    metadata names the batch, which checks (and commits) its last step.

    ``owner``: the serial (`StepLog.owner`) of the manager that built it, an int32
    scalar: a cache's pages serve one manager (`paged_kv.binding`), and metadata of
    another reads the null block and writes nothing. A device value, not static:
    replicas' managers share compiled programs. None: 0 (hand-built; an unbound cache
    only).

    Immutable (read-only attributes; `replace` makes a changed copy).
    """

    __slots__ = ("_kv_lens", "_query_lens", "_positions", "_groups", "_built_for", "_step", "_owner", "_query_len")

    def __init__(self, kv_lens: np.ndarray, query_lens: np.ndarray, positions: np.ndarray | None,
                 groups: tuple[GroupMetadata, ...], built_for: tuple[Any, ...] | None = None, step: object = None,
                 owner: np.ndarray | None = None, *, query_len: int | None = None) -> None:
        if positions is not None:
            query_len = positions.shape[1]
        elif type(query_len) is not int or query_len < 1:
            raise InvalidArgumentError(f"StepMetadata(positions=None, query_len={query_len!r}): derived positions "
                                       "need the step's query length T, an int >= 1; or pass positions")
        self._kv_lens, self._query_lens, self._positions = kv_lens, query_lens, positions
        self._built_for, self._step = built_for, step
        self._query_len: int = query_len
        self._owner = _NO_OWNER if owner is None else owner
        src = (kv_lens, query_lens, positions, query_len)
        self._groups = tuple([g._linked(src) for g in groups])
        if not _registered and "jax" in sys.modules:
            register_pytrees()  # one flag and one dict lookup per metadata object

    kv_lens: np.ndarray = _field("kv_lens", "int32 [B]: tokens each row holds after this step's write.")
    query_lens: np.ndarray = _field("query_lens", "int32 [B]: new tokens of each row this step.")
    groups: tuple[GroupMetadata, ...] = _field("groups", "`GroupMetadata` per layer group.")
    built_for: tuple[Any, ...] | None = _field("built_for", "The pool signature of the manager that built it (static).")
    step: object = _field("step", "The `Step` described (host only), or the `StepBatch` naming its last step.")
    owner: np.ndarray = _field("owner", "int32 []: the serial of the manager that built it.")

    @property
    def derived(self) -> bool:
        """True when positions are computed (`derive_positions`) rather than carried."""
        return self._positions is None

    @property
    def positions(self) -> np.ndarray:
        """int32 ``[B, T]``: the logical position of each new token (computed each time it
        is read when derived)."""
        given = self._positions
        if given is not None:
            return given
        positions: np.ndarray = derive_positions(self._kv_lens, self._query_lens, self._query_len)
        return positions

    @property
    def batch_size(self) -> int:
        """Rows ``B`` of this step, padding rows included (a bucket)."""
        n: int = self._kv_lens.shape[0]
        return n

    @property
    def query_len(self) -> int:
        """New tokens per row ``T``, padded (a bucket): feed tokens shaped ``[batch_size, query_len]``."""
        return self._query_len

    # The first group's tables: full attention's when the model has any full layer.
    @property
    def block_tables(self) -> np.ndarray:
        """The first group's ``[B, W]`` block tables (full attention's if the model has a full layer)."""
        return self._groups[0].block_tables

    @property
    def slot_mapping(self) -> np.ndarray:
        """The first group's ``[B, T]`` flat write slots; padding tokens get an out-of-range slot."""
        return self._groups[0].slot_mapping

    @property
    def table_width(self) -> int:
        """Block-table width ``W`` of the first group (a bucket)."""
        w: int = self._groups[0].block_tables.shape[1]
        return w

    def fields(self) -> dict[str, Any]:
        """The constructor's arguments, by name (``positions`` None when derived)."""
        return {"kv_lens": self._kv_lens, "query_lens": self._query_lens, "positions": self._positions,
                "groups": self._groups, "built_for": self._built_for, "step": self._step, "owner": self._owner,
                "query_len": self._query_len}

    def replace(self, **changes: Any) -> StepMetadata:
        """A copy with ``changes`` (constructor arguments by name). Replacing ``positions``
        with an array sets ``T`` from it."""
        fields = {**self.fields(), **changes}
        if fields["positions"] is not None:
            fields["query_len"] = None
        return StepMetadata(**fields)

    __replace__ = replace  # `copy.replace` (Python 3.13)

    def __repr__(self) -> str:
        how = "derived" if self._positions is None else "carried"
        return (f"StepMetadata(B={self.batch_size}, T={self._query_len}, {len(self._groups)} groups, "
                f"positions {how}, step={self._step!r})")

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

    jax.tree_util.register_pytree_with_keys(GroupMetadata, _group_flatten_with_keys, _group_unflatten, _group_flatten)
    jax.tree_util.register_pytree_with_keys(StepMetadata, _flatten_with_keys, _unflatten, _flatten)
    _registered = True


_FIELDS = ("kv_lens", "query_lens", "positions", "groups", "owner")
_GROUP_FIELDS = ("block_tables", "slot_mapping", "start", "copy_src", "copy_dst", "copy_len", "block_gens",
                 "copy_src_gen", "copy_dst_gen")  # GroupMetadata's arrays, in its constructor's order
_GROUP_ATTRS = tuple(f"_{name}" for name in _GROUP_FIELDS)  # the carried arrays (a derived slot mapping: None)


def _group_children(gm: GroupMetadata) -> tuple[Any, ...]:
    return tuple(getattr(gm, name) for name in _GROUP_ATTRS)


def _group_flatten(gm: GroupMetadata) -> tuple[tuple[Any, ...], tuple[int | None, int | None]]:
    return _group_children(gm), (gm.pad, gm.block_size)


def _group_flatten_with_keys(gm: GroupMetadata) -> tuple[tuple[Any, ...], tuple[int | None, int | None]]:
    import jax

    return (tuple((jax.tree_util.GetAttrKey(name), child) for name, child in zip(_GROUP_FIELDS, _group_children(gm))),
            (gm.pad, gm.block_size))


def _group_unflatten(aux: tuple[int | None, int | None], children: Any) -> GroupMetadata:
    pad, block_size = aux
    return GroupMetadata(*children, pad=pad, block_size=block_size)


def _flatten(meta: StepMetadata) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    # The device boundary: metadata whose sequences were released since it was
    # described would address blocks that may be another sequence's by now.
    step = meta.step
    aux = (meta.built_for, meta.query_len if meta.derived else None)
    if step is not None:
        step.check_live()  # type: ignore[attr-defined]  # a Step, or a StepBatch naming its last
        if getattr(step, "reuses_buffers", False):
            return _copied(meta), aux
    return (meta.kv_lens, meta.query_lens, meta._positions, meta.groups, meta.owner), aux


def _copied(meta: StepMetadata) -> tuple[Any, ...]:
    """The children of a `StepBatch`'s metadata, copied. Its arrays are the batch's
    buffers, rewritten in place by its next step, and on CPU a jitted call may take a
    numpy argument without copying it and run after the call returns: an engine that
    describes step N+1 while step N runs would otherwise change step N's slots under it
    (a token written into another row's block). A few small copies per call."""
    groups = tuple(GroupMetadata(*(_fresh(a) for a in _group_children(g)), pad=g.pad, block_size=g.block_size)
                   for g in meta.groups)
    return np.array(meta.kv_lens), np.array(meta.query_lens), _fresh(meta._positions), groups, meta.owner


def _fresh(array: Any) -> Any:
    return None if array is None else np.array(array)


def _flatten_with_keys(meta: StepMetadata) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    children, aux = _flatten(meta)
    import jax

    return tuple((jax.tree_util.GetAttrKey(name), child) for name, child in zip(_FIELDS, children)), aux


def _unflatten(aux: tuple[Any, ...], children: Any) -> StepMetadata:
    built_for, query_len = aux
    kv_lens, query_lens, positions, groups, owner = children
    # The host-only step stays behind.
    return StepMetadata(kv_lens, query_lens, positions, groups, built_for, owner=owner, query_len=query_len)


def _register_if_jax() -> None:
    # One flag and one dict lookup per metadata object: cheap beside its arrays.
    if not _registered and "jax" in sys.modules:
        register_pytrees()


_register_if_jax()

__all__ = ["GroupMetadata", "StepMetadata", "bucket", "derive_positions", "derive_slots", "pad_slot", "register_pytrees"]
