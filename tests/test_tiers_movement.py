"""How blocks move (`paged_kv.tiers.movement`): a pool in host memory that its steps
have written is copied down in place, once, straight into the host slots; elsewhere
(or with ``host_reads`` off) a jitted gather snapshots it and the copy lands later.
Both give the same bits, refuse what a step overtook, and the in-place reads leave no
view of the pool behind (a later step still donates it in place)."""

from __future__ import annotations

from functools import partial

import jax
import numpy as np
import pytest

import test_tiers
from paged_kv.errors import TierError
from paged_kv.tiers import movement
from paged_kv.tiers.host import copy_rows, row_runs
from tiers_harness import Server, make_spec

A = test_tiers.A


@pytest.fixture
def gather_only(monkeypatch):
    monkeypatch.setattr(movement, "host_reads", False)


@pytest.mark.parametrize("kind,groups,medium", test_tiers.CASES, ids=["-".join(c) for c in test_tiers.CASES])
def test_hits_through_the_gather_equal_recompute(kind, groups, medium, tmp_path, gather_only):
    test_tiers.test_hits_from_tiers_equal_recompute(kind, groups, medium, tmp_path)


def test_a_copy_down_overtaken_by_a_step_is_refused_through_the_gather(gather_only):
    test_tiers.test_a_copy_down_overtaken_by_a_step_is_refused()


def _evicted(monkeypatch, direct: bool) -> Server:
    """A server that served ``A`` and evicted its blocks to the host tier, the pool read
    in place (``direct``) or through the jitted gather."""
    monkeypatch.setattr(movement, "host_reads", direct)
    s = Server(make_spec(), host_bytes=10**7)
    s.serve(1, A)
    s.finish(1)
    test_tiers.evict_all(s)
    return s


def test_both_paths_store_the_same_bytes(monkeypatch):
    """The host slots hold the same bytes whichever way the blocks came down."""
    stored = []
    for direct in (True, False):
        s = _evicted(monkeypatch, direct)
        s.check()
        host = s.tiers.host[0]
        keys = sorted(host.ready)
        assert keys
        stored.append({k: [[a.copy() for a in layer] for layer in host.read(k)] for k in keys})
    assert stored[0].keys() == stored[1].keys()
    for k in stored[0]:
        for la, lb in zip(stored[0][k], stored[1][k]):
            assert all(np.array_equal(x, y) for x, y in zip(la, lb))


def test_in_place_reads_leave_no_view_of_the_pool():
    """After a flush that read the pool in place, a step donating it still reuses its
    memory: no numpy view of it is left alive (one would make XLA copy the pool)."""
    s = Server(make_spec(), host_bytes=10**7)
    s.serve(1, A)
    s.finish(1)
    test_tiers.evict_all(s)
    assert s.tiers.stats.blocks_down and s.tiers.in_flight is None  # landed by the direct path
    leaf = jax.tree_util.tree_leaves(s.cache.views[0].pages())[0]
    before = leaf.unsafe_buffer_pointer()

    @partial(jax.jit, donate_argnums=0)
    def step(cache):
        return cache

    s.cache = step(s.cache)
    assert jax.tree_util.tree_leaves(s.cache.views[0].pages())[0].unsafe_buffer_pointer() == before


