"""The package type-checks strictly, and a user's type checker catches what the runtime
would refuse (issue 27 item 1): a misspelt `CacheSpec` field, a wrong argument type,
on the host API and on the device API alike.

One mypy run (the ``[tool.mypy]`` settings of pyproject.toml: ``strict``) checks the
package and a small user script; its cache lives under ``.mypy_cache`` in the
repository root, as for ``mypy`` run there by hand.
"""

from __future__ import annotations

import os
import re
import textwrap
from pathlib import Path

import attrs
import pytest

mypy_api = pytest.importorskip("mypy.api")

ROOT = Path(__file__).resolve().parents[1]

USER_SCRIPT = textwrap.dedent("""\
    import paged_kv as pk

    spec = pk.CacheSpec(num_layers=2, num_blocks=64, block_size=16, max_blocks_per_seq=8,
                        num_kv_heads=2, head_dim=64, max_batch_slot=8)
    manager = pk.KVCacheManager(spec)
    slots = manager.admit(0, num_tokens="12")
    cache = pk.PagedKVCache.init(spec).bind(manager)
    swapped = pk.swap_out(cache, manager, "0")
    cache = pk.swap_in(cache, manager, swapped)
    cache_spec: pk.CacheSpec = cache.spec
    probe = pk.CacheSpec.for_memory(2**20, num_layers=2, block_size=16, num_kv_heads=2, head_dim=64)
""")

EXPECTED = {
    (3, "call-arg", 'Unexpected keyword argument "max_batch_slot" for "CacheSpec"'),  # ; did you mean ...?
    (6, "arg-type", 'Argument "num_tokens" to "admit" of "KVCacheManager" has incompatible type "str"; expected "int"'),
    (8, "arg-type", 'Argument 3 to "swap_out" has incompatible type "str"; expected "int"'),
}
"""(line, error code, message) of each error the user script must get, and no other (the
message as far as given: mypy may add a suggestion)."""

ERROR = re.compile(r"^(?P<path>[^:]+):(?P<line>\d+): error: (?P<message>.*?)  \[(?P<code>[a-z-]+)\]$")


@pytest.fixture(scope="module")
def mypy_errors(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, int, str, str]]:
    """(path, line, code, message) of every error of one mypy run over the package and the user script."""
    script = tmp_path_factory.mktemp("user") / "user_script.py"
    script.write_text(USER_SCRIPT)
    cwd = os.getcwd()
    os.chdir(ROOT)  # pyproject.toml's settings, and paged_kv found as the source tree
    try:
        stdout, stderr, status = mypy_api.run(["paged_kv", str(script)])
    finally:
        os.chdir(cwd)
    assert status in (0, 1), f"mypy failed to run ({status}):\n{stdout}\n{stderr}"
    errors = []
    for line in stdout.splitlines():
        m = ERROR.match(line)
        if m:
            path = "user" if Path(m["path"]).name == script.name else m["path"]
            errors.append((path, int(m["line"]), m["code"], m["message"]))
    assert errors or status == 0, stdout
    return errors


def test_package_is_strict_clean(mypy_errors):
    package = [e for e in mypy_errors if e[0] != "user"]
    assert not package, "mypy --strict errors in paged_kv:\n" + "\n".join(f"{p}:{n}: {m}  [{c}]" for p, n, c, m in package)


def test_user_script_errors_are_exactly_the_mistakes(mypy_errors):
    got = sorted((n, c, m) for p, n, c, m in mypy_errors if p == "user")
    want = sorted(EXPECTED)
    assert [(n, c) for n, c, _ in got] == [(n, c) for n, c, _ in want], got
    for (_, _, message), (_, _, expected) in zip(got, want):
        assert message.startswith(expected), (message, expected)


def test_constructor_fields_match_the_spec():
    # CacheSpecFields types CacheSpec(**fields); it must name exactly the constructor's
    # fields, with the required ones (no default) required.
    from paged_kv import CacheSpec
    from paged_kv.spec.spec_types import CacheSpecFields, MemoryFields

    init = [a for a in attrs.fields(CacheSpec) if a.init]
    assert set(CacheSpecFields.__annotations__) == {a.name for a in init}
    assert CacheSpecFields.__required_keys__ == {a.name for a in init if a.default is attrs.NOTHING}
    assert set(MemoryFields.__annotations__) == {a.name for a in init} - {"num_blocks"}
    assert MemoryFields.__required_keys__ == CacheSpecFields.__required_keys__ - {"num_blocks", "max_blocks_per_seq"}
