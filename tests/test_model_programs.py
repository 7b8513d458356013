"""Compiled steps kept on disk (`paged_kv.models.programs`, the Generator's
``program_cache``): a second generator reads them back instead of tracing and gives the
same tokens and logits; a damaged, foreign or stale file is never run (compiled afresh
and overwritten); the paged cache is zeroed by one program. Counts, never timings."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paged_kv.cache import PagedKVCache
from paged_kv.models import llama, programs
from paged_kv.models.generate import GenerationError, Generator, Request
from paged_kv.models.loader import load_model
from paged_kv.spec import CacheSpec

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "hf"
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
REQUESTS = [([5, 6, 7, 8, 9], 4), ([11, 12, 13], 3)]


@pytest.fixture(scope="module")
def model():
    return load_model(FIXTURES / "llama")


def run(model, directory, **kw):
    cfg, params = model
    spec = llama.cache_spec(cfg, num_blocks=20, block_size=4, max_seq_len=24, max_batch_slots=2)
    gen = Generator(cfg, params, spec, compiler_options=FAST_COMPILE, program_cache=directory, **kw)
    completions, stats = gen.generate([Request(p, n) for p, n in REQUESTS])
    return completions, stats


def stored(directory: pathlib.Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.bin"))}


def test_a_second_generator_reads_the_steps_back_and_matches(model, tmp_path):
    first, stats1 = run(model, tmp_path, record_logits=True)
    assert stats1.compilations >= 2 and stats1.loaded_programs == 0  # prefill and decode shapes
    files = stored(tmp_path)
    assert len(files) == stats1.compilations and all(n.startswith("step") for n in files)
    second, stats2 = run(model, tmp_path, record_logits=True)
    assert stats2.compilations == 0 and stats2.loaded_programs == stats1.compilations
    assert "read back" in stats2.summary()
    for a, b in zip(first, second):
        assert a.tokens == b.tokens
        assert sorted(a.logits) == sorted(b.logits)
        for p in a.logits:
            np.testing.assert_array_equal(a.logits[p], b.logits[p])  # the same executable: bit for bit
    plain, stats3 = run(model, None, record_logits=True)  # nothing kept: traced and compiled as ever
    assert stats3.loaded_programs == 0 and [c.tokens for c in plain] == [c.tokens for c in first]


def test_greedy_steps_are_kept_apart_from_logit_steps(model, tmp_path):
    run(model, tmp_path)
    names = stored(tmp_path)
    assert any(n.startswith("step_greedy-") for n in names)
    _, stats = run(model, tmp_path, record_logits=True)  # another program (all logits): nothing read back
    assert stats.loaded_programs == 0 and stats.compilations >= 2


# One kind of damage in the quick tier (each compiles the steps twice, ~3 s); all in the full suite.
@pytest.mark.parametrize("damage", ["flip", *(pytest.param(d, marks=pytest.mark.slow) for d in ("truncate", "format", "empty"))])
def test_a_damaged_file_is_compiled_afresh_and_rewritten(model, tmp_path, caplog, damage):
    want, _ = run(model, tmp_path)
    files = stored(tmp_path)
    for name, data in files.items():
        damaged = {"truncate": data[: len(data) // 2], "flip": data[:-100] + bytes([data[-100] ^ 1]) + data[-99:],
                   "format": b"x" + data[1:], "empty": b""}[damage]
        (tmp_path / name).write_bytes(damaged)
    with caplog.at_level(logging.WARNING, logger="paged_kv.models.programs"):
        got, stats = run(model, tmp_path)
    assert stats.loaded_programs == 0 and stats.compilations == len(files)
    assert [c.tokens for c in got] == [c.tokens for c in want]
    assert sum("cannot be used" in r.message for r in caplog.records) == len(files)
    assert stored(tmp_path) .keys() == files.keys()
    _, again = run(model, tmp_path)  # rewritten whole: read back next time
    assert again.loaded_programs == len(files) and again.compilations == 0


def test_another_programs_file_under_this_name_is_not_run(model, tmp_path):
    """A file whose key (inside it) is not this program's: a hash collision, a copied file."""
    want, _ = run(model, tmp_path)
    files = stored(tmp_path)
    names = sorted(files)
    for name, other in zip(names, names[1:] + names[:1]):  # each file holds another's contents
        (tmp_path / name).write_bytes(files[other])
    got, stats = run(model, tmp_path)
    assert stats.loaded_programs == 0 and [c.tokens for c in got] == [c.tokens for c in want]


