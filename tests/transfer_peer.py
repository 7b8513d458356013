"""The other process of tests/test_transfer.py: receivers it can query, or a sender that
dies on purpose. Run as ``python tests/transfer_peer.py receive CONFIG`` (prints one JSON
line of addresses, then serves until told to stop, its stdin closes or its time
limit passes) or ``... send CONFIG`` (offers a sequence, then dies where told).
Sockets bind 127.0.0.1 only.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import zmq  # noqa: E402

import paged_kv as pk  # noqa: E402
from paged_kv.transfer import TransferReceiver, TransferSender, messages  # noqa: E402
from paged_kv.sequence_pages import padded_sizes, read_sequence  # noqa: E402

BASE = dict(num_layers=3, num_blocks=40, block_size=4, max_blocks_per_seq=16, max_batch_slots=4, num_kv_heads=2,
            head_dim=8, dtype="bfloat16", sliding_window=6, sliding_layers=(1,), sliding_num_blocks=30)
SPECS = {
    "hybrid": BASE,
    "int8": {**{k: v for k, v in BASE.items() if not k.startswith("sliding")}, "kv_format": "int8"},
    "tiny": {**BASE, "num_blocks": 8, "max_blocks_per_seq": 7},
    "bigger": {**BASE, "num_blocks": 64, "max_blocks_per_seq": 32},  # another pool: compatible
}


def spec_of(name: str, **changes) -> pk.CacheSpec:
    return pk.CacheSpec(**{**SPECS[name], **changes})


def fill(cache, manager, seq_id: int, n: int, seed: int, dirty: bool = True):
    """Admit ``seq_id`` with ``n`` random tokens written; first (``dirty``) write and release a
    longer sequence, so the blocks it reuses hold another sequence's bytes past ``n``."""
    spec = manager.spec
    rng = np.random.default_rng(seed)

    def kv(length):
        shape = (spec.num_layers, length, spec.num_kv_heads, spec.head_dim)
        return [jnp.asarray(rng.standard_normal(shape), jnp.bfloat16) for _ in range(2)]

    if dirty:
        other = 10**6 + seq_id
        length = min(spec.max_seq_len, -(-n // spec.block_size) * spec.block_size + spec.block_size)
        cache = pk.insert_prefill(cache, manager, other, *kv(length))
        manager.release(other)
    if n < 2:
        return pk.insert_prefill(cache, manager, seq_id, *kv(n))
    # The last token as a decode step writes it: a sliding group sheds the blocks behind its window.
    cache = pk.insert_prefill(cache, manager, seq_id, *kv(n - 1))
    manager.append([seq_id], 1)
    meta = manager.step_metadata([seq_id], 1)
    k, v = (jnp.asarray(rng.standard_normal((meta.batch_size, meta.query_len, spec.num_kv_heads, spec.head_dim)),
                        jnp.float32) for _ in range(2))
    for layer in range(spec.num_layers):
        cache = cache.replace(layer, cache[layer].write(k, v, meta))
    manager.commit(meta.step)
    return cache


def digest(cache, manager, seq_id: int) -> dict:
    """sha256 of the sequence's pages (every layer, as a transfer sends them, padding cut)
    and whether every raw slot past its length in its blocks is zero."""
    record = manager.swap_record(seq_id)
    sizes = padded_sizes(record.num_blocks, manager.spec.max_blocks_per_seq)
    pages = read_sequence(cache, record.blocks, record.first_blocks, record.num_tokens, sizes, manager.steps.tag)
    h = hashlib.sha256()
    tail_zero = True
    bs, n = manager.spec.block_size, record.num_tokens
    for view, layer in zip(cache.views, pages):
        count = record.blocks[view.group].size
        for leaf, got in zip(jax.tree_util.tree_leaves(view.pages()), layer):
            h.update(np.asarray(got)[:count].tobytes())
            if n % bs:
                raw = np.asarray(leaf[int(record.blocks[view.group][-1])])
                tail_zero &= not raw[n % bs:].any()
    return {"sha256": h.hexdigest(), "tail_zero": bool(tail_zero), "first_blocks": list(record.first_blocks)}


def integrity(manager) -> str:
    try:
        manager.check_integrity()
    except AssertionError as exc:
        return f"broken: {exc}"
    return "ok"


def receive(config: list[dict], limit: float) -> None:
    peers = {}
    for c in config:
        spec = spec_of(c["spec"], **c.get("changes", {}))
        manager = pk.KVCacheManager(spec, prefix_cache=c.get("prefix", True))
        receiver = TransferReceiver(manager, offer_timeout=c.get("offer_timeout", 20.0),
                                    pull_timeout=c.get("pull_timeout", 20.0), shared_memory=c.get("shm", True))
        peers[c["name"]] = {"manager": manager, "receiver": receiver, "cache": pk.PagedKVCache.init(spec)}
    control = zmq.Context.instance().socket(zmq.REP)
    control.setsockopt(zmq.LINGER, 0)
    port = control.bind_to_random_port("tcp://127.0.0.1")
    print(json.dumps({"receivers": {k: p["receiver"].address for k, p in peers.items()},
                      "control": f"tcp://127.0.0.1:{port}"}), flush=True)
    end = time.monotonic() + limit
    while time.monotonic() < end:
        for p in peers.values():
            p["cache"], _ = p["receiver"].poll(p["cache"], timeout=0.002)
        if control.poll(0, zmq.POLLIN):
            cmd = json.loads(control.recv())
            if cmd["cmd"] == "stop":
                control.send_json({"ok": True})
                break
            control.send_json(command(peers[cmd["name"]], cmd))
    for p in peers.values():
        p["receiver"].close()


def command(p: dict, cmd: dict) -> dict:
    manager, receiver = p["manager"], p["receiver"]
    if cmd["cmd"] == "status":
        return {"integrity": integrity(manager), "used": int(manager.num_used_blocks), "seqs": manager.seq_ids,
                "pending": receiver.pending, "counts": dict(receiver.counts)}
    if cmd["cmd"] == "digest":
        return digest(p["cache"], manager, cmd["seq_id"])
    if cmd["cmd"] == "hit":  # what a later request with these tokens would find cached
        probe = 10**9
        cached = manager.admit_prompt(probe, cmd["tokens"], cmd.get("cache_key"))
        manager.release(probe)
        return {"cached": cached}
    if cmd["cmd"] == "admit":  # occupy blocks
        manager.admit(cmd["seq_id"], cmd["tokens"])
        return {"used": int(manager.num_used_blocks)}
    if cmd["cmd"] == "release":
        manager.release(cmd["seq_id"])
        return {"used": int(manager.num_used_blocks)}
    raise ValueError(cmd)


def send(config: dict) -> None:
    """Offer a sequence to ``config["to"]``, then die as ``config["die"]`` says:
    "after-ready" (never pull), "pull-unposted" (ask for a pull of pages never posted),
    "after-post" (post the pages, ask for the pull, exit at once), "mid-stream" (start
    the shared-memory stream, put its first chunk in the ring, exit)."""
    spec = spec_of(config["spec"])
    manager = pk.KVCacheManager(spec)
    cache = fill(pk.PagedKVCache.init(spec), manager, config["seq_id"], config["tokens"], seed=3)
    sender = TransferSender(manager, timeout=20.0, shm_slots=2, shm_slot_bytes=4096)
    tokens = np.arange(config["tokens"]) % 97
    offer = sender.offer(cache, config["seq_id"], tokens, config["to"])
    print("ready", flush=True)
    conn = sender._connection(config["to"])
    if config["die"] == "pull-unposted":
        server = sender._transfer_server()
        conn.send(messages.make("pull", offer.transfer, address=server.address(), uuid=12345))
    elif config["die"] == "mid-stream":
        from paged_kv.transfer.stream import Source, plan
        assert offer.path == "shm" and offer.ring is not None
        p = plan(cache, tuple(b.size for b in offer.blocks), offer.ring.slot_bytes)
        assert len(p.chunks) > 1  # the first alone leaves it unfinished
        conn.send(messages.make("stream", offer.transfer, first=0, count=len(p.chunks), nbytes=p.nbytes))
        Source(cache, p, offer.blocks, offer.first_blocks, offer.num_tokens, manager.steps.tag).fill(0, offer.ring.slot(0))
        offer.ring.written = 1
    elif config["die"] == "after-post":
        pages = read_sequence(cache, offer.blocks, offer.first_blocks, offer.num_tokens, offer.padded,
                              manager.steps.tag)
        server = sender._transfer_server()
        server.await_pull(777, jax.tree_util.tree_leaves(pages))
        conn.send(messages.make("pull", offer.transfer, address=server.address(), uuid=777))
    time.sleep(0.05)  # let ZeroMQ flush the message
    print("dying", flush=True)
    os._exit(0)


if __name__ == "__main__":
    mode, config = sys.argv[1], json.loads(sys.argv[2])
    if mode == "receive":
        receive(config, float(sys.argv[3]) if len(sys.argv) > 3 else 120.0)
    else:
        send(config)
