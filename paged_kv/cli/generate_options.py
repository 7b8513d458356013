"""``paged-kv generate``'s sampling, stop, chat and compilation-cache flags, and what
they turn into: `Request` fields, chat-formatted prompts, a persistent compilation cache.

Only argparse runs when the flags are added; JAX and jinja2 load when the command runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

from paged_kv.cli.arguments import finite, integer, number
from paged_kv.cli.prompts import token_ids
from paged_kv.errors import PagedKVError

SAMPLING = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty", "seed", "logprobs")
"""Flags passed to every `Request` as they are named there (``--top-k`` -> ``top_k``)."""


_nonneg_int = integer(0)


def _probability(text: str) -> float:
    value = number(0.0, None)(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"{value} must be in [0, 1]")
    return value


def _top_p(text: str) -> float:
    value = _probability(text)
    if value == 0:
        raise argparse.ArgumentTypeError("0 keeps no token: give a number in (0, 1] (1: off)")
    return value


def _penalty(text: str) -> float:
    value = number(0.0, None)(text)
    if value == 0:
        raise argparse.ArgumentTypeError("0 must be > 0 (1: off)")
    return value


def add_flags(gen: argparse.ArgumentParser) -> None:
    """Add the sampling, stop, chat and cache flags to the ``generate`` parser."""
    s = gen.add_argument_group("sampling (default: greedy)")
    s.add_argument("--temperature", type=number(0.0, None), default=0.0, metavar="T", help="0: greedy")
    s.add_argument("--top-k", type=_nonneg_int, default=0, metavar="K", help="keep the K most likely tokens (0: off)")
    s.add_argument("--top-p", type=_top_p, default=1.0, metavar="P",
                   help="keep the most likely tokens whose probability reaches P (1: off)")
    s.add_argument("--min-p", type=_probability, default=0.0, metavar="P",
                   help="drop tokens less likely than P times the most likely (0: off)")
    s.add_argument("--repetition-penalty", type=_penalty, default=1.0, metavar="X",
                   help="divide the logits of prompt and generated tokens by X (1: off)")
    s.add_argument("--presence-penalty", type=finite, default=0.0, metavar="X",
                   help="subtract X from the logits of generated tokens (0: off)")
    s.add_argument("--seed", type=_nonneg_int, metavar="N",
                   help="seed of every request's draws (request i uses N + i); default: random")
    s.add_argument("--logprobs", type=_nonneg_int, metavar="N",
                   help="report each generated token's logprob and the N most likely (with --json)")
    s.add_argument("--stop", action="append", metavar="TEXT",
                   help="end a completion where its text contains TEXT (cut before it); repeat for more")
    s.add_argument("--stop-token-ids", type=token_ids, metavar="IDS",
                   help="end a completion at any of these token ids ('1,2'), kept in it")
    gen.add_argument("--chat", action="store_true",
                     help="format each text prompt as a user message with the checkpoint's chat template "
                     "(tokenizer_config.json; needs jinja2: pip install 'paged_kv[chat]')")
    gen.add_argument("--compile-cache", metavar="DIR", default=default_cache_dir(),
                     help="keep compiled steps in DIR so that the next run starts faster")
    gen.add_argument("--no-compile-cache", action="store_true", help="compile every run afresh, keep nothing")


def default_cache_dir() -> str:
    """JAX's own ``JAX_COMPILATION_CACHE_DIR`` when set, else ``$XDG_CACHE_HOME/paged_kv/jax``
    (``~/.cache/paged_kv/jax``)."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "paged_kv", "jax")


def program_dir(args: argparse.Namespace) -> pathlib.Path | None:
    """Where the generator keeps its compiled steps (`paged_kv.models.programs`): beside
    JAX's compilation cache in ``--compile-cache``, whose hits still trace and lower the
    model (most of a warm run's time before its first token); None with
    ``--no-compile-cache``."""
    return None if args.no_compile_cache else pathlib.Path(args.compile_cache).expanduser() / "paged_kv-programs"


def request_fields(args: argparse.Namespace, index: int) -> dict[str, Any]:
    """The `Request` fields the flags give request ``index``."""
    fields = {name: getattr(args, name) for name in SAMPLING}
    if args.seed is not None:
        fields["seed"] = (args.seed + index) % 2 ** 64  # one seed each: equal prompts still differ
    fields["stop"] = tuple(args.stop or ())
    fields["stop_token_ids"] = tuple(args.stop_token_ids or ())
    return fields


def needs_text(args: argparse.Namespace) -> bool:
    """Whether the run needs the checkpoint's tokenizer even for prompts given as ids."""
    return bool(args.stop) or args.chat


@contextlib.contextmanager
def compile_cache(args: argparse.Namespace) -> Iterator[None]:
    """JAX's persistent compilation cache in ``--compile-cache`` for the command's run
    (every compilation is kept, however quick: a small model's steps compile in well
    under JAX's default 1 s threshold, and there are a dozen of them). The previous
    settings come back afterwards, so that a caller running the command in-process
    (tests, notebooks) is not left writing every later compilation to disk."""
    if args.no_compile_cache:
        yield
        return
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    directory = pathlib.Path(args.compile_cache).expanduser()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PagedKVError(f"--compile-cache {args.compile_cache}: cannot create it ({exc.strerror}); give another "
                           "directory or --no-compile-cache") from None
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    before = [getattr(jax.config, n) for n in names]
    jax.config.update(names[0], str(directory))  # type: ignore[no-untyped-call]  # jax's Config.update is unannotated
    jax.config.update(names[1], 0.0)  # type: ignore[no-untyped-call]
    compilation_cache.reset_cache()  # the cache reads its settings once: make it read these
    try:
        yield
    finally:
        for n, v in zip(names, before):
            jax.config.update(n, v)  # type: ignore[no-untyped-call]
        compilation_cache.reset_cache()


def chat_template(directory: pathlib.Path) -> Callable[[str], str]:
    """The checkpoint's chat template, compiled in a sandbox (a template is code from
    the checkpoint: jinja2's immutable sandbox keeps it from touching Python objects),
    and the special tokens it may name; `PagedKVError` saying what is missing."""
    path = directory / "tokenizer_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PagedKVError(f"--chat needs {path} with a chat_template; leave --chat out to use the prompt as "
                           "it is") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PagedKVError(f"--chat: {path} cannot be read as JSON ({exc})") from None
    template = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(template, list):  # named templates: the default one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if not isinstance(template, str) or not template:
        raise PagedKVError(f"--chat: {path} has no chat_template; leave --chat out to use the prompt as it is")
    try:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise PagedKVError("--chat needs jinja2: pip install 'paged_kv[chat]'") from None

    def raise_exception(message: str) -> NoReturn:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        compiled = env.from_string(template)
    except TemplateError as exc:
        raise PagedKVError(f"--chat: the chat_template in {path} does not compile: {exc}") from None

    def token(name: str) -> str:
        value = config.get(name)
        return value.get("content", "") if isinstance(value, dict) else (value or "")

    special = {name: token(name) for name in ("bos_token", "eos_token", "pad_token", "unk_token")}

    def render(text: str) -> str:
        try:
            return compiled.render(messages=[{"role": "user", "content": text}], add_generation_prompt=True,
                                   **special)
        except TemplateError as exc:
            raise PagedKVError(f"--chat: the chat_template in {path} failed on this prompt: {exc}") from None

    return render


__all__ = ["add_flags", "chat_template", "compile_cache", "default_cache_dir", "needs_text", "program_dir",
           "request_fields"]
