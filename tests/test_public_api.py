"""The public API documents itself: every public name and member has a docstring,
public parameters are annotated, the package ships ``py.typed``, and
``help(paged_kv)`` leads to the simulator."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

import paged_kv
import paged_kv.sim

ROOT = Path(__file__).resolve().parents[1]
MODULES = (paged_kv, paged_kv.sim)


def public_members():
    """``(qualified name, function or class, owner class or None)`` of every public
    name in the modules' ``__all__`` and the public methods/properties of classes."""
    seen = set()
    for module in MODULES:
        for name in module.__all__:
            obj = getattr(module, name)
            if id(obj) in seen or not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue
            seen.add(id(obj))
            yield f"{module.__name__}.{name}", obj, None
            if inspect.isclass(obj):
                # Members a paged_kv base (a mixin part of the class) defines count too.
                own = [vars(c) for c in obj.__mro__ if c.__module__.startswith("paged_kv")]
                for attr, value in {k: v for members in reversed(own) for k, v in members.items()}.items():
                    if attr.startswith("_"):
                        continue
                    func = value.fget if isinstance(value, property) else getattr(value, "__func__", value)
                    if inspect.isfunction(func):
                        yield f"{module.__name__}.{name}.{attr}", func, obj


def test_every_public_member_has_a_docstring():
    missing = []
    for qualname, obj, owner in public_members():
        # A method documented on the base class it overrides is documented.
        doc = inspect.getdoc(getattr(owner, qualname.rsplit(".", 1)[1])) if owner else obj.__doc__
        if not (doc or "").strip():
            missing.append(qualname)
    assert not missing, f"public members without a docstring: {missing}"


def test_public_parameters_are_annotated():
    missing = []
    for qualname, obj, _ in public_members():
        if not inspect.isfunction(obj):
            continue
        for p in inspect.signature(obj).parameters.values():
            if p.name not in ("self", "cls") and p.kind is not p.VAR_KEYWORD and p.annotation is p.empty:
                missing.append(f"{qualname}({p.name})")
    assert not missing, f"public parameters without a type annotation: {missing}"


def test_package_is_marked_typed():
    assert (ROOT / "paged_kv" / "py.typed").is_file()
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "py.typed" in config["tool"]["setuptools"]["package-data"]["paged_kv"]


def test_help_leads_to_the_simulator():
    assert "paged_kv.sim" in paged_kv.__doc__ and "paged-kv simulate" in paged_kv.__doc__
    assert paged_kv.sim.__doc__ and "simulate" in paged_kv.sim.__all__


def test_no_lazy_name_is_shadowed_by_a_submodule():
    """Importing a submodule sets it as its package's attribute: a lazily loaded function
    named like a submodule (`paged_kv.tiers.persist` once was) would become that module."""
    import importlib
    import pkgutil
    import types

    import paged_kv
    import paged_kv.tiers

    for info in pkgutil.walk_packages(paged_kv.__path__, "paged_kv."):
        if not info.name.endswith("__main__"):
            try:
                importlib.import_module(info.name)
            except ImportError:  # an optional dependency missing
                pass
    for package in (paged_kv, paged_kv.tiers):
        for name in package._DEVICE_NAMES:
            assert not isinstance(getattr(package, name), types.ModuleType), (package.__name__, name)
    from paged_kv.tiers import persist

    assert callable(persist)
