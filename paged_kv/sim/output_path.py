"""Checking an output path before a long computation, so that a typo in it fails in
a second rather than after a replay of several minutes."""

from __future__ import annotations

import os
import tempfile

from paged_kv.errors import PagedKVError


class OutputPathError(PagedKVError, OSError):
    """An output file cannot be written: its folder is missing or read-only, or the path is a folder."""


def check_writable(path: str | os.PathLike[str], flag: str) -> None:
    """Raise `OutputPathError` naming ``flag`` unless ``path`` can be written now.

    An existing file is opened for appending and closed (its bytes are untouched);
    otherwise a scratch file is created next to it and removed, which is the only
    test that holds for every file system and user (``os.access`` says yes to root
    on a read-only mount).
    """
    name = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(name))
    if os.path.isdir(name):
        raise OutputPathError(f"{flag} {name}: is a folder; give a file name")
    if not os.path.isdir(parent):
        raise OutputPathError(f"{flag} {name}: folder {parent} does not exist; create it first")
    try:
        if os.path.exists(name):
            with open(name, "ab"):
                pass
        else:
            with tempfile.NamedTemporaryFile(dir=parent, prefix=".paged_kv-write-check-"):
                pass
    except OSError as exc:
        raise OutputPathError(f"{flag} {name}: cannot write there: {exc.strerror or exc}") from None


__all__ = ["OutputPathError", "check_writable"]
