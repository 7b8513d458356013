"""Greedy generation for a batch of prompts with continuous batching over the paged cache.

One loop, as a serving engine runs it:

- admission: while a decode slot is free and the pool keeps one block of headroom
  per running sequence, the next waiting request is admitted (`admit_prompt`, which
  reuses the longest cached prefix of full blocks, or `admit`) and all requests
  admitted in a step are prefilled in one batched forward pass;
- decode: every running sequence is bound to a `DecodeSlots` slot, so one jitted
  step of a fixed batch shape decodes them all; finished ones release their blocks
  and their slot takes the next request mid-run;
- preemption: when the running sequences cannot all grow by a token, the newest is
  released (recompute: it goes back to the head of the queue with the tokens it
  has, and its prefill later recomputes them, hitting whatever the prefix cache
  still holds).

The admission order, the prompt chunks and whom to preempt are the simulator's too
(`paged_kv.sched.SchedulingPolicy`); what differs is when (this loop admits, then
prefills, then decodes; the simulator grows the running sequences first, under a token
budget) and the headroom (blocks per running sequence, not a share of the pool).
The request types live in `paged_kv.models.requests` and `paged_kv.models.sequences`
(re-exported here).
"""

from __future__ import annotations

import collections
import os
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any

import jax
import numpy as np

from paged_kv.batch.decode_slots import DecodeSlots
from paged_kv.allocator.manager import KVCacheManager
from paged_kv.cache import PagedKVCache
from paged_kv.insertion import insert_prefill_slot
from paged_kv.errors import OutOfBlocksError
from paged_kv.metadata import StepMetadata, bucket
from paged_kv.models.decoder import Params
from paged_kv.models.llama import LlamaConfig
from paged_kv.models.programs import ModelPrograms
from paged_kv.models.requests import Completion, GenerationError, GenerationStats, Request
from paged_kv.models.sampling import Pick, Sampler, record_logprobs
from paged_kv.models.sequences import Prefilled, Seq, checked_sequences
from paged_kv.models.stops import Detokenize
from paged_kv.sched import SchedulingPolicy, leaves_headroom
from paged_kv.spec import CacheSpec


