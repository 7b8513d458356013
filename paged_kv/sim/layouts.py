"""Which layers slide, and a pool of a given size for each layout.

Hybrid models interleave sliding-window layers with full-attention ones: Gemma 3
has five sliding layers (W = 1024) per full layer, Gemma 2 and gpt-oss alternate
them. The paged manager gives the sliding layers their own group and pool
(`CacheSpec.groups`), whose blocks cost the bytes of those layers only, so
comparing layouts "at equal memory" means splitting one byte budget between the
groups. `spec_at_memory` does it; `demand_share` derives the split from what each
group held in an unconstrained replay, so neither group runs out first by design.
"""

from __future__ import annotations

from numbers import Real

from paged_kv.errors import SpecError
from paged_kv.sim.models import ModelShape
from paged_kv.spec import CacheSpec

LAYOUTS = ("full", "hybrid", "sliding")
"""``full``: every layer attends to everything; ``hybrid``: one full layer every
``full_every`` layers, the rest sliding; ``sliding``: every layer sliding."""


def sliding_layers(num_layers: int, layout: str, full_every: int = 6) -> tuple[int, ...]:
    """Indices of the sliding layers: none, all, or all but every ``full_every``-th
    (layers ``full_every - 1``, ``2 * full_every - 1``, ... are full, as in Gemma 3)."""
    if layout not in LAYOUTS:
        raise SpecError(f"layout={layout!r} must be one of {LAYOUTS}")
    if isinstance(full_every, bool) or not isinstance(full_every, int) or full_every < 2:
        raise SpecError(f"full_every={full_every!r} must be an integer >= 2 (one full layer per full_every layers)")
    if layout == "full":
        return ()
    if layout == "sliding":
        return tuple(range(num_layers))
    return tuple(i for i in range(num_layers) if (i + 1) % full_every)


def spec_at_memory(shape: ModelShape, layout: str, pool_bytes: int, *, window: int = 1024, full_every: int = 6,
                   sliding_share: float = 0.5, block_size: int = 16, max_seq_len: int = 16384,
                   max_batch_slots: int = 256) -> CacheSpec:
    """A `CacheSpec` of ``shape`` in ``layout`` whose pages take at most ``pool_bytes``.

    One group (full or sliding) gets the whole budget. A hybrid model gives
    ``sliding_share`` of the bytes to its sliding group and the rest to its full group,
    each as whole blocks of that group's layers (see `demand_share`)."""
    layers = sliding_layers(shape.num_layers, layout, full_every)
    fields = dict(shape.spec_fields(), block_size=block_size, max_batch_slots=max_batch_slots,
                  max_blocks_per_seq=-(-max_seq_len // block_size),
                  sliding_window=window if layers else None, sliding_layers=layers)
    if layout != "hybrid":
        return CacheSpec.for_memory(pool_bytes, **fields)
    if not (isinstance(sliding_share, Real) and 0 < sliding_share < 1):
        raise SpecError(f"sliding_share={sliding_share!r} must be a fraction in (0, 1) of the pool's bytes")
    probe = CacheSpec(num_blocks=2, **dict(fields, max_blocks_per_seq=1))
    full_bytes, slide_bytes = probe.group_bytes_per_block(0), probe.group_bytes_per_block(1)
    num_blocks = int(pool_bytes * (1 - sliding_share)) // full_bytes
    sliding_blocks = int(pool_bytes * sliding_share) // slide_bytes
    if num_blocks < 2 or sliding_blocks < 2:
        raise SpecError(f"pool_bytes={pool_bytes} split {sliding_share:.3f} to the sliding group gives {num_blocks} full "
                        f"and {sliding_blocks} sliding blocks; each group needs >= 2")
    fields["max_blocks_per_seq"] = min(fields["max_blocks_per_seq"], num_blocks - 1)
    return CacheSpec(num_blocks=num_blocks, sliding_num_blocks=sliding_blocks, **fields)


def demand_share(spec: CacheSpec, mean_group_blocks: tuple[float, ...]) -> float:
    """The sliding group's share of the bytes that ``mean_group_blocks`` (full group
    first, as `SimReport.mean_group_blocks` gives them for ``spec``) occupy."""
    if len(spec.groups) != 2 or len(mean_group_blocks) != 2:
        raise SpecError(f"demand_share needs a hybrid spec and two groups' blocks; got {len(spec.groups)} groups "
                        f"and {mean_group_blocks!r}")
    full, slide = (b * spec.group_bytes_per_block(g) for g, b in enumerate(mean_group_blocks))
    if full + slide <= 0:
        raise SpecError(f"mean_group_blocks={mean_group_blocks!r} holds nothing to split by")
    return slide / (full + slide)


__all__ = ["LAYOUTS", "demand_share", "sliding_layers", "spec_at_memory"]
