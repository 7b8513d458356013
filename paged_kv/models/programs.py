"""Compiled step programs, optionally kept on disk so that a second process skips tracing.

JAX's persistent compilation cache (``jax_compilation_cache_dir``) saves XLA's work
only: a second process still traces the decoder (a thousand and more nested jnp calls
for a model of 8 layers) and lowers it to StableHLO before the cache can even be
asked, most of its time to first token after the imports and the weights. `Programs`
compiles ahead of time (``jit(...).lower(...).compile()``) and, given a directory,
writes each compiled executable there (`jax.experimental.serialize_executable`); a
later process with the same program reads it back instead of tracing. A program to
be stored is compiled by XLA, not read from JAX's cache (`_compile_fresh`), so JAX's
cache does not hold it.

A stored program is found by a key over everything the program is made from: the
name of the function and what the caller says it closes over (``identity``: the
model's config, the cache spec, ...), every argument's pytree structure, shape,
dtype and placement, the source of every paged_kv module (any edit misses), the
Python / jax / jaxlib / numpy versions, the backend and its devices, the host CPU,
``XLA_FLAGS``, the compiler options and jax's configuration. A file holds its full
key and a SHA-256 of its payload: a stale one misses (a different key), a truncated
or corrupted one, or one that does not deserialize or fits other arguments, is
compiled afresh and overwritten (a warning in the log), never run. The directory
must be trusted as JAX's own cache is: loading an executable runs code from it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import platform
import sys
import tempfile
from collections.abc import Callable, Hashable, Sequence
from functools import lru_cache
from typing import Any

import jax
import numpy as np

from paged_kv.cache import PagedKVCache
from paged_kv.metadata import StepMetadata
from paged_kv.models.decoder import ModelConfig, Params, forward, forward_contiguous
from paged_kv.spec import CacheSpec

_FORMAT = b"paged_kv compiled program 1\n"
_CONFIG_IGNORED = ("jax_compilation_cache", "jax_persistent_cache", "jax_enable_compilation_cache", "jax_log",
                   "jax_logging", "jax_explain_cache_misses", "jax_raise_persistent_cache_errors")
"""jax settings that do not change a program (where and whether jax logs or caches);
every other one is in the key."""

log = logging.getLogger(__name__)


class Programs:
    """One function's compiled programs, by argument signature.

    ``fn`` is jitted with ``donate_argnums`` and ``compiler_options``; a call with a
    new signature compiles it ahead of time, or reads it from ``directory`` when given
    (and writes it there after compiling). ``out_tree(args)``: the pytree structure of
    ``fn(*args)``'s result (a stored executable keeps its flat outputs only).
    ``identity``: what ``fn`` closes over, as text (it must change whenever the
    program would). ``fixed``: how many leading arguments keep their structure, shapes
    and dtypes from call to call (weights, the cache): the lookup skips them (tens of
    microseconds a step), and a program refuses them if they change (it raises before
    running anything). ``compiled`` and ``loaded`` count the programs made each way.
    """

    def __init__(self, fn: Callable[..., Any], name: str, identity: str, out_tree: Callable[[tuple[Any, ...]], Any],
                 *, directory: pathlib.Path | None = None, donate_argnums: tuple[int, ...] = (), fixed: int = 0,
                 compiler_options: dict[str, Any] | None = None) -> None:
        self._jit = jax.jit(fn, donate_argnums=donate_argnums, compiler_options=compiler_options)
        self.name, self.identity, self.directory = name, identity, directory
        self._out_tree, self._donate, self._fixed = out_tree, donate_argnums, fixed
        self._options = sorted((compiler_options or {}).items())
        self._by_signature: dict[Hashable, Any] = {}
        self.compiled = self.loaded = 0

    def __call__(self, *args: Any) -> Any:
        # One flatten of the changing arguments, then an exact lookup: a call never runs a
        # program made for other arrays, never depends on an exception to find its own,
        # and an error raised while flattening (a stale step's metadata) is raised once,
        # before anything runs. The program is called with the leaves just checked,
        # rebuilt from them (with no host step), so jax's C++ call flattens them again cheaply.
        leaves, tree = jax.tree_util.tree_flatten(args[self._fixed:])
        # Shape and dtype of every leaf. (Placement is not here: an executable refuses
        # arrays on other devices.)
        signature = (tree, *[(x.shape, x.dtype) for x in leaves])
        args = (*args[:self._fixed], *jax.tree_util.tree_unflatten(tree, leaves))
        program = self._by_signature.get(signature)
        if program is None:
            program = self._by_signature[signature] = self._make(args)
        return program(*args)

    def _make(self, args: tuple[Any, ...]) -> Any:
        leaves, tree = jax.tree_util.tree_flatten(args)
        path = key = None
        if self.directory is not None:
            try:
                key = self._key(leaves, tree)
            except Exception as exc:  # noqa: BLE001 - an argument or platform the key cannot describe
                log.warning("paged_kv: %s cannot be keyed (%s: %s); compiled, not stored", self.name,
                            type(exc).__name__, str(exc)[:200])
        if key is not None and self.directory is not None:
            path = self.directory / f"{self.name}-{hashlib.sha256(key.encode()).hexdigest()}.bin"
            program = self._read(path, key, args, leaves)
            if program is not None:
                self.loaded += 1
                return program
        lowered = self._jit.lower(*args)
        program = lowered.compile() if path is None else _compile_fresh(lowered)
        self.compiled += 1
        if path is not None and key is not None:
            self._write(path, key, program, args)
        return program

    # ---- the key -----------------------------------------------------------------------
    def _key(self, leaves: Sequence[Any], tree: Any) -> str:
        devices = jax.devices()
        parts = {
            "function": self.name, "identity": self.identity, "tree": str(tree),
            "arguments": [[repr(jax.typeof(x)), str(getattr(x, "sharding", None))] for x in leaves],
            "donate_argnums": list(self._donate), "compiler_options": repr(self._options),
            "paged_kv_source": _source_digest(), "versions": _versions(),
            "backend": [devices[0].client.platform, devices[0].client.platform_version,
                        [(d.id, d.device_kind) for d in devices], jax.process_count()],
            "host": _host(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "jax_config": sorted((k, repr(v)) for k, v in jax.config.values.items()
                                 if not k.startswith(_CONFIG_IGNORED)),
        }
        return json.dumps(parts, sort_keys=True)

    # ---- reading and writing -------------------------------------------------------------
    def _read(self, path: pathlib.Path, key: str, args: tuple[Any, ...], leaves: Sequence[Any]) -> Any:
        """The stored program for these arguments, or None (absent, or not to be trusted)."""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("paged_kv: cannot read the stored program %s (%s); compiling it", path, exc)
            return None
        try:
            payload = _unpack(data, key)
            from jax.experimental.serialize_executable import deserialize_and_load

            in_tree = jax.tree_util.tree_structure((args, {}))
            # The devices the arguments are on (those the key names), not every local one.
            devices = sorted({d for x in leaves for d in x.sharding.device_set}, key=lambda d: d.id)
            program = deserialize_and_load(payload, in_tree, self._out_tree(args),
                                           backend=devices[0].client, execution_devices=devices)
            _check_arguments(program, args, leaves, self._donate)
        except Exception as exc:  # noqa: BLE001 - a bad file fails in many ways; each means: compile instead
            log.warning("paged_kv: the stored program %s cannot be used (%s: %s); compiling it afresh",
                        path, type(exc).__name__, str(exc)[:200])
            return None
        return program

    def _write(self, path: pathlib.Path, key: str, program: Any, args: tuple[Any, ...]) -> None:
        """Store ``program`` (atomically: a reader sees the whole file or none); a program
        that cannot be stored, or a directory that cannot be written, only costs the
        next process a compilation."""
        try:
            from jax.experimental.serialize_executable import serialize

            payload, in_tree, out_tree = serialize(program)
            if in_tree != jax.tree_util.tree_structure((args, {})) or out_tree != self._out_tree(args):
                log.warning("paged_kv: %s's pytrees differ from those it is read back with; not stored", self.name)
                return
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(_pack(payload, key))
                os.replace(tmp, path)
            except BaseException:
                os.unlink(tmp)
                raise
        except Exception as exc:  # noqa: BLE001 - serialization (some programs cannot be) or the disk
            log.warning("paged_kv: %s not stored in %s (%s: %s)", self.name, path.parent, type(exc).__name__,
                        str(exc)[:200])


class ModelPrograms:
    """A `Generator`'s programs: the paged step (``steps[greedy]``: a decode step whose
    every request is plain greedy returns its tokens, not ``[B, vocab]`` logits) and the
    contiguous prefill, kept in ``directory`` when given. ``traces`` counts the
    compilations (each traces once), ``loaded`` the programs read back instead."""

    def __init__(self, cfg: ModelConfig, spec: CacheSpec, record_logits: bool,
                 directory: str | os.PathLike[str] | None, compiler_options: dict[str, Any] | None) -> None:
        where = None if directory is None else pathlib.Path(directory).expanduser()
        identity = repr((cfg, spec, record_logits))
        self.traces = 0

        def step(greedy: bool) -> Callable[..., tuple[jax.Array, PagedKVCache]]:
            def run(params: Params, cache: PagedKVCache, tokens: jax.Array, metadata: StepMetadata,
                    ) -> tuple[jax.Array, PagedKVCache]:
                self.traces += 1  # runs only while tracing
                return forward(cfg, params, cache, tokens, metadata, last_only=not record_logits, greedy=greedy)
            return run

        def contiguous(params: Params, tokens: jax.Array,
                       ) -> tuple[jax.Array, tuple[jax.Array, ...], tuple[jax.Array, ...]]:
            self.traces += 1
            return forward_contiguous(cfg, params, tokens)

        layers = tuple(range(cfg.num_layers))
        # The step returns its cache in the structure it took (the weights and the cache
        # are the same arrays at every step: `fixed`).
        self.steps = {g: Programs(step(g), "step_greedy" if g else "step", identity,
                                  lambda args: jax.tree_util.tree_structure((0, args[1])), directory=where,
                                  donate_argnums=(1,), fixed=2, compiler_options=compiler_options)
                      for g in (False, True)}
        self.contiguous = Programs(contiguous, "contiguous", identity,
                                   lambda _: jax.tree_util.tree_structure((0, layers, layers)), directory=where,
                                   fixed=1, compiler_options=compiler_options)

    @property
    def loaded(self) -> int:
        return self.steps[False].loaded + self.steps[True].loaded + self.contiguous.loaded

    @property
    def made(self) -> tuple[int, int]:
        """(traces, loaded): changes whenever a call compiled or read back a program."""
        return self.traces, self.loaded


def _compile_fresh(lowered: Any) -> Any:
    """``lowered.compile()`` by XLA itself, not read from JAX's persistent cache: XLA:CPU
    cannot serialize an executable it deserialized (jaxlib 0.10 writes it, and the copy
    read back fails when run: "Function ... not found"), and a cache hit is one. Off for
    this compilation only, then read afresh with the settings as they were."""
    if not (jax.config.values["jax_compilation_cache_dir"] and jax.config.values["jax_enable_compilation_cache"]):
        return lowered.compile()
    from jax.experimental.compilation_cache import compilation_cache

    jax.config.update("jax_enable_compilation_cache", False)  # type: ignore[no-untyped-call]  # unannotated
    compilation_cache.reset_cache()  # it reads its settings once
    try:
        return lowered.compile()
    finally:
        jax.config.update("jax_enable_compilation_cache", True)  # type: ignore[no-untyped-call]
        compilation_cache.reset_cache()


def _pack(payload: bytes, key: str) -> bytes:
    return b"".join([_FORMAT, key.encode(), b"\n", hashlib.sha256(payload).hexdigest().encode(), b"\n", payload])


def _unpack(data: bytes, key: str) -> bytes:
    """The payload of a stored program with this key; ValueError if the file is another
    format, another key (a hash collision, a hand-copied file) or damaged."""
    if not data.startswith(_FORMAT):
        raise ValueError("not a paged_kv program file of this format")
    head, _, rest = data[len(_FORMAT):].partition(b"\n")
    digest, _, payload = rest.partition(b"\n")
    if head != key.encode():
        raise ValueError("stored for another program")
    if hashlib.sha256(payload).hexdigest().encode() != digest:
        raise ValueError("its payload does not match its checksum (truncated or damaged)")
    return payload


def _check_arguments(program: Any, args: tuple[Any, ...], leaves: Sequence[Any], donate: tuple[int, ...]) -> None:
    """ValueError unless the loaded program takes exactly these arrays and donates the
    arguments ``donate`` names, no others (its key says so; a file that passed the
    checksum yet disagrees is refused, not run)."""
    infos = jax.tree_util.tree_leaves(program.args_info)
    if len(infos) != len(leaves):
        raise ValueError(f"it takes {len(infos)} arrays, not {len(leaves)}")
    donated = [i in donate for i, a in enumerate(args) for _ in jax.tree_util.tree_leaves(a)]
    for i, (info, x, d) in enumerate(zip(infos, leaves, donated)):
        if (tuple(info.shape), np.dtype(info.dtype)) != (tuple(x.shape), np.dtype(x.dtype)):
            raise ValueError(f"array {i} is {info.dtype}{list(info.shape)}, not {x.dtype}{list(x.shape)}")
        if bool(info.donated) != d:
            raise ValueError(f"array {i} is {'' if info.donated else 'not '}donated")


@lru_cache(maxsize=1)
def _source_digest() -> str:
    """SHA-256 over every file of the paged_kv package (paths and bytes): a program
    traced from other code is another program. ~10 ms, once per process."""
    root = pathlib.Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.py")):
        h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


@lru_cache(maxsize=1)
def _versions() -> list[str]:
    import jaxlib.version
    import ml_dtypes

    return [sys.version, jax.__version__, jaxlib.version.__version__, np.__version__, ml_dtypes.__version__]


@lru_cache(maxsize=1)
def _host() -> list[str]:
    """The machine and, on Linux, its CPU's model and features: XLA:CPU compiles for the
    host's instruction set, which a directory shared between machines would not match."""
    cpu = []
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("model name", "flags", "Features", "CPU part")) and line not in cpu:
                    cpu.append(line.strip())
                if not line.strip() and cpu:
                    break  # the first processor's block is enough
    except OSError:
        pass
    return [platform.machine(), platform.processor(), *cpu]


__all__ = ["ModelPrograms", "Programs"]
