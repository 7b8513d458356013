"""`StepMetadata`: the one object the host hands the device each step.

Host bookkeeping and device arrays meet only here. Every array is padded to a
bucketed shape (powers of two, capped by the spec) so the jitted ops compile once
per bucket instead of once per batch size, query length or table width.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np


def bucket(n: int, cap: int) -> int:
    """Smallest power of two >= n, clipped to ``cap`` (which is itself a bucket)."""
    n = max(int(n), 1)
    return min(1 << (n - 1).bit_length(), int(cap))


@dataclasses.dataclass(frozen=True)
class StepMetadata:
    """Where this step's tokens go and what each batch row may attend to.

    Shapes: ``B`` batch rows (bucketed), ``T`` new tokens per row (bucketed),
    ``W`` block-table width (bucketed). Padding rows have ``kv_lens == 0`` and a
    table of null blocks; padding tokens have ``slot_mapping == num_blocks *
    block_size``, an out-of-range slot the write drops.
    """

    block_tables: np.ndarray  # int32 [B, W]
    kv_lens: np.ndarray  # int32 [B]   tokens held after this step's write
    query_lens: np.ndarray  # int32 [B]   new tokens this step
    positions: np.ndarray  # int32 [B, T] logical position of each new token
    slot_mapping: np.ndarray  # int32 [B, T] flat page slot of each new token

    @property
    def batch_size(self) -> int:
        return self.block_tables.shape[0]

    @property
    def query_len(self) -> int:
        return self.positions.shape[1]

    @property
    def table_width(self) -> int:
        return self.block_tables.shape[1]

    def to_device(self, device=None) -> "StepMetadata":
        """One transfer of all five arrays (a pytree ``device_put``)."""
        return jax.device_put(self, device)


jax.tree_util.register_dataclass(
    StepMetadata,
    data_fields=["block_tables", "kv_lens", "query_lens", "positions", "slot_mapping"],
    meta_fields=[],
)

__all__ = ["StepMetadata", "bucket"]
