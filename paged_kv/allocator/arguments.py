"""Checks of the arguments `KVCacheManager` takes: ids to rows, token counts, token ids.

Kept apart from the manager so that its methods read as what they do; every check
raises the typed error (a `PagedKVError` subclass naming the bad value) before the
manager changes anything.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from paged_kv.allocator.seq_ids import id_list, is_seq_id
from paged_kv.errors import DuplicateSequenceError, InvalidTokenCountError, InvalidTokenIdError, UnknownSequenceError
from paged_kv.words import plural

MAX_TOKEN_ID = 2**63 - 1
"""Largest token id a prompt may hold: keys hash ids as int64, so a larger (or a
negative) id would alias another and two different prompts could share a key."""


def row_of(rows_of: dict[int, int], seq_id: Any) -> int:
    """The page-table row of admitted ``seq_id``, or `UnknownSequenceError`."""
    # True == 1 == 1.0 hash alike: without the type check release(True) or kv_len(1.0)
    # would silently act on seq 1.
    if not is_seq_id(seq_id):
        raise UnknownSequenceError(
            f"seq_id={seq_id!r} is not admitted: sequence ids are integers, not {type(seq_id).__name__}"
        )
    try:
        return rows_of[seq_id]
    except (KeyError, TypeError):
        raise UnknownSequenceError(f"seq_id={seq_id!r} is not admitted (held: {plural(len(rows_of), 'sequence')})") from None


def check_count(value: object, name: str) -> int:
    """A token count as an int in ``[0, 2**31)``, or `InvalidTokenCountError` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidTokenCountError(f"{name}={value!r} must be an integer")
    if value < 0:
        raise InvalidTokenCountError(f"{name}={value} must be >= 0")
    if value > 2**31 - 1:
        raise InvalidTokenCountError(f"{name}={value} exceeds any cache's token slots (< 2**31)")
    return int(value)


def rows_and_counts(rows_of: dict[int, int], seq_ids: Iterable[int],
                    num_tokens: int | Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of distinct admitted ``seq_ids`` and one int64 count per row (``num_tokens``:
    an int for all, or one count each)."""
    seq_ids = id_list(seq_ids)
    if not set(map(type, seq_ids)) <= {int, np.int64, np.int32}:
        for s in seq_ids:
            row_of(rows_of, s)  # bool/float ids hash like ints (True == 1.0 == 1): reject, never alias
    try:
        # map over the dict's bound __getitem__ runs the lookups in C: 3x faster
        # than a call per id, which matters at hundreds of ids per step.
        rows = np.fromiter(map(rows_of.__getitem__, seq_ids), dtype=np.int64, count=len(seq_ids))
    except (KeyError, TypeError):
        for s in seq_ids:
            row_of(rows_of, s)  # raises UnknownSequenceError naming the first bad id
        raise
    ordered = np.sort(rows)
    if np.any(ordered[1:] == ordered[:-1]):
        dup = int(ordered[1:][ordered[1:] == ordered[:-1]][0])
        raise DuplicateSequenceError(
            f"seq_id={next(s for s in seq_ids if rows_of[s] == dup)} appears twice in one call of {len(seq_ids)} ids"
        )
    return rows, _counts(num_tokens, rows.size)


def _counts(num_tokens: Any, n: int) -> np.ndarray:
    try:
        counts = np.asarray(num_tokens)
    except (ValueError, TypeError):  # a ragged nested list
        raise InvalidTokenCountError(f"num_tokens={num_tokens!r} is not an int or one count per sequence") from None
    if counts.ndim == 0:
        return np.full(n, check_count(num_tokens, "num_tokens"), dtype=np.int64)
    if counts.shape != (n,) or not np.issubdtype(counts.dtype, np.integer):
        raise InvalidTokenCountError(f"num_tokens has shape {counts.shape} dtype {counts.dtype}; need {n} integers")
    if np.any(counts < 0):
        raise InvalidTokenCountError(f"num_tokens={counts.tolist()} has negative counts")
    if np.any(counts > 2**31 - 1):
        raise InvalidTokenCountError(f"num_tokens={counts.tolist()} has counts >= 2**31, more than any cache holds")
    return counts.astype(np.int64)


def check_token_ids(token_ids: Any, what: str) -> np.ndarray:
    """``token_ids`` as a non-empty 1-D int64 array of ids in ``[0, 2**63)``, or `InvalidTokenIdError`."""
    try:
        tokens = np.asarray(token_ids)
    except (ValueError, TypeError):  # ragged nesting
        raise InvalidTokenIdError(f"{what}: token_ids={token_ids!r} is not a 1-D sequence of integers") from None
    if tokens.ndim != 1 or tokens.size < 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise InvalidTokenIdError(
            f"{what}: token_ids must be a non-empty 1-D sequence of integers; got shape {tokens.shape} dtype {tokens.dtype}"
        )
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high > MAX_TOKEN_ID:
        bad = low if low < 0 else high
        raise InvalidTokenIdError(f"{what}: token id {bad} is outside [0, 2**63); token ids are vocabulary indices")
    return tokens.astype(np.int64, copy=False)


__all__ = ["MAX_TOKEN_ID", "check_count", "check_token_ids", "row_of", "rows_and_counts"]
