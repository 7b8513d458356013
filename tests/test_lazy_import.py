"""Host-only users (a scheduler process, the simulator) never pay for importing JAX.

Each check runs in a fresh interpreter: this test process has imported JAX already.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.parametrize(
    "module", ["paged_kv", "paged_kv.allocator", "paged_kv.sim", "paged_kv.spec", "paged_kv.errors", "paged_kv.metadata"]
)
def test_host_modules_do_not_import_jax(module):
    assert _run(f"import sys, {module}; print('jax' in sys.modules)") == "False"


def test_host_work_does_not_import_jax():
    # A whole host step: admit, append, metadata, release, and the public names a scheduler uses.
    code = (
        "import sys, paged_kv as pk\n"
        "spec = pk.CacheSpec(num_layers=2, num_blocks=64, block_size=4, max_blocks_per_seq=16, num_kv_heads=1, head_dim=8)\n"
        "m = pk.KVCacheManager(spec)\n"
        "m.admit(1, 5); m.append([1], 1); meta = m.step_metadata([1], 1); m.release(1)\n"
        "pk.DecodeSlots(m); pk.OutOfBlocksError; pk.bucket(3, 8)\n"
        "print('jax' in sys.modules)"
    )
    assert _run(code) == "False"


def test_simulate_command_does_not_import_jax():
    code = (
        "import sys, runpy\n"
        "sys.argv = ['paged_kv', 'simulate', '--limit', '30', '--json']\n"
        "try:\n    runpy.run_module('paged_kv', run_name='__main__')\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "print('jax' in sys.modules, file=sys.stderr)"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip().splitlines()[-1] == "False"


def test_device_names_load_on_first_use():
    code = (
        "import sys, paged_kv as pk\n"
        "assert 'jax' not in sys.modules\n"
        "cls = pk.PagedKVCache\n"
        "import jax\n"
        "spec = pk.CacheSpec(num_layers=1, num_blocks=8, block_size=4, max_blocks_per_seq=4, num_kv_heads=1, head_dim=8)\n"
        "m = pk.KVCacheManager(spec); m.admit(1, 3)\n"
        "leaves = jax.tree_util.tree_leaves(m.step_metadata([1], 3))\n"
        "print(cls.__name__, len(leaves) > 3, 'PagedKVCache' in dir(pk))"
    )
    assert _run(code) == "PagedKVCache True True"


def test_metadata_built_before_jax_still_becomes_a_pytree():
    code = (
        "import paged_kv as pk\n"
        "spec = pk.CacheSpec(num_layers=1, num_blocks=8, block_size=4, max_blocks_per_seq=4, num_kv_heads=1, head_dim=8)\n"
        "m = pk.KVCacheManager(spec); m.admit(1, 3)\n"
        "meta = m.step_metadata([1], 3)\n"
        "on_device = meta.to_device()\n"
        "import jax\n"
        "print(type(on_device.kv_lens).__name__ != 'ndarray', len(jax.tree_util.tree_leaves(meta)) > 3)"
    )
    assert _run(code) == "True True"


def test_unknown_attribute_is_an_attribute_error():
    import paged_kv

    with pytest.raises(AttributeError, match="no_such_name"):
        paged_kv.no_such_name  # noqa: B018
