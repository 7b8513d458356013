"""The byte copies of a host move shared with worker threads (`paged_kv.tiers.copies`,
`CacheTiers(copy_threads=...)`): the same bytes as one thread, split runs included, the
pool still donated in place afterwards (no worker keeps a view of it), and a bad
setting refused."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import paged_kv as pk
import test_tiers
from paged_kv.errors import InvalidArgumentError
from paged_kv.tiers import CacheTiers, copies
from paged_kv.tiers.host import row_runs
from tiers_harness import Server, make_spec


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_copies_split_and_shared_equal_a_fancy_index(threads, monkeypatch):
    monkeypatch.setattr(copies, "CHUNK_BYTES", 3 * 24)  # runs of more than 3 rows split
    rng = np.random.default_rng(threads)
    for _ in range(50):
        n, rows = int(rng.integers(1, 20)), 40
        src_rows = np.arange(n)[::-1] + 20 if rng.integers(0, 2) else rng.permutation(rows)[:n]
        dst_rows = np.arange(n) + int(rng.integers(0, 20))
        a = rng.integers(0, 1000, (rows, 3))
        got, want = np.zeros((rows, 3), a.dtype), np.zeros((rows, 3), a.dtype)
        want[dst_rows] = a[src_rows]
        copies.copy_all([(got, a, run) for run in row_runs(dst_rows, src_rows)], threads)
        assert np.array_equal(got, want)


def test_a_copy_error_is_raised_by_the_caller():
    with pytest.raises(ValueError):
        copies.copy_all([(np.zeros((4, 2)), np.zeros((4, 3)), (0, 0, 2, 1))] * 3, 2)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2", 65])
def test_a_bad_thread_count_is_refused(bad):
    m = pk.KVCacheManager(make_spec(), prefix_cache=True)
    with pytest.raises(InvalidArgumentError, match="copy_threads"):
        CacheTiers(m, host_bytes=10**7, copy_threads=bad)
    assert m.tiers is None


def test_moves_with_worker_threads_keep_the_bits_and_the_pool_in_place():
    """Down and up with two copying threads: the hit reads what a recompute writes, the
    host slots hold what one thread stores, and a step still donates the pool in place
    (no view of it left in a worker)."""
    stored, spec = [], make_spec()

    @partial(jax.jit, donate_argnums=0)
    def step(cache):
        return cache

    def donated_in_place(s: Server) -> bool:
        before = [a.unsafe_buffer_pointer() for a in jax.tree_util.tree_leaves(s.cache)]
        s.cache = step(s.cache)
        return [a.unsafe_buffer_pointer() for a in jax.tree_util.tree_leaves(s.cache)] == before

    for threads in (1, 2):
        s = Server(spec, host_bytes=10**7, copy_threads=threads)
        s.serve(1, test_tiers.A)
        s.finish(1)
        test_tiers.evict_all(s)  # its last flush copied blocks down
        assert s.tiers.in_flight is None and donated_in_place(s)
        host = s.tiers.host[0]
        stored.append({k: [[a.copy() for a in layer] for layer in host.read(k)] for k in sorted(host.ready)})
        assert s.manager.admit_prompt(2, test_tiers.B) == 12 and s.tiers.uploads
        s.flush()  # the uploads, in place
        assert donated_in_place(s)
        s.tokens[2] = np.asarray(test_tiers.B, np.int64)
        s.write(2, 12, len(test_tiers.B))
        s.check()
        assert test_tiers.same_bits(s.read(2), test_tiers.recompute(spec, "split", test_tiers.B))
    assert copies.workers_started() >= 1
    assert stored[0].keys() == stored[1].keys() and stored[0]
    for k in stored[0]:
        assert all(np.array_equal(x, y) for la, lb in zip(stored[0][k], stored[1][k]) for x, y in zip(la, lb))


def test_pointer_views_show_the_buffer_and_hold_no_reference():
    """`host_pool.pointer_view`: the array's bytes in its shape, kept per address (a
    donated pool keeps its buffers), and no reference that a donation sees: a program
    that updates the array in place, donated, reuses its buffer with the view alive --
    where a numpy view (``np.asarray``) makes the donation copy."""
    from paged_kv.host_pool import pointer_view

    bump = jax.jit(lambda a: a.at[0, 0, 0].add(1), donate_argnums=0)
    # The array is a program's output, as a pool is: `jax.device_put` of a numpy array
    # may borrow numpy's buffer (when it happens to be aligned), and a borrowed buffer is
    # never reused by a donation, view or no view (the test failed 2 runs in 25 so).
    make = jax.jit(lambda: jnp.arange(24, dtype=jnp.int32).reshape(2, 3, 4))

    def donate(hold):
        x = make()
        held = hold(x)
        before = x.unsafe_buffer_pointer()
        y = bump(x)
        return y.unsafe_buffer_pointer() == before, held, y

    reused, view, y = donate(lambda x: pointer_view(x, (2, 3, 4), np.dtype(np.int32)))
    assert reused, "a live pointer view made the donation copy the buffer"
    assert view.flags.writeable and view[0, 0, 0] == 1  # the update, seen through the view
    assert pointer_view(y, (2, 3, 4), np.dtype(np.int32)) is view
    assert np.array_equal(view, np.asarray(y))
    reused, _, _ = donate(np.asarray)
    assert not reused, "a numpy view no longer makes a donation copy: pointer_view's reason is gone"