@pytest.mark.parametrize("seed", range(4))
def test_row_runs_copy_like_a_fancy_index(seed):
    rng = np.random.default_rng(seed)
    for _ in range(200):
        n, rows = int(rng.integers(1, 20)), 40
        kind = rng.integers(0, 4)
        if kind == 0:
            src = rng.permutation(rows)[:n]
        elif kind == 1:
            src = np.arange(n)[::-1] + rng.integers(0, 20)
        elif kind == 2:
            src = np.r_[np.arange(n // 2) + 25, np.arange(n - n // 2)[::-1]]
        else:
            src = np.arange(n) + rng.integers(0, 20)
        dst = rng.permutation(rows)[:n] if rng.integers(0, 2) else np.arange(n) + rng.integers(0, 20)
        a = rng.integers(0, 1000, (rows, 3))
        got, want = np.zeros((rows, 3), a.dtype), np.zeros((rows, 3), a.dtype)
        want[dst] = a[src]
        copy_rows(got, a, row_runs(dst, src))
        assert np.array_equal(got, want)


@pytest.mark.parametrize("direct", [True, False], ids=["in-place", "gather"])
def test_pages_of_another_manager_are_not_written(direct, monkeypatch):
    """Moves flushed into a cache that another manager's steps wrote: nothing lands in
    its pages (uploads dropped, copies down refused), whichever way they run."""
    monkeypatch.setattr(movement, "host_reads", direct)
    spec = make_spec()
    s = Server(spec, host_bytes=10**7)
    s.serve(1, A)
    s.finish(1)
    test_tiers.evict_all(s)
    other = Server(spec)
    other.serve(1, np.arange(13) + 7000)
    before = [np.asarray(a).copy() for a in jax.tree_util.tree_leaves(other.cache)]
    assert s.manager.admit_prompt(2, test_tiers.B) == 12 and s.tiers.uploads  # hits below: uploads pending
    refused = s.tiers.stats.refused
    s.manager.admit_prompt(3, np.arange(24) + 9000)  # evicts keyed blocks: copies down pending
    assert s.tiers.downloads
    other.cache = movement.flush(other.cache, s.tiers, wait=True)
    after = [np.asarray(a) for a in jax.tree_util.tree_leaves(other.cache)]
    assert all(np.array_equal(x, y) for x, y in zip(before, after))
    assert s.tiers.stats.refused > refused


def test_in_place_uploads_keep_the_pool_in_place():
    """Uploads written in place, then their generations stamped: the pool's buffers are
    the same before and after (no copy of the pool)."""
    s = Server(make_spec(), host_bytes=10**7)
    s.serve(1, A)
    s.finish(1)
    test_tiers.evict_all(s)
    before = [a.unsafe_buffer_pointer() for a in jax.tree_util.tree_leaves(s.cache.views[0].pages())]
    assert s.manager.admit_prompt(2, test_tiers.B) == 12 and s.tiers.uploads
    s.flush()
    assert [a.unsafe_buffer_pointer() for a in jax.tree_util.tree_leaves(s.cache.views[0].pages())] == before


def test_tiers_state_machine_through_the_gather(gather_only):
    """The random programs of `test_tiers_state_machine` with every move jitted."""
    import test_tiers_state_machine

    test_tiers_state_machine.test_tiers_state_machine()


@pytest.mark.parametrize("direct", [True, False], ids=["in-place", "gather"])
def test_a_page_of_other_pages_is_refused_before_the_cache_is_taken(direct, monkeypatch, tmp_path):
    """A disk page that does not fit the cache's pages: TierError, and the caller's cache
    is still whole (checked before it is donated)."""
    monkeypatch.setattr(movement, "host_reads", direct)
    s = Server(make_spec(), disk_bytes=10**7, disk_dir=str(tmp_path))
    s.serve(1, A)
    s.finish(1)
    test_tiers.evict_all(s)
    assert s.manager.admit_prompt(2, test_tiers.B) == 12
    up = next(u for u in s.tiers.uploads.values() if u.pages is not None)
    up.pages[0][0] = up.pages[0][0][:1]
    with pytest.raises(TierError, match="other pages"):
        movement.flush(s.cache, s.tiers)
    assert not any(a.is_deleted() for a in jax.tree_util.tree_leaves(s.cache))


def test_both_upload_paths_leave_the_same_pool(monkeypatch):
    """Uploads written in place (generations and owners set with numpy after the donating
    call) leave the pool as the jitted scatter does: the same pages, generations, and
    every layer owned by the uploading manager."""
    pools = []
    for direct in (True, False):
        s = _evicted(monkeypatch, direct)
        assert s.manager.admit_prompt(2, test_tiers.B) == 12 and s.tiers.uploads
        s.flush()
        s.check()
        for view in s.cache.views:
            assert int(np.asarray(view.owner)) == int(s.manager.steps.tag)
        pools.append([np.asarray(a).copy() for view in s.cache.views
                      for a in (*jax.tree_util.tree_leaves(view.pages()), view.generations)])
    assert all(np.array_equal(x, y) for x, y in zip(*pools))
