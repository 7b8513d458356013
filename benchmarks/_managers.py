"""One small adapter per KV cache manager, so `bench_vs_vllm.py` writes its serving
loop once: paged_kv's `KVCacheManager` and vLLM v1's `KVCacheManager`.

Each adapter turns the loop's requests into the manager's own calls, the way that
manager's scheduler makes them. Everything an adapter method does is what the
benchmark times for that manager, except `handle` and `after_step` (building a
request object, the engine's per-token bookkeeping), which run untimed. paged_kv's
`commit` (after every forward pass) is timed with the step's export.

paged_kv is driven three ways, each its own adapter: the persistent batch
(`PagedKVManager`: `StepBatch.decode`, `StepBatch.step` when rows join, the batch's
synchronous commit), the plain path (`PagedKVPlain`: `append` + `step_metadata` +
`commit(ids)`, fresh arrays every step), and the persistent batch with one step
always in flight (`PagedKVAsync`: step N+1 is described before step N is
committed, through the `Step` handles, as an overlap scheduler does).

vLLM is a benchmark dependency only: import this module's `VllmManager` only when
`vllm_available()` says so (see benchmarks/PEERS.md for a CPU install).
"""

from __future__ import annotations

import numpy as np

import paged_kv as pk

MODEL = dict(num_kv_heads=8, head_dim=128)


def vllm_available() -> str | None:
    """None when vLLM v1's manager imports; otherwise why not."""
    try:
        import vllm.v1.core.kv_cache_manager  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any failure means "not usable here"
        return f"{type(exc).__name__}: {exc}"
    return None


