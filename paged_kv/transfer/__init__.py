"""Moving one sequence's pages between serving processes (disaggregated prefill/decode).

A `TransferSender` in one process offers a sequence of its cache to a
`TransferReceiver` in another; the receiver admits it with its own manager (all or
nothing), receives its pages -- every layer group, quantized pages with their scales --
through a shared-memory ring when both are CPU caches on one host (`shm`, `stream`:
read from the sender's pool and written into the receiver's in place), else pulls
them through `jax.experimental.transfer` and writes them in one jitted call (either
way stamping block generations, `paged_kv.binding`), and keys its full blocks in its
prefix cache under the same chain keys and salt. The control messages (which
sequence, its length, tokens, salt, the shapes to pull, each side's answer) go over
ZeroMQ as versioned, size-bounded JSON (`paged_kv.transfer.messages`); sockets bind
127.0.0.1 only. Failures are `paged_kv.errors.TransferError`s and leave neither
manager holding anything for the transfer.

Needs pyzmq: ``pip install 'paged_kv[transfer]'``.
"""

from paged_kv.transfer.receiver import Received, TransferReceiver
from paged_kv.transfer.sender import Offer, Sent, TransferSender

__all__ = ["Offer", "Received", "Sent", "TransferReceiver", "TransferSender"]
