"""Sequence ids: the one rule for what a caller may use to name a request.

A sequence id is a Python or numpy integer, never a bool. Why so strict: ``True ==
1 == 1.0`` and all three hash alike, so a dict keyed by id would let
``release(True)`` or ``kv_len(1.0)`` silently act on sequence 1. Every class that
takes ids (`KVCacheManager`, `DecodeSlots`, `SwapRecord`) checks them here.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from paged_kv.errors import InvalidSequenceIdError, UnknownSequenceError


def is_seq_id(value: object) -> bool:
    """Whether ``value`` has the type of a sequence id (an integer, not a bool); any sign."""
    return not isinstance(value, bool) and isinstance(value, (int, np.integer))


def check_seq_id(value: Any, what: str = "") -> int:
    """``value`` as a new sequence id (an integer >= 0), or `InvalidSequenceIdError`;
    ``what`` prefixes the message (e.g. ``"SwapRecord "``)."""
    if not is_seq_id(value):
        raise InvalidSequenceIdError(f"{what}seq_id={value!r} must be an integer (got {type(value).__name__})")
    if value < 0:
        raise InvalidSequenceIdError(f"{what}seq_id={value} must be >= 0")
    return int(value)


def id_list(seq_ids: Any) -> list[Any]:
    """``seq_ids`` as a list; a bare id or another non-iterable is a typed error."""
    if isinstance(seq_ids, list):
        return seq_ids
    if isinstance(seq_ids, (str, bytes)) or not hasattr(seq_ids, "__iter__"):
        raise UnknownSequenceError(f"seq_ids={seq_ids!r} must be a list of sequence ids (wrap a single id: [{seq_ids!r}])")
    return list(seq_ids)


__all__ = ["check_seq_id", "id_list", "is_seq_id"]
