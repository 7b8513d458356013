"""What the tiers record: their counters (`TierStats`) and the moves pending
(`Download`, `Upload`), apart from `CacheTiers` so that each file holds one idea."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs

from paged_kv.spec import CacheSpec
from paged_kv.tiers.host import Pages


@attrs.define
class TierStats:
    """What the tiers did: blocks hit per medium (group 0's, as the prefix cache counts
    queries), blocks and bytes moved each way, copies refused or dropped."""

    hit_blocks: dict[str, int] = attrs.field(factory=lambda: {"host": 0, "disk": 0})
    blocks_down: int = 0
    blocks_up: int = 0
    bytes_down: int = 0
    bytes_up: int = 0
    bytes_to_disk: int = 0
    bytes_from_disk: int = 0
    dropped: int = 0
    refused: int = 0
    corrupt: int = 0
    disk_errors: int = 0  # blocks lost to a failed segment write (a full disk: `DiskDirectory.errors`)

    def as_dict(self) -> dict[str, Any]:
        """Every counter as plain JSON-ready values."""
        return attrs.asdict(self)


@attrs.define
class Download:
    """A device block to copy down: its group, id, generation when evicted, key, parent."""

    group: int
    block: int
    generation: int
    key: int
    parent: int


@attrs.define
class Upload:
    """A fresh device block to fill: group, id, generation, key, and the pages when they
    are not in the host tier (a disk hit with no host room); else read from the host slot."""

    group: int
    block: int
    generation: int
    key: int
    pages: Pages | None = None


def split_bytes(total: int, spec: CacheSpec, weights: Sequence[int]) -> list[int]:
    """Blocks per group that ``total`` bytes hold, split in proportion to ``weights`` bytes."""
    if not total:
        return [0] * len(weights)
    whole = sum(weights)
    return [int(total * w / whole) // spec.group_bytes_per_block(g) for g, w in enumerate(weights)]


__all__ = ["Download", "TierStats", "Upload", "split_bytes"]
