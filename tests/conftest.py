import os

import pytest

# Tests run on the CPU; keep JAX from probing for accelerators it will not find.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Most of the suite's time is XLA compiling small test programs, not running them:
# the backend's optimization passes (LLVM) then dominate and buy nothing at these
# sizes. Level 0 halves the model tests' CPU time; results are the same programs'
# (the tests compare against numpy references with tolerances, never timings).
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

# Tests marked `slow`, by file and function (every parametrization): together about
# nine tenths of the suite's time. Measured with `python -m pytest --durations=60` on
# 2 shared CPU cores: the whole suite took 462 s of CPU (15 to 19 min of wall time),
# these ~85 % of it; `-m "not slow"` runs the rest in 64 s of CPU (93 s of wall time). Kept in one list rather than as decorators so
# the selection and its reason sit in one place; a name that no longer matches a
# test is an error, so the list cannot go stale silently.
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
    "test_scheduler.py": ("test_swap_preemption_loses_nothing",),
    "test_isolation.py": ("test_reused_blocks_never_expose_previous_owner",),
    "test_quant.py": ("test_decode_equals_dense_reference_with_the_same_rounding",
                      "test_int8_scales_shard_with_their_heads_over_8_devices"),
    # These share one subprocess that compiles every step on 8 fake devices (~70 s).
    "test_sharding.py": ("test_sharded_pages_equal_single_device_bit_for_bit", "test_no_collective_touches_the_pages",
                         "test_two_data_parallel_replicas", "test_in_place_attention_on_sharded_pages"),
}


@pytest.fixture(scope="module")
def bundled():
    """The bundled Azure conversation trace (paged_kv/data), loaded once per test module."""
    from paged_kv.sim import load_trace

    return load_trace()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
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
