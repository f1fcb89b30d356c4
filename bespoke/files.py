"""Crash-safe file writing, shared by every stage that writes to disk.

A reader sees the old file or the new one, never a torn one: write a temporary file beside the
target, fsync it, rename it over the target, fsync the directory (so the rename survives a crash).

A command that fails leaves no empty output folder it made (:func:`tidy_on_failure`,
:func:`claim_folder`).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator


def fsync_dir(d: Path) -> None:
    try:
        fd = os.open(str(d), os.O_RDONLY)
    except OSError:  # platforms without directory file descriptors
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[str], None], suffix: str = ".tmp") -> Path:
    """Call ``write(tmp_path)`` to fill a temporary file, then move it over ``path`` atomically.

    ``suffix`` ends the temporary file's name, for writers that go by the extension."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Atomically replace ``path`` with ``text`` (UTF-8)."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


_claims: list[list[Path]] = []  # per running command (innermost last): the folders it made


def claim_folder(folder: str | Path) -> Path:
    """Note that the running command (:func:`tidy_on_failure`) writes under ``folder``, before it
    makes it: when ``folder`` does not exist yet, the outermost of its missing folders is this
    command's, and is removed again if the command fails while nothing but folders lies under it.
    A folder that exists already (one the user made, a house being resumed) is never claimed.
    Returns ``folder`` as a :class:`Path`."""
    folder = Path(folder)
    if _claims:
        top = _outermost_missing(folder)
        if top is not None and top not in _claims[-1]:
            _claims[-1].append(top)
    return folder


@contextlib.contextmanager
def tidy_on_failure() -> Iterator[None]:
    """Run a command (also as a decorator: ``@tidy_on_failure()``); when it raises, remove every
    folder it claimed (:func:`claim_folder`) that holds no file: a command that fails on bad
    input before writing anything (a teacher that does not load, images that are not there)
    leaves nothing behind, and one that wrote something (a house, a latency table) leaves it for
    the rerun to resume from. A ``SystemExit`` of status 0 is not a failure."""
    _claims.append([])
    try:
        yield
    except BaseException as exc:
        if not (isinstance(exc, SystemExit) and exc.code in (0, None)):
            for top in reversed(_claims[-1]):
                _remove_if_empty(top)
        raise
    finally:
        _claims.pop()


def _outermost_missing(folder: Path) -> Path | None:
    """The outermost folder of ``folder`` and its parents that does not exist (None: it exists)."""
    folder = folder.absolute()
    if folder.exists() or folder.is_symlink():
        return None
    while not (folder.parent.exists() or folder.parent == folder):
        folder = folder.parent
    return folder


def _remove_if_empty(top: Path) -> None:
    """Remove ``top`` and the folders under it when nothing else lies there (no file, no link)."""
    if not top.is_dir() or top.is_symlink():
        return
    folders = []
    for root, dirs, files in os.walk(top):
        if files or any(Path(root, d).is_symlink() for d in dirs):
            return
        folders.append(Path(root))
    for d in reversed(folders):  # the deepest first
        try:
            d.rmdir()
        except OSError:  # something appeared meanwhile: keep it
            return
