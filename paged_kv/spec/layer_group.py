"""`LayerGroup`: layers that share one pool and one page table, and their attention kind."""

from __future__ import annotations

import attrs
import numpy as np

from paged_kv.errors import SpecError


@attrs.frozen
class LayerGroup:
    """Layers sharing one pool and one page table, and their attention kind: ``window``
    (sliding window of that many positions), ``chunk`` (chunked local attention over
    chunks of that many positions), or neither (full attention); never both."""

    layers: tuple[int, ...]
    window: int | None
    num_blocks: int
    chunk: int | None = None

    def __attrs_post_init__(self) -> None:
        if self.window is not None and self.chunk is not None:
            raise SpecError(f"LayerGroup(window={self.window}, chunk={self.chunk}): a group is sliding or chunked, not both")

    @property
    def kind(self) -> str:
        """``"full"``, ``"sliding"`` or ``"chunked"``."""
        return "sliding" if self.window is not None else "chunked" if self.chunk is not None else "full"

    @property
    def local(self) -> bool:
        """Whether a query sees only recent positions (sliding or chunked): the group's
        tables start past the blocks no query can see any more, which go back to its pool."""
        return self.window is not None or self.chunk is not None

    def first_visible(self, position: int | np.ndarray) -> int | np.ndarray:
        """First position a query at ``position`` (an int or an integer array), or any
        later query, can see: 0 for full attention, ``position - window + 1`` for a
        sliding window, the first position of its chunk for chunked attention. The host
        rule of every kind: blocks wholly before it can go back to the pool."""
        if self.window is not None:
            return np.maximum(position - self.window + 1, 0)
        if self.chunk is not None:
            return position // self.chunk * self.chunk
        return position * 0


__all__ = ["LayerGroup"]