class Generator:
    """Greedy continuous-batching generation of one model over one paged cache.

    ``spec``: the cache (see `paged_kv.models.llama.cache_spec`); its
    ``max_batch_slots`` is the decode batch. ``prefix_cache``: reuse cached prompt
    blocks. ``eos_token_ids``: tokens that end a sequence (e.g. ``cfg.eos_token_ids``;
    none by default: every request generates ``max_new_tokens``). ``record_logits``:
    keep every position's logits in the completions (the prefill then computes
    logits for all its tokens, not only the last).
    ``headroom``: blocks kept free per running sequence when admitting (a watermark:
    0 admits whenever the prompt fits and preempts more often). ``prefill_chunk``:
    compute at most this many prompt tokens of a sequence per step (chunked prefill:
    bounded steps, fewer step shapes); None: whole prompts.
    ``compiler_options``: XLA options for the step's compilation (e.g.
    ``{"xla_backend_optimization_level": 0}`` compiles a tiny model ~3x faster on CPU).
    ``detokenize``: token ids -> text (e.g. a tokenizer's ``decode``): completions then
    carry their ``text``, and requests may give ``stop`` strings.
    ``program_cache``: a directory where the compiled steps are kept, so that a later
    process (same model, spec, code and jax) reads them back instead of tracing and
    compiling (`paged_kv.models.programs`; the CLI keeps them beside JAX's compilation
    cache); None keeps nothing.
    """

    def __init__(self, cfg: LlamaConfig, params: Params, spec: CacheSpec, *, prefix_cache: bool = True,
                 eos_token_ids: Sequence[int] = (), record_logits: bool = False,
                 compiler_options: dict[str, Any] | None = None, headroom: int = 1, prefill_chunk: int | None = None,
                 detokenize: Detokenize | None = None, program_cache: str | os.PathLike[str] | None = None) -> None:
        if program_cache is not None and not isinstance(program_cache, (str, os.PathLike)):
            raise GenerationError(f"program_cache={program_cache!r} must be None or a directory path")
        self.cfg, self.params, self.spec, self.detokenize = cfg, params, spec, detokenize
        self.manager = KVCacheManager(spec, prefix_cache=prefix_cache)
        self.slots = DecodeSlots(self.manager)
        self.cache = PagedKVCache.init(spec)
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        if isinstance(headroom, bool) or not isinstance(headroom, int) or headroom < 0:
            raise GenerationError(f"headroom={headroom!r} must be an int >= 0 (blocks per running sequence)")
        self.headroom = headroom
        if prefill_chunk is not None and (isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int)
                                          or prefill_chunk < 1):
            raise GenerationError(f"prefill_chunk={prefill_chunk!r} must be None or an int >= 1")
        self.prefill_chunk = prefill_chunk
        # The policy the simulator follows too: FCFS admission into the decode slots,
        # chunked prefill, newest-first preemption (no token budget per step).
        self.policy = SchedulingPolicy(max_batch=self.slots.num_slots, prefill_chunk=prefill_chunk)
        self._prefilling: list[Seq] = []  # admitted, prompt not fully in the pages yet
        self.record_logits = record_logits
        self._sampler = Sampler()

        self._programs = ModelPrograms(cfg, spec, record_logits, program_cache, compiler_options)

    # ---- requests --------------------------------------------------------------------
    def _sequences(self, requests: Sequence[Request], taken: Collection[int] = ()) -> list[Seq]:
        return checked_sequences(requests, taken, self.cfg.vocab_size, self.spec, self.detokenize)

    # ---- the loop --------------------------------------------------------------------
    def generate(self, requests: Sequence[Request],
                 progress: Callable[[int, int, GenerationStats], None] | None = None,
                 arrivals: Callable[[bool], Sequence[Request] | None] | None = None
                 ) -> tuple[list[Completion], GenerationStats]:
        """Run every request to completion; returns completions in request order and stats.

        Requests are checked before anything runs (`GenerationError`,
        `SequenceTooLongError`, `OutOfBlocksError`). Cached prefix blocks and
        compiled steps carry over to the next call. ``arrivals(idle)``, if given, is
        called once per loop iteration (``idle``: nothing runs or waits, so it may block
        until something comes) and returns requests that arrived meanwhile (`Prefilled`
        ones among them), or None once no more will come; their completions follow the
        others', in arrival order."""
        if len(self.manager) or self._prefilling:
            raise GenerationError(f"{len(self.manager)} sequences are still held from a call that failed mid-run; "
                                  "build a new Generator")
        seqs = self._sequences(requests)
        self._by_id = {s.request_id: s for s in seqs}
        open_ = arrivals is not None
        self.stats = GenerationStats(requests=len(seqs))
        waiting = collections.deque(sorted(seqs, key=lambda s: s.arrival_step))
        finished = 0
        start, traces, loaded = time.perf_counter(), self._programs.traces, self._programs.loaded
        self._start = start  # a completion's first_token_seconds counts from here
        self._clock = 0
        while waiting or len(self.slots) or self._prefilling or open_:
            if open_:
                # open_: there are arrivals to ask for
                new = arrivals(not (waiting or len(self.slots) or self._prefilling))  # type: ignore[misc]
                open_ = new is not None
                for s in self._sequences(new or (), taken=self._by_id):
                    s.arrival_step = max(s.arrival_step, self._clock)
                    seqs.append(s)
                    waiting.append(s)
                    self._by_id[s.request_id] = s
                    self.stats.requests += 1
                if not waiting and not len(self.slots) and not self._prefilling:
                    continue
            if not len(self.slots) and not self._prefilling:
                self._clock = max(self._clock, waiting[0].arrival_step)  # idle: skip to the next arrival
            elsewhere = self._admit(waiting)
            for seq in elsewhere:
                finished += self._insert(seq) if seq.first_token is None else self._adopt(seq)
            done, progressed = self._prefill()
            finished += done
            if not (progressed or elsewhere or len(self.slots)):
                self._unblock(waiting)
            if len(self.slots):
                self._make_room(waiting)
                finished += self._decode()
            self._clock += 1
            if progress is not None:
                self.stats.seconds = time.perf_counter() - start
                progress(finished, len(seqs), self.stats)
        self.stats.seconds = time.perf_counter() - start
        self.stats.compilations = self._programs.traces - traces
        self.stats.loaded_programs = self._programs.loaded - loaded
        return [s.completion for s in seqs], self.stats  # type: ignore[misc]  # each finished: has its completion

    def _run(self, tokens: np.ndarray, metadata: StepMetadata, greedy: bool = False) -> np.ndarray:
        """Run one step: its logits, or with ``greedy`` each row's argmax token."""
        logits, self.cache = self._programs.steps[greedy](self.params, self.cache, jax.device_put(tokens), metadata.to_device())
        logits = np.asarray(logits)  # waits for the step
        used = self.manager.num_used_blocks / sum(g.num_blocks - 1 for g in self.spec.groups)
        self.stats.kv_usage_sum += used
        self.stats.kv_usage_samples += 1
        self.stats.kv_usage_peak = max(self.stats.kv_usage_peak, used)
        return logits

    def _admit(self, waiting: collections.deque[Seq]) -> list[Seq]:
        """Admit arrived requests in the policy's order while a slot is free and the pool
        keeps `headroom` blocks per running sequence (one: the next decode step fits).
        Paged ones join the prefilling set; returns those to prefill elsewhere
        (admitted when inserted)."""
        elsewhere: list[Seq] = []
        reserved = 0  # blocks the prompts to insert will take

        def take(seq: Seq, _budget: int | None) -> int | None:
            nonlocal reserved
            # Upper bound: prefix-cache hits and chunking only lower what the prompt takes.
            need = self.spec.blocks_for(len(seq.tokens))
            running = len(self.slots) + len(self._prefilling) + len(elsewhere)
            if seq.arrival_step > self._clock or not leaves_headroom(
                    self.manager.num_free_blocks - reserved, need, self.headroom * running):
                return None
            seq.admitted_at = self.stats.prefill_steps
            self.stats.joined_mid_run += 1 if len(self.slots) else 0
            if seq.first_token is not None:  # prefilled elsewhere: its blocks are held already
                elsewhere.append(seq)
                return 0
            if seq.elsewhere:
                elsewhere.append(seq)
                reserved += need
                return len(seq.tokens)
            if self.manager.prefix_cache is not None:
                seq.done = self.manager.admit_prompt(seq.request_id, seq.tokens, chunk=self.prefill_chunk)
            else:
                self.manager.admit(seq.request_id, self.policy.chunk(len(seq.tokens)))
                seq.done = 0
            self.stats.cached_tokens += seq.done
            self._completion(seq).cached_tokens += seq.done
            self._prefilling.append(seq)
            return self.policy.chunk(len(seq.tokens) - seq.done)

        self.policy.admit(waiting, len(self.slots) + len(self._prefilling), take)
        return elsewhere

    def _next_chunks(self) -> list[tuple[Seq, int]]:
        """The prefilling sequences that can compute tokens this step, with how many:
        the tokens admitted and not computed, after appending the next chunk to those
        whose last chunk was computed (a sequence the pool cannot grow waits)."""
        rows = []
        for s in self._prefilling:
            rid, held = s.request_id, self.manager.kv_len(s.request_id)
            if held == s.done:  # only when chunking: unchunked prompts are held whole from admission
                k = self.policy.chunk(len(s.tokens) - held)
                if not self.manager.can_append([rid], k):
                    continue
                self.manager.append([rid], k)
                held += k
            rows.append((s, held - s.done))
        return rows

    def _prefill(self) -> tuple[int, bool]:
        """One forward pass over the prefilling sequences' next tokens; a sequence whose
        prompt is complete is bound to a slot (or finishes). Returns (how many
        finished, whether any token was computed)."""
        rows = self._next_chunks()
        if not rows:
            return 0, False
        ids = [s.request_id for s, _ in rows]
        meta = self.manager.step_metadata(ids, [c for _, c in rows])
        tokens = np.zeros((meta.batch_size, meta.query_len), np.int32)
        for b, (s, c) in enumerate(rows):
            tokens[b, :c] = s.tokens[s.done: s.done + c]
        logits = self._run(tokens, meta)
        self.manager.commit(ids)  # the step ran: its full prompt blocks become hittable
        self.stats.prefill_steps += 1
        finished, ends = 0, [b for b, (s, c) in enumerate(rows) if s.done + c == len(s.tokens)]
        picks = dict(zip(ends, self._sampler.pick([rows[b][0] for b in ends], [
            logits[b, rows[b][1] - 1] if self.record_logits else logits[b] for b in ends])))
        for b, (s, c) in enumerate(rows):
            self.stats.prefill_tokens += c
            if self.record_logits:
                self._record(s, range(s.done, s.done + c), logits[b, :c])
            s.done += c
            if s.done < len(s.tokens):
                continue
            self._prefilling.remove(s)
            if self._take(s, *picks[b]):
                self.manager.release(s.request_id)
                finished += 1
            else:
                self.slots.insert(s.request_id)
        return finished, True

    def _insert(self, s: Seq) -> int:
        """Prefill ``s`` with no cache, write its keys and values into fresh blocks and
        bind it to a slot (or finish it). Returns 1 if it finished."""
        n = len(s.tokens)
        tokens = np.zeros((1, bucket(n, self.spec.max_seq_len)), np.int32)
        tokens[0, :n] = s.tokens
        logits, keys, values = self._programs.contiguous(self.params, jax.device_put(tokens))
        self.cache, slot = insert_prefill_slot(self.cache, self.slots, s.request_id, [k[0, :n] for k in keys],
                                                     [v[0, :n] for v in values])
        logits = np.asarray(logits)[0, :n]
        self.stats.prefill_steps += 1
        self.stats.inserted_prefills += 1
        self.stats.prefill_tokens += n
        if self.record_logits:
            self._record(s, range(n), logits)
        if self._take(s, *self._sampler.pick([s], logits[-1:])[0]):
            self.slots.release(slot)
            return 1
        return 0

    def _adopt(self, s: Seq) -> int:
        """Bind a `Prefilled` sequence to a slot (or finish it on its first token). Returns 1 if it finished."""
        rid, n = s.request_id, len(s.tokens)
        if rid not in self.manager or self.manager.kv_len(rid) != n:
            held = self.manager.kv_len(rid) if rid in self.manager else None
            raise GenerationError(f"prefilled request {rid}: the manager holds {held} tokens of it; expected its "
                                  f"{n} prompt tokens written in the cache")
        first, s.first_token = s.first_token, None  # from here on an ordinary sequence (preemption recomputes)
        s.done = n
        self.stats.inserted_prefills += 1
        if self._take(s, first):  # type: ignore[arg-type]  # a Prefilled sequence: its first token
            self.manager.release(rid)
            return 1
        self.slots.insert(rid)
        return 0

    def _decode(self) -> int:
        """One decode step over every slot; releases finished sequences. Returns how many finished."""
        meta = self.slots.decode_step()
        occupied = self.slots.occupied()
        tokens = np.zeros((self.slots.num_slots, 1), np.int32)
        for b, rid in occupied:
            tokens[b, 0] = self._by_id[rid].tokens[-1]
        made, t0 = self._programs.made, time.perf_counter()
        seqs = [self._by_id[rid] for _, rid in occupied]
        greedy = not self.record_logits and all(s.sampling.plain_greedy for s in seqs)
        logits = self._run(tokens, meta, greedy)
        self.slots.commit()
        if self._programs.made == made:  # a step that compiled or read back its program is no steady state
            self.stats.decode_seconds += time.perf_counter() - t0
            self.stats.decode_tokens += len(occupied)
        self.stats.decode_steps += 1
        done, rows = 0, [b for b, _ in occupied]
        picks: list[Pick]
        if greedy:  # the step returned each row's token
            picks = [(int(logits[b]), None, None) for b in rows]
        else:
            picks = self._sampler.pick(seqs, logits[rows, 0] if self.record_logits else logits[rows])
        for (b, rid), pick in zip(occupied, picks):
            s = self._by_id[rid]
            if self.record_logits:
                self._record(s, [len(s.tokens) - 1], logits[b])
            if self._take(s, *pick):
                self.slots.release(b)
                done += 1
        return done

    def _make_room(self, waiting: collections.deque[Seq]) -> None:
        """Preempt the newest sequences (decoding or prefilling) until every decoding one
        can grow by a token. The newest: the latest admission step; among sequences
        admitted in one step, the first listed (decoding ones by slot, then prefilling)."""
        def newest() -> Seq:
            running = [self._by_id[rid] for _, rid in self.slots.occupied()] + self._prefilling
            return self.policy.newest(running, admitted_at=lambda s: s.admitted_at)

        self.policy.make_room(lambda: not len(self.slots) or self.slots.can_decode(),
                              lambda: self._preempt(newest(), waiting))

    def _unblock(self, waiting: collections.deque[Seq]) -> None:
        """Nothing decodes and no prefilling sequence could grow: release the newest of
        them so the others can (it recomputes later)."""
        if self._prefilling:
            self._preempt(self.policy.newest(self._prefilling, admitted_at=lambda s: s.admitted_at), waiting)
        elif waiting:  # unreachable after _check_fits: an idle pool holds any request
            raise OutOfBlocksError(self.spec.blocks_for(len(waiting[0].tokens)), self.manager.num_free_blocks,
                                   f"request {waiting[0].request_id} with nothing running")

    def _preempt(self, s: Seq, waiting: collections.deque[Seq]) -> None:
        """Release ``s`` (recompute preemption) and put it at the head of the queue."""
        rid = s.request_id
        if self.manager.prefix_cache is not None:
            # Key the blocks it computed so its recomputation hits them if they survive
            # (a local group keys the blocks its row still holds: a hit needs only those).
            self.manager.cache_tokens(rid, s.tokens[: self.manager.kv_len(rid)])
        if rid in self.slots:
            self.slots.release(self.slots.slot_of(rid))
        else:
            self._prefilling.remove(s)
            self.manager.release(rid)
        s.done = 0
        self._completion(s).preemptions += 1
        self.stats.preemptions += 1
        waiting.appendleft(s)

    # ---- bookkeeping -----------------------------------------------------------------
    def _completion(self, s: Seq) -> Completion:
        if s.completion is None:
            s.completion = Completion(s.request_id, s.prompt, [], finish_reason="")
        return s.completion

    def _record(self, s: Seq, positions: Iterable[int], logits: np.ndarray) -> None:
        c = self._completion(s)
        for p, row in zip(positions, np.atleast_2d(logits)):
            if p in c.logits:
                c.recomputed.append((p, row.copy()))
            else:
                c.logits[p] = row.copy()

    def _take(self, s: Seq, token: int, logprob: float | None = None, top: list[tuple[int, float]] | None = None) -> bool:
        """Append ``token`` (with its logprobs if the request asked); True when the sequence is finished."""
        s.tokens.append(token)
        self.stats.generated_tokens += 1
        c = self._completion(s)
        c.tokens = s.tokens[len(s.prompt):]
        if c.first_token_seconds is None:
            c.first_token_seconds = time.perf_counter() - self._start
            if not self.stats.first_token_seconds:
                self.stats.first_token_seconds = c.first_token_seconds
        record_logprobs(c, s.sampling, logprob, top)
        if token in self.eos_token_ids:
            c.finish_reason = "eos"
        elif token in s.sampling.stop_token_ids:
            c.finish_reason, c.stop_reason = "stop", token
        elif s.stops is not None and (hit := s.stops.check(c.tokens)) is not None:
            c.finish_reason, (c.stop_reason, c.text) = "stop", hit
        elif s.generated >= s.max_new_tokens:
            c.finish_reason = "length"
        if c.finish_reason and c.text is None and self.detokenize is not None:
            c.text = self.detokenize(c.tokens)
        return bool(c.finish_reason)


def generate(cfg: LlamaConfig, params: Params, spec: CacheSpec, requests: Sequence[Request],
             **kw: Any) -> tuple[list[Completion], GenerationStats]:
    """``Generator(cfg, params, spec, **kw).generate(requests)``."""
    progress = kw.pop("progress", None)
    return Generator(cfg, params, spec, **kw).generate(requests, progress=progress)


__all__ = ["Completion", "GenerationError", "GenerationStats", "Generator", "Prefilled", "Request", "generate"]
