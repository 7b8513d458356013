"""The one builder of step metadata arrays, and the two rules every step follows.

Every array of every `StepMetadata` is written here, whoever describes the step:

* `KVCacheManager.step_metadata`, general path (`lengths_and_positions`, then
  `group_arrays` once per layer group: any kind of group, copy-on-write copies) and
  plain path (one full-attention group, nothing forked: `plain_step`, the decode
  layout of its rows and, when some row writes other than one token, a mixed step
  beside it);
* the persistent batch (`paged_kv.batch.StepBatch`), through a `DecodeLayout`
  (`paged_kv.allocator.decode_layout`) over reused `Buffers`: the same writers, plus
  the in-place decode step, compaction when rows leave and rows joining;
* the decode slots (`paged_kv.batch.DecodeSlots`): a step's rows placed in their
  slots (`in_slots`).

Arrays come from a provider with ``get(name, shape)`` (`paged_kv.allocator.array_buffers`,
re-exported here): `FRESH` (new arrays, the caller's to keep: `step_metadata`'s
contract) or `Buffers` (one flat buffer per name,
reused step after step). Writers overwrite every element they hand out.

The rules, each written once:

* `slot`: token ``p`` of a row whose logical block ``p // block_size`` is block ``b``
  lives at flat page slot ``b * block_size + p % block_size``;
* `room` (the append rule): a row holding ``n`` tokens has ``room(n)`` free slots in its
  last block; a token appended to a row with no room takes a new block, so a row of
  ``n`` tokens holds `blocks_for` ``(n)`` blocks.

The host side: numpy only, never JAX.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, overload

import numpy as np

from paged_kv.allocator.array_buffers import FRESH, Buffers, Fresh, fill
from paged_kv.derived import slot
from paged_kv.metadata import GroupMetadata, StepMetadata
from paged_kv.spec import NULL_BLOCK

if TYPE_CHECKING:
    from paged_kv.spec import CacheSpec

    Shape = tuple[int, ...]
    Arrays = tuple[np.ndarray, ...]
    DecodeArrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]
    """A one-group step's arrays, in the order `step_metadata` takes them."""

    class Table(Protocol):
        """What the builders read of a `paged_kv.allocator.page_table.PageTable` (which
        imports this module)."""

        kv_lens: np.ndarray
        block_tables: np.ndarray
        num_blocks: np.ndarray

        def views(self) -> tuple[memoryview, memoryview, memoryview]: ...

    class Out(Protocol):
        """Where a builder's arrays live: `FRESH` or a `Buffers`."""

        def get(self, name: str, shape: Shape) -> np.ndarray: ...

assert NULL_BLOCK == 0, "fresh tables are zero-filled: the null block"

SCALAR_ROWS = 12
"""Up to this many rows the decode layout is written (and advanced, `DecodeLayout`)
element by element in Python: numpy's ~1 µs per call is then the whole cost."""

EMPTY = np.zeros(0, dtype=np.int32)  # no copy-on-write copies
EMPTY.flags.writeable = False


# ---- the rules ----------------------------------------------------------------------------
@overload
def room(tokens: int, block_size: int) -> int: ...
@overload
def room(tokens: np.ndarray, block_size: int) -> np.ndarray: ...
def room(tokens: Any, block_size: int) -> Any:
    """The append rule: free slots in the last block of a row holding ``tokens`` tokens (0
    for an empty row or a full last block). A token appended to a row with no room takes
    a new block. An int, or a numpy array elementwise."""
    return -tokens % block_size


@overload
def blocks_for(tokens: int, block_size: int) -> int: ...
@overload
def blocks_for(tokens: np.ndarray, block_size: int) -> np.ndarray: ...
def blocks_for(tokens: Any, block_size: int) -> Any:
    """Blocks a row holding ``tokens`` tokens holds (`room`'s consequence: ceil(tokens / block_size))."""
    return (tokens + room(tokens, block_size)) // block_size


