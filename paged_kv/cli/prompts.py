"""Where ``paged-kv generate`` gets its prompts and checkpoint from, checked before the
model loads: token ids (``--prompt-ids``), text (``--prompt``) or a file of either
(``--prompt-file``), and a ``--checkpoint`` that must be a local directory.

Prompt files exist because a long prompt typed as ``--prompt-ids 1,2,3,...`` or
quoted into ``--prompt`` runs into the shell's argument limits and quoting rules.
"""

from __future__ import annotations

import argparse
import pathlib
import re
from collections.abc import Callable
from typing import TYPE_CHECKING

from paged_kv.errors import PagedKVError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

MAX_PROMPT_FILE_BYTES = 64 * 2**20
"""A prompt file larger than this is refused unread: 64 MiB is ~16M tokens of text,
past any context window the generator could serve, so a larger file is a wrong path."""

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
"""``org/model``: how the Hugging Face hub names a repository."""


def token_ids(text: str) -> list[int]:
    """An argparse type: ``"1,2,3"`` or ``"1 2 3"`` -> ``[1, 2, 3]``."""
    parts = text.replace(",", " ").split()
    try:
        ids = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of integer token ids (e.g. '1,2,3')") from None
    if not ids:
        raise argparse.ArgumentTypeError("an empty prompt; give at least one token id")
    return ids


def read_prompt_file(path: str) -> list[int] | str:
    """The prompt in file ``path``: its token ids when the file holds only integers
    (separated by commas, spaces or newlines), else its text (to be tokenized with the
    checkpoint's tokenizer.json), trailing newline removed. Read when the command runs,
    not when arguments are parsed, so ``--help`` and argument checks never touch files."""
    file = pathlib.Path(path)
    if not file.is_file():
        what = "is a folder" if file.is_dir() else "does not exist"
        raise PagedKVError(f"--prompt-file {path} {what}; give a file holding one prompt (text or token ids)")
    size = file.stat().st_size
    if size > MAX_PROMPT_FILE_BYTES:
        raise PagedKVError(f"--prompt-file {path} holds {size:,} bytes, more than the "
                           f"{MAX_PROMPT_FILE_BYTES // 2**20} MiB a prompt could use; check the path")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise PagedKVError(f"--prompt-file {path} is not UTF-8 text; give a text prompt or token ids") from None
    except OSError as exc:
        raise PagedKVError(f"--prompt-file {path} cannot be read: {exc.strerror}") from None
    if not text.strip():
        raise PagedKVError(f"--prompt-file {path} is empty; give a file holding one prompt")
    words = text.replace(",", " ").split()
    if all(re.fullmatch(r"[+-]?\d+", w) for w in words):
        return [int(w) for w in words]
    return text[:-1] if text.endswith("\n") else text


def check_checkpoint(checkpoint: str) -> pathlib.Path:
    """The checkpoint directory; `PagedKVError` saying what to do when ``checkpoint`` is not
    one. A hub id (``org/model``) is the common mistake: the loader reads local files
    only, and left to it the error would be "config.json: not found"."""
    directory = pathlib.Path(checkpoint)
    if directory.is_dir():
        return directory
    if directory.exists():
        raise PagedKVError(f"--checkpoint {checkpoint} is a file; give the checkpoint's directory (the one holding "
                           "config.json and *.safetensors)")
    if _HUB_ID.fullmatch(checkpoint):
        raise PagedKVError(
            f"--checkpoint {checkpoint}: no such directory; if it is a Hugging Face hub id, download the checkpoint "
            f"first (huggingface-cli download {checkpoint} --local-dir DIR; pip install huggingface_hub) and give "
            "--checkpoint DIR")
    raise PagedKVError(f"--checkpoint {checkpoint}: no such directory; give a local checkpoint directory (config.json "
                       "and *.safetensors)")


def load_prompts(args: argparse.Namespace, directory: pathlib.Path, need_tokenizer: bool = False,
                 chat: Callable[[str], str] | None = None) -> tuple[list[list[int]], Tokenizer | None]:
    """``(token-id prompts, tokenizer or None)`` from ``--prompt-ids``, ``--prompt`` or
    ``--prompt-file``; the tokenizer is loaded when some prompt is text or
    ``need_tokenizer`` (stop strings). ``chat``: text -> the chat-formatted text
    (`paged_kv.cli.generate_options.chat_template`), for text prompts only; the
    formatted text names its special tokens itself, so none is added."""
    given = args.prompt_ids or args.prompt or [read_prompt_file(path) for path in args.prompt_file]
    text = not all(isinstance(p, list) for p in given)
    if chat is not None and not text:
        raise PagedKVError("--chat formats text prompts: give --prompt TEXT (or a --prompt-file of text), or leave "
                           "--chat out")
    if not text and not need_tokenizer:
        return given, None
    flag = ("--prompt" if args.prompt else "--prompt-file") if text else "--stop"
    path = directory / "tokenizer.json"
    if not path.is_file():
        instead = "give --prompt-ids instead (or a --prompt-file of token ids)" if text else \
            "give --stop-token-ids instead"
        raise PagedKVError(f"{flag} needs {path}; {instead}")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise PagedKVError(f"{flag} needs the tokenizers package: pip install 'paged_kv[models]'") from None
    tokenizer = Tokenizer.from_file(str(path))
    if chat is None:
        prompts = [p if isinstance(p, list) else tokenizer.encode(p).ids for p in given]
    else:
        prompts = [p if isinstance(p, list) else tokenizer.encode(chat(p), add_special_tokens=False).ids
                   for p in given]
    for i, ids in enumerate(prompts):
        if not ids:
            raise PagedKVError(f"{flag} number {i + 1} tokenizes to no token; give a non-empty prompt")
    return prompts, tokenizer


__all__ = ["MAX_PROMPT_FILE_BYTES", "check_checkpoint", "load_prompts", "read_prompt_file", "token_ids"]
