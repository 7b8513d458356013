import gc
import os
import sys
import tempfile

import pytest

# Tests run on the CPU; keep JAX from probing for accelerators it will not find.
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _add_xla_flag(flag: str) -> None:
    """Append ``--name=value`` to XLA_FLAGS unless the caller set ``name`` already."""
    flags = os.environ.get("XLA_FLAGS", "")
    if flag.split("=")[0] not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {flag}".strip()


def _cache_root() -> str | None:
    """~/.cache/paged_kv-tests (XDG_CACHE_HOME respected): kept between runs and shared by
    every clone on this machine, so CI's run (on the developers' machine, in a fresh
    clone) finds what earlier runs left. None when it cannot be created or written:
    everything below then works without it, as on a cold cache."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    root = os.path.join(base, "paged_kv-tests")
    try:
        os.makedirs(root, exist_ok=True)
        with tempfile.TemporaryFile(dir=root):
            pass
    except OSError:
        return None
    return root


CACHE_ROOT = _cache_root()

# Most of the suite's time is XLA compiling small test programs, not running them:
# the backend's optimization passes (LLVM) then dominate and buy nothing at these
# sizes. Level 0 halves the model tests' CPU time; results are the same programs'
# (the tests compare against numpy references with tolerances, never timings).
# Set in the environment, before anything imports jax, so that the subprocesses some
# tests start (tests/sharded_checks.py on 8 fake devices, the README's blocks, ...)
# compile alike. (`--xla_cpu_use_fusion_emitters=false` would halve compile time
# again, but XLA:CPU's older emitters canonicalize bfloat16 NaN payloads, which
# tests/test_isolation.py's sentinel check catches: not the programs users run.)
_add_xla_flag("--xla_backend_optimization_level=0")


def _compilation_cache_dir() -> str | None:
    """``JAX_COMPILATION_CACHE_DIR`` if the caller set it (empty: no cache), else
    CACHE_ROOT/jax."""
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return os.environ["JAX_COMPILATION_CACHE_DIR"] or None
    return os.path.join(CACHE_ROOT, "jax") if CACHE_ROOT else None


# A persistent compilation cache: a program compiled by an earlier run (or by an
# earlier test of this run: another Generator, another parametrization) is read back
# instead of compiled. Every compilation is kept, however quick (JAX's default keeps
# only those over 1 s, which at these sizes is almost none). A hit skips XLA only:
# jit still traces, so the tests that count compilations by counting traces (or
# jit's in-memory `_cache_size()`) count the same whether the cache is cold or warm.
# The key covers the program, XLA_FLAGS, the jax/jaxlib versions and the backend: a
# change anywhere misses and compiles. Pruned at the end of a run (`_prune_cache`).
CACHE_DIR = _compilation_cache_dir()
if CACHE_DIR:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = CACHE_DIR
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
    if "jax" in sys.modules:  # imported already (by a plugin): jax read the environment then
        import jax

        jax.config.update("jax_compilation_cache_dir", CACHE_DIR)
        jax.config.update("jax_persistent_cache_min_compile_time_secs",
                          float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
        jax.config.update("jax_persistent_cache_min_entry_size_bytes",
                          int(os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"]))

# Hypothesis (6.131 on) also draws, now and then, the integers, floats and strings it
# finds as literals in the project's own modules -- those loaded when it generates an
# input (`hypothesis.internal.conjecture.providers._get_local_constants`). So which of
# paged_kv's modules a run had imported changed the derandomized state machines'
# programs: tests/test_async_steps.py committed 453 steps alone and 263 after `import
# paged_kv.sim`, with the same seed. Importing every module here, before any test, gives
# every run the same pool. The benchmark modules that tests import (BENCHMARKS) are
# imported here too: otherwise their literals would join the pool midway, for the tests
# that happen to run after them on the same worker process.
BENCHMARKS = ("bench_generate", "figure_rows", "make_bench_model", "run_all")


def _import_all_of_paged_kv() -> None:
    import importlib
    import pkgutil

    import paged_kv

    for info in pkgutil.walk_packages(paged_kv.__path__, "paged_kv."):
        if info.name.endswith("__main__"):  # runs the command line
            continue
        try:
            importlib.import_module(info.name)
        except ImportError:  # an optional dependency (pyzmq, jinja2, matplotlib) not installed
            pass
    bench = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
    sys.path.insert(0, bench)
    try:
        for name in BENCHMARKS:
            importlib.import_module(name)
    finally:
        sys.path.remove(bench)


_import_all_of_paged_kv()

def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto` (pyproject's addopts): a worker per core this process may use, at most 4.
    Each worker holds its own jit caches (1-3 GB by the end of a run), and past 4 the
    files left for the last worker, not the core count, set the wall time."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 4))


# The run keeps millions of long-lived objects (jit caches, traced and lowered programs:
# ~3 GB by the end of the quick tier), and at CPython's default thresholds (700, 10, 10)
# each of ~50 full collections walks all of them: 13-15 s of a run's CPU, cold or warm.
# Collecting the youngest generation after 10,000 allocations and the older ones 20 times
# less often leaves 3-4 full collections (~4 s of collecting in all) and the same peak
# memory; cyclic garbage is still freed, a little later.
gc.set_threshold(10_000, 20, 20)

# The cache grows with every change to the library (a few MB per run that compiles
# anew); past CACHE_LIMIT the least recently used entries go, down to half of it.
CACHE_LIMIT = 1 << 30


def _prune_cache(path: str, limit: int) -> None:
    try:
        entries = [e for e in os.scandir(path) if e.name.endswith("-cache") and e.is_file()]
        stats = [(e.stat(), e.path) for e in entries]
    except OSError:
        return
    total = sum(st.st_size for st, _ in stats)
    if total <= limit:
        return
    for st, name in sorted(stats, key=lambda s: max(s[0].st_atime, s[0].st_mtime)):
        if total <= limit // 2:
            break
        try:
            os.remove(name)
        except OSError:
            continue
        total -= st.st_size


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if CACHE_ROOT and CACHE_DIR == os.path.join(CACHE_ROOT, "jax"):
        _prune_cache(CACHE_DIR, CACHE_LIMIT)


# Tests marked `slow`, by file and function (every parametrization): about two thirds
# of the suite's CPU time. Measured on 2 CPU cores shared with other work (load 4-6;
# CPU seconds are user + system of the one pytest process, which is what an idle
# machine's wall time would be), with `--durations=80`:
#   compilation cache   whole suite (load 5)   `-m "not slow"`
#   cold (first run)    430 s CPU (12.3 min)   155-168 s CPU (2.8 min at load 1-2; 5.2 at 4-6)
#   warm (a rerun)      237 s CPU (8.4 min)    83-85 s CPU (1.4 min at load 1-2; 3.7 at 5)
#   none                469 s CPU (14.9 min)
# Remeasured for issue 22 item 6 at one commit (1,082 quick tests; load 1-1.8), wall:
# `-m "not slow"` cold 261 -> 232 s, warm 145 -> 125 s; whole suite warm 296 -> 287 s.
# A cold cache costs no more than none. Kept in one list rather than as
# decorators so the selection and its reason sit in one place; a name that no longer
# matches a test is an error, so the list cannot go stale silently. Single
# parametrizations are marked where they are declared (`pytest.param(..., marks=
# pytest.mark.slow)`, with the quick cases that cover them): test_quant.py's WORLDS,
# test_generate.py's Llama random schedules.
SLOW = {
    "test_state_machine.py": ("test_host_state_machine", "test_device_state_machine", "test_prefix_state_machine"),
    "test_unified.py": ("test_unified_equals_split_bit_for_bit", "test_tiny_transformer_through_unified_cache"),
    "test_swap.py": ("test_swap_round_trip_is_bit_exact_and_decoding_continues",),
    "test_fork.py": ("test_decoding_after_fork_equals_recompute",),
    "test_transformer_model.py": ("test_decode_through_pages_equals_recompute", "test_mixed_prefill_and_decode_in_one_step",
                                  "test_gathered_view_path_equals_recompute", "test_chunked_layers_decode_equals_recompute"),
    "test_paged_attention.py": ("test_block_edges_mixed_and_chunked_prefill", "test_fork_copy_on_write_swap_and_reuse",
                                "test_chunked_layer_at_block_and_chunk_edges"),
    "test_device_roundtrip.py": ("test_random_writes_then_gather_equal_dense_model",),
    "test_slots.py": ("test_continuous_batching_equals_recompute_and_compiles_per_width_bucket",),
    # The simulator's baselines at equal memory and with sliding layers (2-2.5 s each):
    # the quick tier keeps the replay under memory pressure.
    "test_scheduler.py": ("test_swap_preemption_loses_nothing", "test_compare_at_equal_memory",
                          "test_sliding_layers_hold_fewer_blocks"),
    # Two processes each (2-3 s): the quick tier keeps the bit-for-bit transfer and the
    # refusals; a killed sender and an offer never pulled run in the full suite.
    "test_transfer.py": ("test_an_offer_never_pulled_and_pages_that_never_come_are_freed",
                         "test_a_sender_killed_mid_transfer_leaves_the_receiver_clean"),
    "test_isolation.py": ("test_reused_blocks_never_expose_previous_owner",),
    "test_quant.py": ("test_decode_equals_dense_reference_with_the_same_rounding",
                      "test_int8_scales_shard_with_their_heads_over_8_devices"),
    # These share one subprocess that compiles every step on 8 fake devices (23 s cold, 15 s warm).
    "test_sharding.py": ("test_sharded_pages_equal_single_device_bit_for_bit", "test_no_collective_touches_the_pages",
                         "test_two_data_parallel_replicas", "test_in_place_attention_on_sharded_pages"),
    # A slow jitted call held in flight while the batch moves on (~4 s): the copy at flattening.
    "test_steps.py": ("test_a_step_batch_step_in_flight_keeps_its_own_arrays",),
    # The simulator over tiers (~3 s); the quick tier keeps the tiers' own hits, restarts and refusals.
    "test_tiers.py": ("test_the_simulator_counts_hits_per_tier_and_bytes_moved",),
    # The tiers' state machines (8-10 s each at load 2-3): the quick tier keeps the tiers'
    # hits through both movement paths, the disk's refusals and the retention rules.
    "test_tiers_state_machine.py": ("test_tiers_state_machine",),
    "test_tiers_movement.py": ("test_tiers_state_machine_through_the_gather",),
    # A killed sender process mid-stream (~4 s); the quick tier keeps the ring's bit-for-bit
    # path, its refusals and forged rings.
    "test_transfer_shm.py": ("test_a_sender_killed_mid_stream_leaves_the_receiver_clean_and_no_file",),
    # The persistent compilation cache: a generate run writing a cache directory (~2 s).
    "test_generate_options.py": ("test_compiled_steps_are_kept_in_the_cache_dir_and_settings_restored",),
    # One strict mypy run over the package and a user script: 9-12 s of CPU with a cold mypy cache.
    "test_types.py": ("test_package_is_strict_clean", "test_user_script_errors_are_exactly_the_mistakes"),
}


@pytest.fixture(scope="session")
def bundled():
    """The bundled Azure conversation trace (paged_kv/data), loaded once per run and shared
    by every module: its arrays are read-only, so a test that wrote into them (and would
    change what the next test reads) fails at the write."""
    import attrs
    import numpy as np

    from paged_kv.sim import load_trace

    trace = load_trace()
    for field in attrs.fields(type(trace)):
        value = getattr(trace, field.name)
        if isinstance(value, np.ndarray):
            value.flags.writeable = False
    return trace


# Seconds of CPU per file on a cold compilation cache (one process, 2-core machine, at
# commit e4437e1), the files over ~8 s. The suite runs a file per worker
# (pyproject's addopts: `--dist loadfile --no-loadscope-reorder`), in the order of this
# list, heaviest first and the rest in collection order: the longest files start first
# and the short ones fill in behind, so no worker is left with a long file at the end
# while the other idles (that tail was ~1 of the 9 minutes of a cold run in file order).
# Only the order depends on these figures; a stale one costs balance, not correctness.
COST = {"test_model_families.py": 155, "test_state_machine.py": 98, "test_quant.py": 72, "test_unified.py": 46,
        "test_transformer_model.py": 40, "test_paged_attention.py": 39, "test_device_roundtrip.py": 38,
        "test_readme.py": 28, "test_sharding.py": 26, "test_distributed.py": 24, "test_generate.py": 23,
        "test_model_programs.py": 21, "test_types.py": 20, "test_swap.py": 19, "test_slots.py": 18,
        "test_sampling.py": 15, "test_scheduler.py": 14, "test_transfer.py": 13, "test_prefix_isolation.py": 13,
        "test_transfer_disaggregated.py": 11, "test_transfer_shm.py": 10, "test_tiers_movement.py": 9,
        "test_checkpoint.py": 9, "test_hf_equality.py": 9}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: -COST.get(item.path.name, 0))  # stable: each file's own order kept
    modules = {}
    for item in items:
        names = SLOW.get(item.path.name, ())
        if not names:
            continue
        modules[item.path.name] = item.module
        function = item.originalname if isinstance(item, pytest.Function) else item.name
        if function in names:
            item.add_marker(pytest.mark.slow)
    stale = [f"{file}::{name}" for file, module in modules.items() for name in SLOW[file]
             if not hasattr(module, name)]
    if stale:
        raise pytest.UsageError(f"tests/conftest.py SLOW names tests that do not exist: {stale}")
