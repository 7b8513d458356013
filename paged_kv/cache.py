"""`PagedKVCache`: the device pytree of every layer's view."""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import TYPE_CHECKING

import jax
import numpy as np

from paged_kv.errors import ShapeError, SpecError
from paged_kv.sharding import page_sharding
from paged_kv.spec import CacheSpec
from paged_kv.views.sliding import SlidingWindowCacheView
from paged_kv.views.transformer import TransformerCacheView
from paged_kv.views.transformer import PagedLayerView
from paged_kv.views.unified import UnifiedCacheView

if TYPE_CHECKING:  # annotations only
    from paged_kv.allocator.manager import KVCacheManager

_LAYOUTS = ("split", "unified")


@dataclasses.dataclass(frozen=True)
class PagedKVCache:
    """One view per layer. Pass it through your jitted step with ``donate_argnums`` so
    the pages are updated in place, and keep the cache the step returns."""

    views: tuple[PagedLayerView, ...]

    @classmethod
    def init(cls, spec: CacheSpec, device: jax.Device | jax.sharding.Sharding | None = None, layout: str = "split",
             mesh: jax.sharding.Mesh | None = None, head_axis: str | None = None) -> "PagedKVCache":
        """Zeroed pages for every layer.

        ``layout="split"``: separate key and value pages per layer, a sliding view for
        ``spec.sliding_layers``, else full. ``layout="unified"``: one `UnifiedCacheView`
        (keys and values in one page tensor) for every layer, sliding layers included.
        ``mesh`` and ``head_axis``: shard every page tensor's head axis over that mesh
        axis (tensor parallelism; see `paged_kv.sharding`), created sharded.
        """
        if not isinstance(spec, CacheSpec):
            raise SpecError(f"PagedKVCache.init needs a paged_kv.CacheSpec; got {type(spec).__name__}")
        if layout not in _LAYOUTS:
            raise SpecError(f"layout={layout!r} is not one of {_LAYOUTS}")
        if (mesh is None) != (head_axis is None):
            raise SpecError(f"mesh={mesh!r} and head_axis={head_axis!r}: give both to shard the pages, or neither")
        if mesh is not None:
            if device is not None:
                raise SpecError("give device= or mesh=/head_axis=, not both")
            device = page_sharding(spec, mesh, head_axis, layout)  # type: ignore[arg-type]  # given with mesh
        else:
            _check_fits(spec, _device(device))

        if device is None:
            # Every layer's zeros from one program: built op by op they took four (a
            # fill and a broadcast per dtype), each traced, lowered and compiled (or read
            # from the persistent compilation cache) before a process's first step.
            zeroed: PagedKVCache = _zeroed(spec, layout)
            return zeroed
        return cls(_views(spec, layout, device))

    @property
    def spec(self) -> CacheSpec:
        """The spec every layer's view was built for."""
        return self.views[0].spec

    def __len__(self) -> int:
        return len(self.views)

    def __getitem__(self, layer: int) -> PagedLayerView:
        return self.views[layer]

    def replace(self, layer: int, view: PagedLayerView) -> "PagedKVCache":
        """A cache with ``view`` as layer ``layer`` (functional: the old cache is unchanged)."""
        if not 0 <= layer < len(self.views):
            raise ShapeError(f"layer={layer} out of range for a {len(self.views)}-layer cache")
        views = list(self.views)
        views[layer] = view
        return PagedKVCache(tuple(views))

    def bind(self, manager: KVCacheManager) -> "PagedKVCache":
        """This cache serving ``manager`` (a `KVCacheManager` of its spec): every layer's
        pages take the manager's serial as their owner and its blocks' generations, so
        its metadata reads and writes them and any other manager's reads the null block
        and writes nothing (`paged_kv.binding`). A fresh cache binds itself to the first
        manager whose metadata writes it; call this when another manager takes the
        pages over (`load_checkpoint` does, for the manager it restores). Functional:
        returns the bound cache."""
        spec = self.spec
        if getattr(manager, "spec", None) != spec:
            raise SpecError(f"bind needs a KVCacheManager of this cache's spec ({spec.describe()})")
        views = []
        for view in self.views:
            # A copy: on CPU device_put may alias the numpy buffer, and the pool bumps its
            # generations in place, so an aliased array would follow the host and accept
            # metadata built before a block changed hands.
            gens = np.array(manager.groups[view.group].pool.generation)
            views.append(dataclasses.replace(
                view, generations=jax.device_put(gens, view.generations.sharding),  # type: ignore[union-attr]  # a cache's views hold them
                owner=jax.device_put(manager.steps.tag, view.owner.sharding)))  # type: ignore[union-attr]
        return PagedKVCache(tuple(views))

    @property
    def nbytes(self) -> int:
        """Device bytes of every layer's pages and binding arrays (`CacheSpec.device_bytes`)."""
        return sum(x.nbytes for x in jax.tree_util.tree_leaves(self))


def _views(spec: CacheSpec, layout: str, device: jax.Device | jax.sharding.Sharding | None,
           ) -> tuple[PagedLayerView, ...]:
    def view(layer: int) -> PagedLayerView:
        kind: type[PagedLayerView]
        if layout == "unified":
            kind = UnifiedCacheView
        else:
            kind = SlidingWindowCacheView if layer in spec.sliding_layers else TransformerCacheView
        return kind.init(spec, layer, device)

    return tuple(view(i) for i in range(spec.num_layers))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _zeroed(spec: CacheSpec, layout: str) -> PagedKVCache:
    """`PagedKVCache.init` on the default device, as one program (per spec and layout)."""
    return PagedKVCache(_views(spec, layout, None))


def _device(device: object) -> jax.Device | jax.sharding.Sharding:
    """``device`` as a JAX device or sharding; anything else (a string, say) is a `SpecError`."""
    if device is None:
        first: jax.Device = jax.devices()[0]
        return first
    if isinstance(device, (jax.Device, jax.sharding.Sharding)):
        return device
    raise SpecError(
        f"device={device!r} is not a JAX device or sharding; pass e.g. jax.devices('cpu')[0], "
        "or mesh= and head_axis= to shard the pages"
    )


def _check_fits(spec: CacheSpec, device: jax.Device | jax.sharding.Sharding) -> None:
    """Refuse pages larger than the device's memory (its allocator's limit where JAX
    reports one, else the host's RAM), naming the bytes: cheaper than an
    out-of-memory error from deep inside the allocator after minutes of work."""
    if not isinstance(device, jax.Device):
        return  # a sharding spreads the pages; each device's share is checked by JAX itself
    try:
        limit = (device.memory_stats() or {}).get("bytes_limit")
    except Exception:  # noqa: BLE001 - backends without memory stats raise various errors
        limit = None
    if limit is None:
        try:
            limit = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return
    if spec.device_bytes > limit:
        raise SpecError(
            f"the pages take {spec.device_bytes:,} bytes ({spec.device_bytes / 2**30:,.1f} GiB) but {device} has "
            f"{limit:,} bytes: lower num_blocks (CacheSpec.for_memory(bytes, ...) sizes the pool), or shard the "
            "pages over a mesh"
        )


jax.tree_util.register_dataclass(PagedKVCache, data_fields=["views"], meta_fields=[])

__all__ = ["PagedKVCache"]