def bucket_int(n: int, cap: int) -> int:
    """`paged_kv.metadata.bucket` for counts already known to be ints (no argument checks:
    it runs every step)."""
    return min(1 << (max(n, 1) - 1).bit_length(), cap)


# ---- one layer group's tables and slots, any kind ---------------------------------------------
def lengths_and_positions(out: Out, kv: np.ndarray, q: np.ndarray, B: int,
                          T: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``kv_lens [B]``, ``query_lens [B]`` and ``positions [B, T]`` of rows holding ``kv``
    tokens whose last ``q`` are new (padding rows empty). A one-token step carries its
    positions (new token at ``kv - 1``; padding rows at 0); a longer step's are None,
    derived where they are read (`paged_kv.metadata.derive_positions`): building
    ``[B, T]`` arrays would make the host's cost O(B x T)."""
    n = kv.size
    kv_lens, query_lens = out.get("kv", (B,)), out.get("q", (B,))
    kv_lens[:n], kv_lens[n:] = kv, 0
    query_lens[:n], query_lens[n:] = q, 0
    if T > 1:
        return kv_lens, query_lens, None
    positions = out.get("pos", (B, 1))
    np.maximum(kv_lens - 1, 0, out=positions[:, 0])
    return kv_lens, query_lens, positions


def write_slots(slots: np.ndarray, block_tables: np.ndarray, rows: np.ndarray, kv: np.ndarray, q: np.ndarray,
                pad: int, block_size: int) -> None:
    """``slots [B, 1]`` of a one-token step (each row writes its last token, or nothing):
    the written rows' slots in one vectorized gather, ``pad`` elsewhere (dropped by the
    write). Longer steps carry no slots (`paged_kv.derived.derive_slots`)."""
    slots.fill(pad)
    one = np.flatnonzero(q == 1)
    if one.size:
        last = kv[one].astype(np.int64) - 1
        slots[one, 0] = slot(block_tables[rows[one], last // block_size], last, block_size)


def group_arrays(out: Out, g: int, table: Table, generation: np.ndarray, rows: np.ndarray, kv: np.ndarray, q: np.ndarray,
                 positions: np.ndarray | None, B: int, W: int, pad: int, block_size: int,
                 columns: np.ndarray | None = None, first: np.ndarray | None = None,
                 copies: Arrays = (EMPTY,) * 5) -> GroupMetadata:
    """Layer group ``g``'s share of a step over ``rows``: tables ``[B, W]`` (``columns``, the
    group's chosen ``[n, W]`` columns of each row; None: each row's first ``W`` columns,
    as a full-attention row is null past its blocks), their generations, the new tokens'
    slots (``positions`` None: derived, like the positions), ``start`` (``first`` block of
    each row, None: 0), and ``copies`` (copy-on-write sources, destinations, lengths and
    the two generations)."""
    n = rows.size
    tables = out.get(f"tables{g}", (B, W))
    if columns is not None:
        tables[:n] = columns
    elif n:
        widest = min(W, int(table.num_blocks[rows].max()))
        tables[:n, :widest] = table.block_tables[rows, :widest]
        tables[:n, widest:] = NULL_BLOCK
    tables[n:] = NULL_BLOCK
    gens = out.get(f"gens{g}", (B, W))
    generation.take(tables, None, gens, "wrap")  # what each block is now (`GroupMetadata.block_gens`)
    slots = None
    if positions is not None:
        slots = out.get(f"slot{g}", positions.shape)
        write_slots(slots, table.block_tables, rows, kv, q, pad, block_size)
    start = out.get(f"start{g}", (B,))
    start[:n] = 0 if first is None else first * block_size
    start[n:] = 0
    src, dst, length, src_gen, dst_gen = copies
    return GroupMetadata(tables, slots, start, src, dst, length, gens, src_gen, dst_gen, pad=pad, block_size=block_size)


# ---- a decode layout: every row's last token is the step's --------------------------------------
def last_tokens(table: Table, row_list: list[int], rows: np.ndarray | None,
                block_size: int) -> tuple[Any, Any, Any, int]:
    """Each row's length, last position and that position's slot, and the most blocks a
    row holds: Python lists for a few rows (through the table's memoryviews), numpy
    arrays for more."""
    kv: Any  # lists, or arrays
    last: Any
    slots: Any
    if len(row_list) <= SCALAR_ROWS:
        kvl, btv, nbl = table.views()
        kv, last, slots, widest = [], [], [], 0
        for r in row_list:
            k = kvl[r]
            p = k - 1
            kv.append(k)
            last.append(p)
            slots.append(slot(btv[r, p // block_size], p, block_size))
            w = nbl[r]
            if w > widest:
                widest = w
        return kv, last, slots, widest
    kv = table.kv_lens[rows]
    last = kv - 1
    return kv, last, slot(table.block_tables[rows, last // block_size], last, block_size), int(
        table.num_blocks[rows].max())


def decode_arrays(out: Out, table: Table, generation: np.ndarray, row_list: list[int], rows: np.ndarray | None, B: int,
                  max_width: int, pad: int, block_size: int) -> DecodeArrays:
    """The decode layout of ``row_list`` (rows of one full-attention group, each holding at
    least one token; ``rows``: the same as an int64 array, or None) into ``out``:
    ``(kv_lens, query_lens, positions, tables, slots, start, gens)``, ``positions`` and
    ``slots`` ``[B, 1]``. A few rows are written from Python lists (fresh arrays in one
    call each; reused buffers element by element through their memoryviews), more
    with a handful of vectorized calls."""
    n = len(row_list)
    if rows is None and n > SCALAR_ROWS:
        rows = np.array(row_list, dtype=np.int64)
    kv, last, slots_of, widest = last_tokens(table, row_list, rows, block_size)
    W = bucket_int(widest, max_width)
    if n <= SCALAR_ROWS and out is FRESH:  # a few rows into new arrays: as few calls as can be
        padding = [0] * (B - n)
        rows5 = np.array([kv + padding, [1] * n + padding, last + padding, slots_of + [pad] * (B - n), [0] * B],
                         np.int32)  # one fresh array, its rows the step's [B] arrays
        bt = table.block_tables
        if B == 1:
            tables = bt[row_list[0]: row_list[0] + 1, :W].copy()  # past the row's blocks: null
        else:
            tables = np.zeros((B, W), np.int32)  # zeros: the null block
            for b, r in enumerate(row_list):
                tables[b, :widest] = bt[r, :widest]
        return (rows5[0], rows5[1], rows5[2:3].T, tables, rows5[3:4].T, rows5[4],
                generation.take(tables))
    get = out.get
    kv_lens, query_lens, positions = get("kv", (B,)), get("q", (B,)), get("pos", (B, 1))
    tables, slots, start, gens = get("tables", (B, W)), get("slot", (B, 1)), get("start", (B,)), get("gens", (B, W))
    if n <= SCALAR_ROWS:  # a few rows into reused buffers: element writes beat numpy's ~1 µs per call
        mv = out.memoryview  # type: ignore[attr-defined]  # a `Buffers`: FRESH returned above
        for name, values, fill_with in (("kv", kv, 0), ("q", [1] * n, 0), ("pos", last, 0), ("slot", slots_of, pad),
                                        ("start", (), 0)):
            fill(mv(name, (B,)), values, fill_with)
        tables.fill(NULL_BLOCK)
        bt = table.block_tables
        for b, r in enumerate(row_list):
            tables[b, :widest] = bt[r, :widest]
    else:
        kv_lens[:n], kv_lens[n:] = kv, 0
        query_lens[:n], query_lens[n:] = 1, 0
        positions[:n, 0], positions[n:] = last, 0
        slots[:n, 0], slots[n:] = slots_of, pad
        start.fill(0)
        tables[:n, :widest] = table.block_tables[rows, :widest]  # past a row's blocks: null
        tables[:n, widest:] = NULL_BLOCK
        tables[n:] = NULL_BLOCK
    generation.take(tables, None, gens, "wrap")  # what each block is now (`GroupMetadata.block_gens`)
    return kv_lens, query_lens, positions, tables, slots, start, gens


def mixed_step(out: Out, dec: StepMetadata, counts: list[int], T: int, pad: int, block_size: int,
               step: object) -> StepMetadata:
    """The step writing each row's last ``counts[b]`` tokens (``T``: their bucket), beside
    the decode layout ``dec`` of the same rows, whose lengths, tables, starts and
    generations it shares: its own ``query_lens [B]`` only (`mixed_lengths`), positions
    and slots derived (`paged_kv.metadata`), so a prompt joining costs O(B), not O(B x T)."""
    return derived_step(dec, mixed_lengths(out, dec.batch_size, counts), T, pad, block_size, step)


def mixed_lengths(out: Out, B: int, counts: list[int]) -> np.ndarray:
    """A mixed step's ``query_lens [B]``: ``counts``, then padding rows' 0."""
    query_lens = out.get("mq", (B,))  # a name of its own: the layout's "q" is its decode step's
    n = len(counts)
    query_lens[:n], query_lens[n:] = counts, 0
    return query_lens


def derived_step(dec: StepMetadata, query_lens: np.ndarray, T: int, pad: int, block_size: int,
                 step: object) -> StepMetadata:
    """`dec` (a one-group decode layout) with ``query_lens`` new tokens per row, ``T`` their
    bucket: positions and slots derived."""
    gm = dec.groups[0]
    return StepMetadata(dec.kv_lens, query_lens, None,
                        (GroupMetadata(gm.block_tables, None, gm.start, EMPTY, EMPTY, EMPTY, gm.block_gens, EMPTY, EMPTY,
                                       pad=pad, block_size=block_size),),
                        dec.built_for, step, dec.owner, query_len=T)


def step_metadata(kv_lens: np.ndarray, query_lens: np.ndarray, positions: np.ndarray, tables: np.ndarray,
                  slots: np.ndarray, start: np.ndarray, gens: np.ndarray, signature: tuple[Any, ...] | None,
                  step: object, owner: np.ndarray | None) -> StepMetadata:
    """The `StepMetadata` of a one-group step without copies."""
    return StepMetadata(kv_lens, query_lens, positions,
                        (GroupMetadata(tables, slots, start, EMPTY, EMPTY, EMPTY, gens, EMPTY, EMPTY),),
                        signature, step, owner)


def plain_step(table: Table, generation: np.ndarray, spec: CacheSpec, pad: int, row_list: list[int],
               rows: np.ndarray | None, counts: list[int], signature: tuple[Any, ...] | None, step: object,
               owner: np.ndarray | None) -> StepMetadata:
    """`KVCacheManager.step_metadata` of a plain manager (one full-attention group, no copy
    pending) in fresh arrays: the decode layout of its rows and, when some row writes
    other than one token, the step's own ``[B, T]`` arrays beside it. ``counts``: a list
    of ints, validated (each from 0 to its row's length)."""
    bs = spec.block_size
    B = bucket_int(len(row_list), spec.max_batch_slots)
    if not row_list:
        return empty_step(FRESH, B, spec.max_seq_len, pad, signature, step, owner)
    arrays = decode_arrays(FRESH, table, generation, row_list, rows, B, spec.max_blocks_per_seq, pad, bs)
    if max(counts) == 1 and min(counts) == 1:
        return step_metadata(*arrays, signature, step, owner)
    dec = step_metadata(*arrays, signature, None, owner)
    return mixed_step(FRESH, dec, counts, bucket_int(max(counts), spec.max_seq_len), pad, bs, step)


def empty_step(out: Out, B: int, T_cap: int, pad: int, signature: tuple[Any, ...] | None, step: object,
               owner: np.ndarray | None) -> StepMetadata:
    """A step over no row: one padding row (`bucket` of 0 is 1), tables one null block wide."""
    kv_lens, query_lens, positions = out.get("kv", (B,)), out.get("q", (B,)), out.get("pos", (B, 1))
    tables, slots, start, gens = out.get("tables", (B, 1)), out.get("slot", (B, 1)), out.get("start", (B,)), out.get(
        "gens", (B, 1))
    for a in (kv_lens, query_lens, positions, tables, start, gens):
        a.fill(0)
    slots.fill(pad)
    return step_metadata(kv_lens, query_lens, positions, tables, slots, start, gens, signature, step, owner)


# ---- a step's rows placed in decode slots ---------------------------------------------------
COPY_FIELDS = ("copy_src", "copy_dst", "copy_len", "copy_src_gen", "copy_dst_gen")


def in_slots(out: Out, meta: StepMetadata | None, occupied: list[int], num_slots: int, pads: list[int],
             signature: tuple[Any, ...] | None, step: object, owner: np.ndarray | None) -> StepMetadata:
    """``meta`` (rows in ``occupied`` order, or None: nothing occupied) spread over
    ``num_slots`` rows, row ``occupied[i]`` holding meta's row ``i``, the rest padding
    (``pads[g]``: group ``g``'s padding slot). When the occupied slots are the first ones,
    in order, rows are copied as blocks."""
    n = len(occupied)
    T = meta.query_len if meta is not None else 1
    prefix = occupied == list(range(n))
    rows = None if prefix else np.asarray(occupied, dtype=np.int64)

    def place(name: str, shape: Shape, src: np.ndarray | None, pad: int) -> np.ndarray:
        dst = out.get(name, (num_slots, *shape))
        if src is None:
            dst.fill(pad)
        elif prefix:
            dst[:n] = src[:n]
            dst[n:] = pad
        else:
            dst.fill(pad)
            dst[rows] = src[:n]
        return dst

    derived = meta is not None and meta.derived  # positions and slots follow from what is placed
    groups = []
    for g, pad in enumerate(pads):
        gm = meta.groups[g] if meta is not None else None
        W = gm.block_tables.shape[1] if gm is not None else 1
        get = (lambda field: None) if gm is None else (lambda field: getattr(gm, field))
        copies = {} if gm is None else {k: getattr(gm, k) for k in COPY_FIELDS}
        carried = not (derived and gm is not None and gm.derived)
        groups.append(GroupMetadata(block_tables=place(f"tables{g}", (W,), get("block_tables"), NULL_BLOCK),
                                    slot_mapping=place(f"slot{g}", (T,), get("slot_mapping"), pad) if carried else None,
                                    start=place(f"start{g}", (), get("start"), 0),
                                    block_gens=place(f"gens{g}", (W,), get("block_gens"), 0), **copies,
                                    pad=None if carried else pad, block_size=None if carried else gm.block_size))  # type: ignore[union-attr]  # derived: a group
    src = (lambda field: None) if meta is None else (lambda field: getattr(meta, field))
    return StepMetadata(place("kv", (), src("kv_lens"), 0), place("q", (), src("query_lens"), 0),
                        None if derived else place("pos", (T,), src("positions"), 0), tuple(groups), signature, step,
                        owner, query_len=T)


__all__ = ["Buffers", "COPY_FIELDS", "EMPTY", "FRESH", "Fresh", "SCALAR_ROWS", "blocks_for", "bucket_int",
           "decode_arrays", "empty_step", "fill", "group_arrays", "in_slots", "last_tokens", "lengths_and_positions",
           "derived_step", "mixed_lengths", "mixed_step", "plain_step", "room", "slot", "step_metadata", "write_slots"]
