"""Binding: pages answer only the metadata of their own manager, and only while the
blocks it names are still what they were when it was built.

Metadata is plain arrays a caller can keep, copy to the device, retry or build by
hand; the host refuses a stale `Step` when metadata is flattened
(`paged_kv.allocator.steps.Step.check_live`), but arrays already on the device, or
built by another manager of the same spec (data-parallel replicas in one process),
or kept while a sliding window's trim handed a block to another sequence, carry no
step. So the device checks, per block, with two small arrays beside every layer's
pages:

* ``generations [num_blocks]``: the generation (`BlockPool.generation`, bumped each
  time the host hands a block out fresh) each block was last written under;
* ``owner []``: the serial of the manager whose metadata these pages serve (0 until
  the first write binds them; `PagedKVCache.bind` rebinds, e.g. after a restore).

Metadata carries the generation of every block it names (`GroupMetadata.block_gens`)
and its manager's serial (`StepMetadata.owner`). A write accepts a table entry whose
generation is not older than the block's (a block handed out since the metadata was
built is newer: refused) and records it; a read accepts an entry whose generation is
the block's exactly. A refused entry reads the null block (zeros) and its tokens'
writes are dropped; metadata of another owner reads and writes nothing. So kept,
replayed or foreign metadata can neither read nor overwrite a block's new owner.

Generations wrap (int32), and are compared as serial numbers (RFC 1982): correct as
long as metadata is not 2^31 hand-outs of one block old. Cost per layer and step: a
gather and a scatter of ``B x W`` int32s beside the pages' ``B x W x block_size``
rows (bench_decode_step measures it).

Not covered: metadata forged on purpose with the right generations and owner (any
code in the process can read the pages directly), and writes that bypass views
(`insert_prefill`, `swap_in` stamp the blocks they write: `bind_blocks`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from paged_kv.metadata import GroupMetadata, StepMetadata


def not_older(expected: jax.Array, current: jax.Array) -> jax.Array:
    """``expected`` is ``current`` or a later generation (int32 serial-number order)."""
    return (expected - current) >= 0  # int32 subtraction wraps: the difference's sign is the order


def bind_step(generations: jax.Array, owner: jax.Array, meta: StepMetadata, group: int, block_size: int,
              write: bool) -> tuple[GroupMetadata, jax.Array, jax.Array]:
    """Group ``group`` of ``meta`` as these pages may serve it, and the pages' new
    ``(generations, owner)``.

    ``write=False`` (a read): table entries whose block is another generation now, or
    any entry of another owner's metadata, become the null block. ``write=True``: an
    unbound page set is bound to ``meta``'s owner, entries not older than their block
    are recorded as its generation, the rest refused as above; new tokens whose block
    is not an accepted entry of their row's table (at the column their position
    names) get the padding slot, and copy-on-write copies whose source is another
    generation, or whose destination is newer, copy nothing."""
    gm = meta.groups[group]
    tag = jnp.asarray(meta.owner, jnp.int32)
    if write:
        owner = jnp.where(owner == 0, tag, owner)
    mine = owner == tag
    tables = jnp.asarray(gm.block_tables)
    nb = generations.shape[0]
    # Ids outside the pool are refused here (JAX would wrap a negative one onto the
    # pool's last blocks, and clamp a large one onto the last).
    inside = (tables >= 0) & (tables < nb)
    expected = jnp.asarray(gm.block_gens)
    current = generations[jnp.where(inside, tables, 0)]
    if not write:
        ok = mine & inside & (expected == current)
        return gm.replace(block_tables=jnp.where(ok, tables, 0)), generations, owner
    ok = mine & inside & not_older(expected, current)
    generations = generations.at[jnp.where(inside, tables, nb)].set(jnp.where(ok, expected, current), mode="drop")
    tables = jnp.where(ok, tables, 0)
    # Each new token's block must be the accepted entry its position names.
    slots = jnp.asarray(gm.slot_mapping)
    col = jnp.asarray(meta.positions) // block_size - (jnp.asarray(gm.start) // block_size)[:, None]
    width = tables.shape[1]
    named = jnp.take_along_axis(tables, jnp.clip(col, 0, width - 1), axis=1)
    fits = (col >= 0) & (col < width) & (named != 0) & (slots // block_size == named)
    slots = jnp.where(fits, slots, nb * block_size)
    lengths, generations = _bind_copies(generations, mine, gm)
    return gm.replace(block_tables=tables, slot_mapping=slots, copy_len=lengths), generations, owner


def _bind_copies(generations: jax.Array, mine: jax.Array, gm: GroupMetadata) -> tuple[jax.Array, jax.Array]:
    """Copy lengths with refused copies at 0, and the destinations' generations recorded."""
    lengths = jnp.asarray(gm.copy_len)
    if lengths.shape[0] == 0:
        return lengths, generations
    nb = generations.shape[0]
    src, dst = jnp.asarray(gm.copy_src), jnp.asarray(gm.copy_dst)
    s, d = jnp.clip(src, 0, nb - 1), jnp.clip(dst, 0, nb - 1)
    dst_gen = jnp.asarray(gm.copy_dst_gen)
    ok = (mine & (src == s) & (dst == d) & (d != 0) & (generations[s] == jnp.asarray(gm.copy_src_gen))
          & not_older(dst_gen, generations[d]))
    generations = generations.at[d].set(jnp.where(ok, dst_gen, generations[d]))
    return jnp.where(ok, lengths, 0), generations


def bind_blocks(generations: jax.Array, owner: jax.Array, tag: jax.typing.ArrayLike, ids: jax.Array,
                gens: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Blocks ``ids`` (out of range: padding) written outside step metadata by the
    manager of serial ``tag`` (`insert_prefill`, `swap_in`): ``(ok, generations,
    owner)`` with each block recorded at ``gens``. ``ok`` (a scalar) is False when
    the pages serve another manager: the caller then writes nothing."""
    tag = jnp.asarray(tag, jnp.int32)
    owner = jnp.where(owner == 0, tag, owner)
    ok = owner == tag
    nb = generations.shape[0]
    generations = generations.at[jnp.where(ok, ids, nb)].set(gens, mode="drop")
    return ok, generations, owner


__all__ = ["bind_blocks", "bind_step", "not_older"]