class PagedKVManager:
    """paged_kv: a persistent `StepBatch`: `decode` (append + metadata in one pass), `step` when rows join."""

    name = "paged_kv"
    uses_batch = True

    def __init__(self, num_blocks: int, block_size: int, max_len: int, max_seqs: int, prefix: bool = False):
        spec = pk.CacheSpec(num_layers=32, num_blocks=num_blocks, block_size=block_size,
                            max_blocks_per_seq=max_len // block_size, max_batch_slots=max_seqs, **MODEL)
        self.m = pk.KVCacheManager(spec, prefix_cache=prefix)
        # The persistent batch: a step rewrites only what changed.
        self.batch = pk.StepBatch(self.m) if self.uses_batch else None
        self._prompts: dict[int, np.ndarray] = {}
        self._decoded = None

    def handle(self, rid: int, tokens, length: int = 1) -> int:
        if tokens is not None:
            self._prompts[rid] = np.asarray(tokens, dtype=np.int64)
        return rid

    def num_free(self) -> int:
        return self.m.num_free_blocks

    def admit(self, h, n: int) -> int:
        """Hold the first ``n`` tokens; returns how many were cached (prefix hits)."""
        tokens = self._prompts.get(h)
        if tokens is None:
            self.m.admit(h, n)
            return 0
        return self.m.admit_prompt(h, tokens)

    def decode(self, hs: list) -> None:
        # Append one token each and describe that step (one fused pass when the batch is unchanged).
        self._decoded = self.batch.decode(hs)

    def export(self, hs: list, counts) -> object:
        meta, self._decoded = self._decoded, None
        if counts == 1 and meta is not None:
            return meta  # nobody joined: the decode step's metadata is the step's
        return self.batch.step(hs, counts)  # prefill rows joined: describe the mixed step

    def release(self, h) -> None:
        self.m.release(h)

    preempt = release

    def commit(self, hs: list) -> None:
        # The forward pass ran: copy-on-write copies retire, written blocks become hittable.
        self.batch.commit()  # the persistent batch commits the step it described

    def after_step(self, hs: list, counts) -> None:
        pass

    def check(self) -> None:
        self.m.check_integrity()


class PagedKVPlain(PagedKVManager):
    """paged_kv without the persistent batch: ``append(ids, 1)``, then
    ``step_metadata(ids, counts)`` (fresh arrays), then ``commit(ids)`` (the synchronous form)."""

    name = "paged_kv_plain"
    uses_batch = False

    def decode(self, hs: list) -> None:
        self.m.append(hs, 1)

    def export(self, hs: list, counts) -> object:
        return self.m.step_metadata(hs, counts)

    def commit(self, hs: list) -> None:
        self.m.commit(hs)


class PagedKVAsync(PagedKVManager):
    """The persistent batch with one step in flight: each `commit` takes the step just
    described (``batch.last_step``) and commits the one before it
    (``manager.commit(step, skip_released=True)``: a sequence released or preempted
    while its step was in flight has nothing left to commit). So step N+1 is always
    described before step N is committed, as an overlap scheduler does. `check`
    commits the last step (untimed: the replay is over)."""

    name = "paged_kv_async"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._in_flight = None

    def commit(self, hs: list) -> None:
        step = self.batch.last_step  # step N+1, described; step N ran meanwhile
        if self._in_flight is not None:
            self.m.commit(self._in_flight, skip_released=True)
        self._in_flight = step

    def check(self) -> None:
        if self._in_flight is not None:
            self.m.commit(self._in_flight, skip_released=True)
            self._in_flight = None
        super().check()


class VllmManager:
    """vLLM v1: `allocate_slots` per request, `get_block_ids` of what it returns."""

    name = "vllm_v1"

    def __init__(self, num_blocks: int, block_size: int, max_len: int, max_seqs: int, prefix: bool = False):
        import torch
        from vllm.sampling_params import SamplingParams
        from vllm.utils.hashing import sha256
        from vllm.v1.core.kv_cache_manager import KVCacheManager
        from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
        from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
        from vllm.v1.request import Request, RequestStatus

        spec = FullAttentionSpec(block_size=block_size, num_kv_heads=MODEL["num_kv_heads"],
                                 head_size=MODEL["head_dim"], dtype=torch.bfloat16)
        cfg = KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[],
                            kv_cache_groups=[KVCacheGroupSpec(["layer.0"], spec)])
        # The loop applies the admission watermark itself, identically for both managers.
        self.m = KVCacheManager(cfg, max_model_len=max_len, scheduler_block_size=block_size,
                                hash_block_size=block_size, enable_caching=prefix, watermark=0.0)
        self._Request, self._Status, self._Sampling = Request, RequestStatus, SamplingParams
        self.hasher = None
        if prefix:  # the engine's default hash (CacheConfig.prefix_caching_hash_algo)
            init_none_hash(sha256)
            self.hasher = get_request_block_hasher(block_size, sha256)
        self._new: list = []

    def handle(self, rid: int, tokens, length: int = 1):
        ids = list(range(length)) if tokens is None else [int(t) for t in tokens]
        return self._Request(str(rid), ids, self._Sampling(max_tokens=1 << 20), None)

    def num_free(self) -> int:
        return self.m.block_pool.get_num_free_blocks()

    def admit(self, req, n: int) -> int:
        if self.hasher is not None and not req.block_hashes:
            # The engine hashes a request's blocks when it arrives; paged_kv hashes
            # inside admit_prompt. Counted here so both figures include hashing.
            req.block_hashes.extend(self.hasher(req))
        blocks, cached, _ = self.m.get_computed_blocks(req)
        new = self.m.allocate_slots(req, n - cached, cached, blocks)
        assert new is not None, "the loop admitted a request vLLM refuses"
        req.status = self._Status.RUNNING
        self._new.append(self.m.get_blocks(req.request_id))
        return cached

    def decode(self, reqs: list) -> None:
        self.m.new_step_starts()
        alloc, new = self.m.allocate_slots, self._new
        for req in reqs:
            blocks = alloc(req, 1)
            assert blocks is not None, "the loop scheduled a decode vLLM refuses"
            new.append(blocks)

    def export(self, reqs: list, counts) -> list:
        # What the scheduler hands the model runner: each request's new block ids.
        out = [b.get_block_ids(allow_none=True) for b in self._new]
        self._new = []
        return out

    def release(self, req) -> None:
        self.m.free(req)

    def preempt(self, req) -> None:
        self.m.free(req)
        req.status = self._Status.PREEMPTED
        req.num_computed_tokens = 0

    def commit(self, reqs: list) -> None:
        pass  # vLLM caches a request's blocks inside allocate_slots (timed there)

    def after_step(self, reqs: list, counts) -> None:
        # The engine's bookkeeping after the forward pass: tokens computed, one sampled.
        for req, c in zip(reqs, counts):
            req.num_computed_tokens += int(c)
            req.append_output_token_ids(0)

    def check(self) -> None:
        pass


__all__ = ["PagedKVAsync", "PagedKVManager", "PagedKVPlain", "VllmManager", "vllm_available"]
