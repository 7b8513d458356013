"""Typed errors. Every failure of the public API raises a subclass of `PagedKVError`.

Each subclass also derives from the builtin a caller would naturally catch
(`ValueError`, `KeyError`, `MemoryError`), so code written against plain Python
exceptions keeps working. Messages name the offending values and, where there is
one, the fix.
"""

from __future__ import annotations


class PagedKVError(Exception):
    """Base class of every error paged_kv raises on purpose."""


class SpecError(PagedKVError, ValueError):
    """A `CacheSpec` field is missing, out of range or inconsistent with another."""


class OutOfBlocksError(PagedKVError, MemoryError):
    """The pool has fewer free blocks than a call needs. Nothing was allocated."""

    def __init__(self, needed: int, free: int, what: str = ""):
        self.needed, self.free = int(needed), int(free)
        where = f" for {what}" if what else ""
        super().__init__(
            f"need {self.needed} free blocks{where} but only {self.free} are free; "
            "release or preempt a sequence, or build the cache with more num_blocks"
        )


class SequenceTooLongError(PagedKVError, ValueError):
    """A sequence would exceed `max_blocks_per_seq` blocks. Nothing was allocated."""


class UnknownSequenceError(PagedKVError, KeyError):
    """A sequence id that the manager does not hold."""

    def __str__(self) -> str:  # KeyError would repr() the message; keep it readable
        return str(self.args[0]) if self.args else ""


class DuplicateSequenceError(PagedKVError, ValueError):
    """A sequence id that is already admitted, or appears twice in one call."""


class InvalidTokenCountError(PagedKVError, ValueError):
    """A token count that is negative, not an integer, or of the wrong shape."""


class InvalidSequenceIdError(InvalidTokenCountError):
    """A sequence id that is not a non-negative integer (a bool, float, string, ...).

    Derives from `InvalidTokenCountError`, which older versions raised for it."""


class InvalidTokenIdError(InvalidTokenCountError):
    """Token ids that are not a 1-D array of integers in ``[0, 2**63)`` (prefix-cache keys
    hash them as int64: a negative or larger id would alias another one)."""


class InvalidArgumentError(PagedKVError, ValueError):
    """An argument of the wrong type or out of range that no more specific error covers
    (a layer-group index, a device, a record field)."""


class StateError(PagedKVError, RuntimeError):
    """A valid call made in a state that does not allow it yet, e.g. swapping a sequence
    whose copy-on-write copy has not run: commit the step first."""


class StepError(StateError):
    """A commit of a step that cannot be committed: another manager's, committed already,
    or older than a step committed since (`paged_kv.allocator.steps`)."""


class StaleStepError(StepError):
    """A commit of a step naming a sequence released (or swapped out) since the step was
    described; ``commit(step, skip_released=True)`` commits the others."""


class BatchTooLargeError(PagedKVError, ValueError):
    """More sequences in one step than `max_batch_slots`."""


class SlotError(PagedKVError, ValueError):
    """A decode slot that is out of range, already taken, or empty when it must not be."""


class ShapeError(PagedKVError, ValueError):
    """A device array whose shape or dtype does not match the spec or the step metadata."""


class TraceError(PagedKVError, ValueError):
    """A request trace file that is missing, truncated or holds invalid values."""


__all__ = [
    "PagedKVError",
    "SpecError",
    "OutOfBlocksError",
    "SequenceTooLongError",
    "UnknownSequenceError",
    "DuplicateSequenceError",
    "InvalidTokenCountError",
    "InvalidSequenceIdError",
    "InvalidTokenIdError",
    "InvalidArgumentError",
    "StateError",
    "StaleStepError",
    "StepError",
    "BatchTooLargeError",
    "ShapeError",
    "SlotError",
    "TraceError",
]


class CheckpointError(PagedKVError, ValueError):
    """A checkpoint that cannot be saved or loaded: missing, truncated, corrupt (digest
    mismatch), of an unknown format version, or built for another spec. Nothing was
    written over the target (save) and nothing half-restored was returned (load)."""


__all__ += ["CheckpointError"]


class TransferError(PagedKVError):
    """Moving a sequence's pages to another process's cache failed (`paged_kv.transfer`).
    Whatever the failure, neither manager holds anything for the transfer afterwards:
    the receiver freed what it had admitted, and the sender's sequence is as it was."""


class TransferRefusedError(TransferError, ValueError):
    """The receiver refused the offer before anything was pulled; ``reason`` names why
    (``"spec"``, ``"full"``, ``"duplicate"``, ``"invalid"``, ``"message"``)."""

    def __init__(self, message: str, reason: str = "invalid"):
        super().__init__(message)
        self.reason = str(reason)


class TransferSpecError(TransferRefusedError, SpecError):
    """The two caches store pages differently: another spec (layers, heads, dims, dtype,
    layer kinds), page format, fp8 scales, rotation, key offsets, block size or layout."""


class ReceiverFullError(TransferRefusedError, MemoryError):
    """The receiver has too few free blocks for the sequence; it admitted nothing.
    ``needed`` and ``free`` are the receiver's block counts (-1 when not known)."""

    def __init__(self, message: str, needed: int = -1, free: int = -1):
        super().__init__(message, "full")
        self.needed, self.free = int(needed), int(free)


class TransferTimeoutError(TransferError, TimeoutError):
    """The peer did not answer, or the pages did not arrive, before the deadline."""


class TransferConnectionError(TransferError, ConnectionError):
    """The connection dropped mid-transfer (the peer process died or closed its server)."""


class SequenceChangedError(TransferError, StateError):
    """The sender's sequence changed between the offer and the send (released, grown,
    moved to other blocks): the receiver was told to drop what it admitted."""


class TransferMessageError(TransferError, ValueError):
    """A control message that is not valid: not JSON, another protocol version, over the
    size bound, missing or mistyped fields, or an unexpected type in its place."""


__all__ += ["TransferError", "TransferRefusedError", "TransferSpecError", "ReceiverFullError", "TransferTimeoutError",
            "TransferConnectionError", "SequenceChangedError", "TransferMessageError"]


class TierError(PagedKVError, ValueError):
    """A cache tier (`paged_kv.tiers`) refused a setting or its disk directory: a tier
    written under another spec, page layout, format version or key offsets, or a
    corrupt or foreign page file. A refused tier loads nothing."""


__all__ += ["TierError"]