def test_a_stale_program_is_not_found(model, tmp_path, monkeypatch):
    """The key covers the package's source (and versions, backend, config, spec...):
    after an edit the old files are not read."""
    run(model, tmp_path)
    before = set(stored(tmp_path))
    monkeypatch.setattr(programs, "_source_digest", lambda: "edited")
    _, stats = run(model, tmp_path)
    assert stats.loaded_programs == 0 and stats.compilations >= 2
    assert len(set(stored(tmp_path)) - before) == stats.compilations  # new names beside the old
    monkeypatch.undo()
    cfg, params = model
    other = llama.cache_spec(cfg, num_blocks=21, block_size=4, max_seq_len=24, max_batch_slots=2)
    gen = Generator(cfg, params, other, compiler_options=FAST_COMPILE, program_cache=tmp_path)
    assert gen.generate([Request(p, n) for p, n in REQUESTS])[1].loaded_programs == 0  # another pool


def test_a_checksummed_program_for_other_arrays_is_refused(tmp_path):
    """Defence in depth: a well-formed file under the right key whose executable takes
    other shapes is refused before it runs (`_check_arguments`)."""
    def double(x):
        return x * 2

    small = programs.Programs(double, "double", "x*2", lambda args: jax.tree_util.tree_structure(0),
                              directory=tmp_path)
    small(jnp.ones(3))
    (written,) = tmp_path.glob("*.bin")
    payload = programs._unpack(written.read_bytes(), small._key(*jax.tree_util.tree_flatten((jnp.ones(3),))))
    big = programs.Programs(double, "double", "x*2", lambda args: jax.tree_util.tree_structure(0),
                            directory=tmp_path)
    x = jnp.arange(4.0)
    key = big._key(*jax.tree_util.tree_flatten((x,)))
    target = tmp_path / f"double-{programs.hashlib.sha256(key.encode()).hexdigest()}.bin"
    target.write_bytes(programs._pack(payload, key))
    np.testing.assert_array_equal(big(x), [0.0, 2.0, 4.0, 6.0])
    assert (big.loaded, big.compiled) == (0, 1)
    again = programs.Programs(double, "double", "x*2", lambda args: jax.tree_util.tree_structure(0),
                              directory=tmp_path)
    np.testing.assert_array_equal(again(x), [0.0, 2.0, 4.0, 6.0])  # the rewritten file: read back
    assert (again.loaded, again.compiled) == (1, 0)


CHILD = """
import json, pathlib, sys
import jax, jax.numpy as jnp, numpy as np
from paged_kv.models import programs

def f(x, i):
    return jnp.take(x, i, axis=0) * 2 + x.sum()

x, i = jnp.arange(12.0).reshape(4, 3), jnp.array([2, 0])
if sys.argv[1] == "jit":
    out, loaded = jax.jit(f)(x, i), None
else:
    p = programs.Programs(f, "f", "f", lambda args: jax.tree_util.tree_structure(0), directory=pathlib.Path(sys.argv[1]))
    out, loaded = p(x, i), p.loaded
print(json.dumps({"loaded": loaded, "out": np.asarray(out).tolist()}))
"""


def test_a_program_in_jaxs_cache_is_stored_runnable(tmp_path):
    """JAX's persistent cache hands back deserialized executables, which XLA:CPU cannot
    serialize again (the copy, read back by another process, failed when run: "Function
    ... not found"): a program to be stored is compiled by XLA itself. Three processes:
    one fills JAX's cache, one stores the program, one reads it back and runs it."""
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
    answers = []
    for mode in ("jit", str(tmp_path / "p"), str(tmp_path / "p")):
        done = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stderr[-2000:]
        answers.append(json.loads(done.stdout.strip().splitlines()[-1]))
        if mode == "jit":
            assert any(n.startswith("jit_f-") for n in os.listdir(tmp_path / "jax"))
    assert [a["loaded"] for a in answers] == [None, 0, 1]
    assert answers[0]["out"] == answers[1]["out"] == answers[2]["out"]


def test_programs_switch_between_signatures_and_refuse_changed_fixed_arguments():
    """Each signature is looked up (and compiled once), and a fixed argument that changed
    is refused before anything runs (its donated buffer intact)."""
    def step(w, state, x):
        return (state * w).sum() + x.sum(), state + 1

    p = programs.Programs(step, "step", "t", lambda args: jax.tree_util.tree_structure((0, 0)), donate_argnums=(1,),
                          fixed=2)
    w, state = jnp.ones(3), jnp.zeros(3)
    for n in (2, 5, 2, 5, 5, 2):
        out, state = p(w, state, jnp.ones(n))
        assert float(out) == n + 3 * float(state[0] - 1)
    assert (p.compiled, p.loaded) == (2, 0)
    kept = jnp.zeros(3)
    with pytest.raises(Exception):
        p(jnp.ones(4), kept, jnp.ones(2))  # the weights changed shape: refused by every program
    assert not kept.is_deleted() and p.compiled == 2


