"""Atomic writes: build a directory (or a file) under a temporary sibling, fsync it, then rename into place.

A save killed at any point leaves either the previous directory or no directory at the target path, never a
half-written one that loads as valid; leftovers are `.NAME.tmp-*` siblings that no loader looks at (and
`remove_leftovers` deletes). What lands at the target has the user's umask: the temporary directory is made by
mkdir (which applies it) rather than mkdtemp (0700), and files that a library wrote 0600 (safetensors does) get the
mode the umask gives a new file.
"""

import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_tmp(target: Path) -> Path:
    """A fresh `.NAME.tmp-*` sibling of target, mode 0777 minus the umask."""
    for _ in range(100):
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            tmp.mkdir()
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a temporary directory beside {target}")


def _apply_umask(tmp: Path) -> None:
    # the mode mkdir gave tmp is 0777 minus the umask, read without os.umask (which sets it process-wide)
    dir_mode = tmp.stat().st_mode & 0o777
    for f in tmp.rglob("*"):
        if not f.is_symlink():
            f.chmod(dir_mode if f.is_dir() else dir_mode & 0o666)


@contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary directory; on normal exit it replaces `target` atomically."""
    target = Path(target).absolute()
    if target.is_symlink():
        # a link to the directory (a model dir kept on another disk): what it points at is replaced and the link
        # kept; renaming the link itself aside would put a real directory in its place and then fail in rmtree
        # (which refuses links), leaving the old weights where the link pointed and a `.NAME.old-*` link behind
        target = target.resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _make_tmp(target)
    try:
        yield tmp
        _apply_umask(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                fsync_path(f)
        fsync_path(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old)
        else:
            os.rename(tmp, target)
        fsync_path(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_leftovers(parent: str | Path) -> list[str]:
    """Delete what killed atomic writes left in `parent`: `.NAME.tmp-*` directories (never renamed into place), and
    `.NAME.old-*` ones whose replacement NAME is in place (a kill between the two renames leaves NAME missing: the
    old directory is then renamed back). Returns the names removed or restored."""
    parent = Path(parent)
    done = []
    for p in sorted(parent.glob(".*.tmp-*")) + sorted(parent.glob(".*.old-*")):
        if not p.is_dir() or p.is_symlink():
            continue
        name = p.name[1:].rsplit(".tmp-" if ".tmp-" in p.name else ".old-", 1)[0]
        if ".old-" in p.name and not (parent / name).exists():
            os.rename(p, parent / name)
        else:
            shutil.rmtree(p)
        done.append(p.name)
    return done


@contextmanager
def atomic_file(target: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path for the caller to write; on normal exit that file is fsynced and renamed over
    `target` (a new file: the user's umask), else removed. Readers see the old file or the new one, never a part."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, target)
        fsync_path(target.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_whole(path: str | Path, text: str) -> None:
    """`text` written to `path` whole or not at all (atomic_file)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
