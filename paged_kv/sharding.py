"""Pages sharded over a JAX mesh: tensor parallelism over key/value heads.

paged_kv adds no distribution layer of its own. Page tensors get a `NamedSharding`
that splits their head axis over one mesh axis, and are created already sharded
(each device allocates only its shard: a jitted ``zeros`` with ``out_shardings``);
the step metadata (block tables, slot mappings) is replicated. Every device then
holds the same blocks, for its own heads, so the one host allocator of a model
replica serves all of its devices with the same block ids, and XLA's SPMD
partitioner runs every write, gather, copy-on-write copy and swap locally per
device: no collective touches the pages (tests/test_sharding.py checks the HLO).

Int8 layers' scales ``[num_blocks, block_size, heads]`` (``2*heads`` unified) shard
on the same axis (`for_rank`), so each device dequantizes its own heads locally.

Layouts: split pages ``[num_blocks, block_size, heads, dim]`` shard on ``heads``;
unified interleaved pages ``[num_blocks, block_size, 2*heads, dim]`` shard on
``2*heads``, and since head ``h``'s keys and values sit at ``2h, 2h+1``, every
device gets whole (key, value) pairs of its heads. Unified pages with K and V of
different shapes (``[.., Hk*Dk + Hv*Dv]``) have no head axis to split and are
refused.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from paged_kv.errors import SpecError
from paged_kv.spec import CacheSpec


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding of step metadata: a full copy on every device of ``mesh``."""
    return NamedSharding(mesh, PartitionSpec())


def page_sharding(spec: CacheSpec, mesh: Mesh, head_axis: str, layout: str = "split") -> NamedSharding:
    """Sharding of every page tensor of ``spec`` in ``layout``: the head axis split over
    ``mesh`` axis ``head_axis``, blocks and tokens whole on every device."""
    if not isinstance(mesh, Mesh):
        raise SpecError(f"mesh={mesh!r} must be a jax.sharding.Mesh")
    if head_axis not in mesh.axis_names:
        raise SpecError(f"head_axis={head_axis!r} is not an axis of the mesh {mesh.axis_names}")
    n = mesh.shape[head_axis]
    for name, heads in (("key_heads", spec.key_heads), ("value_heads", spec.value_heads)):
        if heads % n:
            raise SpecError(
                f"{name}={heads} cannot be split over mesh axis {head_axis!r} of size {n}; "
                "use an axis whose size divides the KV heads (GQA models: at most num_kv_heads devices)"
            )
    if layout == "unified" and (spec.key_heads != spec.value_heads or spec.key_dim != spec.value_dim):
        raise SpecError(
            "unified pages with keys and values of different shapes have no head axis to shard; "
            "use layout='split' to shard them over heads"
        )
    return NamedSharding(mesh, PartitionSpec(None, None, head_axis, None))


def for_rank(placement: Any, ndim: int) -> Any:
    """``placement`` for an array of rank ``ndim``: a `NamedSharding` of the pages
    ``(blocks, tokens, heads, dim)`` keeps its first ``ndim`` axes, so an int8 layer's
    scales ``(blocks, tokens, heads)`` are split over the same mesh axis as its heads
    and every device holds the scales of exactly its own heads. Anything else is
    returned as given."""
    if isinstance(placement, NamedSharding) and len(placement.spec) > ndim:
        return NamedSharding(placement.mesh, PartitionSpec(*tuple(placement.spec)[:ndim]))
    return placement


def zeros(shape: tuple[int, ...], dtype: Any, placement: Any = None) -> jax.Array:
    """Zeroed array on ``placement`` (a device, a sharding or None). A sharding is
    honoured at creation, so no device ever holds more than its own shard."""
    placement = for_rank(placement, len(shape))
    if isinstance(placement, jax.sharding.Sharding):
        made: jax.Array = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=placement)()
        return made
    return jnp.zeros(shape, dtype, device=placement)


__all__ = ["for_rank", "page_sharding", "replicated", "zeros"]