class _Counted:
    """A pytree node that counts its flattens and can refuse them (as a stale step's
    metadata does at the device boundary)."""

    flattens = 0
    refuse = False

    def __init__(self, x):
        self.x = x


def _flatten_counted(node):
    _Counted.flattens += 1
    if _Counted.refuse:
        raise ValueError("refused while flattened")
    return (node.x,), None


jax.tree_util.register_pytree_node(_Counted, _flatten_counted, lambda _, children: _Counted(*children))


def test_dispatch_flattens_the_same_for_every_call_and_raises_a_flatten_error_once(monkeypatch):
    """Alternating signatures costs no exception and no extra flatten; an error raised
    while the arguments are flattened is raised once, before anything runs."""
    def step(w, state, node):
        return (state * w).sum() + node.x.sum(), state + 1

    p = programs.Programs(step, "step", "t", lambda args: jax.tree_util.tree_structure((0, 0)), donate_argnums=(1,),
                          fixed=2)
    w, state = jnp.ones(3), jnp.zeros(3)
    for n in (2, 5):  # compile both
        _, state = p(w, state, _Counted(jnp.ones(n)))
    counts = []
    for n in (2, 5, 2, 2, 5):
        before = _Counted.flattens
        out, state = p(w, state, _Counted(jnp.ones(n)))
        counts.append(_Counted.flattens - before)
        assert float(out) == n + 3 * float(state[0] - 1)
    assert len(set(counts)) == 1 and p.compiled == 2
    monkeypatch.setattr(_Counted, "refuse", True)
    before = _Counted.flattens
    with pytest.raises(ValueError, match="refused while flattened"):
        p(w, state, _Counted(jnp.ones(2)))
    assert _Counted.flattens - before == 1 and not state.is_deleted()


def test_an_unwritable_directory_only_costs_compilations(model, tmp_path, caplog):
    (tmp_path / "file").write_text("x")
    with caplog.at_level(logging.WARNING, logger="paged_kv.models.programs"):
        got, stats = run(model, tmp_path / "file" / "d")
    assert stats.compilations >= 2 and len(got[0].tokens) == 4
    assert any("not stored" in r.message for r in caplog.records)


@pytest.mark.parametrize("bad", [3, b"dir", ["d"]])
def test_program_cache_must_be_a_path(model, bad):
    cfg, params = model
    spec = llama.cache_spec(cfg, num_blocks=20, block_size=4, max_seq_len=24, max_batch_slots=2)
    with pytest.raises(GenerationError, match="program_cache"):
        Generator(cfg, params, spec, program_cache=bad)


def test_the_cache_is_zeroed_by_one_program():
    """`PagedKVCache.init` on the default device lowers one program (it lowered four,
    a fill and a broadcast per dtype, each read from the compilation cache one by one
    before a process's first step), and a second init of the spec none."""
    lowered: list[str] = []

    def listen(event: str, duration: float, **kw) -> None:
        if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
            lowered.append(event)

    spec = CacheSpec(num_layers=3, num_blocks=13, block_size=4, max_blocks_per_seq=3, max_batch_slots=2,
                     num_kv_heads=2, head_dim=8, dtype="bfloat16", sliding_window=8, sliding_layers=(1,))
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        cache = PagedKVCache.init(spec)
        first = len(lowered)
        again = PagedKVCache.init(spec)
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert first == 1 and len(lowered) == 1
    for c in (cache, again):
        assert [type(v).__name__ for v in c.views] == ["TransformerCacheView", "SlidingWindowCacheView",
                                                       "TransformerCacheView"]
        leaves = jax.tree_util.tree_leaves(c)
        assert leaves and all(not np.asarray(x).any() for x in leaves)
    assert c.spec == spec
    unified = PagedKVCache.init(spec, layout="unified")
    assert {type(v).__name__ for v in unified.views} == {"UnifiedCacheView"}
    on = PagedKVCache.init(spec, device=jax.devices()[0])  # an explicit device: built as before, equal
    assert jax.tree_util.tree_structure(on) == jax.tree_util.tree_structure(cache)
