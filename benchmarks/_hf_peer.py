"""The transformers side of `bench_generate.py`, run in the interpreter that has torch and
transformers (benchmark-only dependencies; benchmarks/PEERS.md): reads one JSON job on
stdin, prints one JSON line of greedy tokens and timings on stdout.

The job: ``{"checkpoint": DIR, "new_tokens": N, "warmup_new_tokens": W, "modes":
["continuous", "continuous_manager", "padded"], "threads": T, "runs": [{"batch": B, "warmup": [prompt, ...],
"timed": [[prompt, ...], ...]}]}`` (prompts are lists of token ids; T: torch's threads, 0
its default, -1 the faster of its default and 1 per run, see `pick_threads`).
For each run and mode the warm-up prompts are served once (W new tokens each), untimed,
then each timed set once (N new tokens each); the answer has, per run and mode, the seconds
of each timed set and every request's generated tokens.

- ``continuous``: `model.generate_batch` (transformers' continuous batching over its
  paged cache) with ``max_requests_per_batch=B``, a call per set; its manager persists
  between calls (``persistent_manager``), built and warmed up by the warm-up set.
- ``continuous_manager``: the same continuous batching through one running manager
  (`continuous_batching_context_manager`, `add_requests`, `get_result`), as a server
  drives it: no thread start and stop per set.
- ``padded``: `model.generate` on the prompts ``B`` at a time, left-padded with an
  attention mask.

Greedy (``do_sample=False``), float32, no end-of-sequence token: every request
generates exactly N tokens, as paged_kv's `Generator` does with no ``eos_token_ids``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings


def _generation_config(new_tokens: int):
    from transformers import GenerationConfig

    return GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0,
                            bos_token_id=None)


def _cb_config(run: dict, new_tokens: int):
    from transformers import ContinuousBatchingConfig

    batch = run["batch"]
    longest = max(len(p) for group in [run["warmup"], *run["timed"]] for p in group) + new_tokens
    page = 256  # transformers' default page size
    return ContinuousBatchingConfig(
        page_size=page, num_blocks=batch * -(-longest // page) + 1, max_requests_per_batch=batch,
        max_batch_tokens=max(batch * longest // 2, longest), allow_block_sharing=True,
        use_async_batching=False, use_cuda_graph=False)


def _cb_answer(model, cb, timed) -> dict:
    return {"seconds": [s for s, _ in timed], "tokens": [t for _, t in timed],
            "attn_implementation": model.config._attn_implementation,
            "config": {"page_size": cb.page_size, "num_blocks": cb.num_blocks,
                       "max_requests_per_batch": cb.max_requests_per_batch, "max_batch_tokens": cb.max_batch_tokens}}


def continuous(model, run: dict, new_tokens: int, warmup_new_tokens: int) -> dict:
    """`generate_batch` per set, its manager kept between calls (``persistent_manager``)."""
    cb = _cb_config(run, new_tokens)

    def serve(prompts, new=new_tokens):
        t0 = time.perf_counter()
        out = model.generate_batch(prompts, generation_config=_generation_config(new), continuous_batching_config=cb,
                                   persistent_manager=True, max_new_tokens=new)
        seconds = time.perf_counter() - t0
        results = list(out.values())
        errors = [r.error for r in results if r.error is not None]
        if len(results) != len(prompts) or errors:
            raise RuntimeError(f"generate_batch returned {len(results)} of {len(prompts)} results; errors: {errors[:2]}")
        return seconds, [list(map(int, r.generated_tokens)) for r in results]

    try:
        serve(run["warmup"], warmup_new_tokens)
        timed = [serve(prompts) for prompts in run["timed"]]
    finally:
        model.destroy_cached_continuous_batching_manager()
    return _cb_answer(model, cb, timed)


def continuous_manager(model, run: dict, new_tokens: int, warmup_new_tokens: int) -> dict:
    """One running manager for the run (as a server keeps one): each set is added with
    `add_requests` and timed until its last result; no start or stop per set."""
    cb = _cb_config(run, new_tokens)

    def serve(manager, prompts, new=new_tokens):
        t0 = time.perf_counter()
        ids = manager.add_requests(inputs=prompts, max_new_tokens=new)
        results: dict = {}
        while len(results) < len(ids):
            r = manager.get_result(timeout=1)
            if r is not None and r.is_finished():
                results[r.request_id] = r
            elif r is None and not manager.is_running():
                raise RuntimeError("the continuous batching manager stopped")
        seconds = time.perf_counter() - t0
        errors = [r.error for r in results.values() if r.error is not None]
        if errors:
            raise RuntimeError(f"requests failed: {errors[:2]}")
        return seconds, [list(map(int, results[i].generated_tokens)) for i in ids]

    with model.continuous_batching_context_manager(generation_config=_generation_config(new_tokens),
                                                   continuous_batching_config=cb) as manager:
        serve(manager, run["warmup"], warmup_new_tokens)
        timed = [serve(manager, prompts) for prompts in run["timed"]]
    return _cb_answer(model, cb, timed)


def padded_serve(model, prompts: list[list[int]], batch: int, new: int) -> tuple[float, list[list[int]]]:
    """`generate` on ``prompts``, ``batch`` at a time, left-padded: (seconds, tokens per prompt)."""
    import torch

    gen, tokens = _generation_config(new), []
    t0 = time.perf_counter()
    for i in range(0, len(prompts), batch):
        group = prompts[i: i + batch]
        width = max(len(p) for p in group)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in group])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group])
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen)
        tokens += out[:, width:].tolist()
    return time.perf_counter() - t0, tokens


def padded(model, run: dict, new_tokens: int, warmup_new_tokens: int) -> dict:
    padded_serve(model, run["warmup"], run["batch"], warmup_new_tokens)
    timed = [padded_serve(model, prompts, run["batch"], new_tokens) for prompts in run["timed"]]
    return {"seconds": [s for s, _ in timed], "tokens": [t for _, t in timed],
            "attn_implementation": model.config._attn_implementation}


def pick_threads(model, run: dict, new: int) -> dict:
    """torch's thread count for this run: the faster of its default and 1 on the warm-up
    prompts (padded `generate`, twice each, the better time counts). On a shared machine
    whose cores are busy, torch's default (every core) can be several times slower than
    one thread: this gives transformers its better setting."""
    import torch

    default = torch.get_num_threads()
    times: dict[int, float] = {}
    for n in (default, 1, default, 1) if default > 1 else (default,):
        torch.set_num_threads(n)
        times[n] = min(times.get(n, float("inf")), padded_serve(model, run["warmup"], run["batch"], new)[0])
    best = min(times, key=times.get)
    torch.set_num_threads(best)
    return {"threads": best, "probe_s": {str(k): round(v, 3) for k, v in times.items()}}


MODES = {"continuous": continuous, "continuous_manager": continuous_manager, "padded": padded}


def main() -> None:
    job = json.loads(sys.stdin.read())
    t0 = time.perf_counter()
    import torch
    import transformers
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    logging.getLogger("ContinuousBatchingLogger").setLevel(logging.ERROR)
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore")
    threads = int(job.get("threads") or 0)
    if threads > 0:
        torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(job["checkpoint"], dtype=torch.float32).eval()
    out = {"versions": {"torch": torch.__version__, "transformers": transformers.__version__},
           "torch_threads": torch.get_num_threads(), "load_s": round(time.perf_counter() - t0, 2),
           "python": sys.executable, "pid": os.getpid(), "runs": []}
    for run in job["runs"]:
        row = {"batch": run["batch"]}
        if threads < 0:
            row["torch_threads"] = pick_threads(model, run, job.get("warmup_new_tokens", job["new_tokens"]))
        for mode in job["modes"]:
            try:
                row[mode] = MODES[mode](model, run, job["new_tokens"], job.get("warmup_new_tokens", job["new_tokens"]))
            except Exception as exc:  # reported, not hidden: the benchmark prints it beside the figures
                row[mode] = {"error": f"{type(exc).__name__}: {exc}"[:400]}
        out["runs"].append(row)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
