"""Writing artifacts safely: one writer at a time, outputs checked before any compute,
directories written whole or not at all.

Example:
    >>> out = prepare_output(Path("labels/"), "labels", marker="summary.json")
    >>> with exclusive(out, "memlens label"), atomic_dir(out) as tmp:
    ...     (tmp / "summary.json").write_text(text)   # out appears whole, or not at all
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from memlens.core import jsonio
from memlens.core.errors import ConfigError, UserError
from memlens.core.identity import Identity

__all__ = ["BusyError", "OutputError", "atomic_dir", "cache_dir", "disk_error", "exclusive",
           "prepare_output", "writing"]


class BusyError(UserError):
    """Another process is writing the same output; the message names it."""


class OutputError(UserError):
    """The place written to refused the write (full, file too large, read-only)."""


# Errors of the place written to, not of memlens. Libraries report them differently:
# OSError with an errno (Python, pyarrow), "(os error N)" in the text (safetensors), or a
# short write without an errno (numpy).
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES}
_DISK_TEXT = re.compile(r"os error (\d+)|errno (\d+)|requested and \d+ written")


def disk_error(exc: BaseException) -> str | None:
    """Why ``exc`` is a failed write of the disk's making (e.g. "No space left on device"),
    or None when it is anything else."""
    if isinstance(exc, OSError) and exc.errno in _DISK_ERRNOS:
        return os.strerror(exc.errno)
    match = _DISK_TEXT.search(str(exc)) if isinstance(exc, Exception) else None
    if match is None:
        return None
    if not (match.group(1) or match.group(2)):
        return "the disk took only part of a write (no space left?)"
    code = int(match.group(1) or match.group(2))
    return os.strerror(code) if code in _DISK_ERRNOS else None


@contextmanager
def writing(out: str | Path) -> Iterator[None]:
    """Report a write the disk refused as an :class:`OutputError` naming ``out`` and the fix.

    Example:
        >>> with writing(out):
        ...     save_file(tensors, out)   # no space: "could not write OUT: No space left ..."
    """
    try:
        yield
    except Exception as exc:
        reason = disk_error(exc)
        if reason is None:
            raise
        raise OutputError(f"could not write {out}: {reason}. Free space or choose another "
                          "output, then rerun the same command (finished work is kept)"
                          ) from exc


def _lock_paths(path: Path) -> tuple[Path, Path]:
    """The lock and holder files of ``path``: in the cache's ``locks/`` folder, named by a
    hash of the absolute path, so that no lock file litters the user's output directory."""
    path = Path(path).absolute()
    name = f"{path.name[:40]}-{hashlib.sha256(str(path).encode()).hexdigest()[:16]}"
    locks = cache_dir() / "locks"
    try:
        locks.mkdir(parents=True, exist_ok=True)
    except OSError:  # a read-only cache: the machine's temporary folder
        locks = Path(tempfile.gettempdir()) / "memlens-locks"
        locks.mkdir(exist_ok=True)
    return locks / f"{name}.lock", locks / f"{name}.holder"


def _holder_text(holder: Path) -> str:
    try:
        info = json.loads(holder.read_text())
        return (f"process {info['pid']} on {info['host']} ({info['command']}, since "
                f"{time.strftime('%H:%M:%S', time.localtime(info['since']))})")
    except (OSError, ValueError, KeyError):
        return "another process"


def cache_dir() -> Path:
    """Where memlens caches models it builds (organisms, packaged pretrained models):
    ``$MEMLENS_CACHE`` or ``~/.cache/memlens``."""
    return Path(os.environ.get("MEMLENS_CACHE", Path.home() / ".cache" / "memlens"))


@contextmanager
def exclusive(path: str | Path, what: str, wait: bool = False) -> Iterator[None]:
    """Hold the write lock of ``path`` (a directory or file) while the block runs (the lock
    file lives in the cache, see :func:`_lock_paths`).

    Held by another process: with ``wait`` block until it is free (a cache entry being
    built), else refuse with a :class:`BusyError` naming the holder. The lock is an OS file
    lock, so a killed holder releases it and nothing stale remains.
    """
    lock_file, holder = _lock_paths(Path(path))
    lock = FileLock(lock_file, timeout=-1 if wait else 0)
    try:
        lock.acquire()
    except Timeout:
        raise BusyError(f"{path} is being written by {_holder_text(holder)}; wait for it to "
                        f"finish or choose another output") from None
    try:
        with writing(path):
            holder.write_text(jsonio.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                          "command": what, "since": time.time()}))
        yield
    finally:
        holder.unlink(missing_ok=True)
        lock.release()


def prepare_output(out: str | Path, kind: str, marker: str | None = None,
                   is_file: bool = False, allowed: tuple[str, ...] = ()) -> Path:
    """Check an output path before any compute: not an existing file where a directory is
    wanted (or the reverse), its parent writable, and an existing directory empty or
    holding an artifact of the same ``kind`` (named by its ``marker`` file, resumed or
    replaced) or only the entries named in ``allowed``. Returns the path; creates nothing."""
    out = Path(out)
    if is_file:
        if out.is_dir():
            raise ConfigError(f"--out {out} is a directory; name a file for the {kind}")
    elif out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; name a directory for the {kind}")
    elif out.is_dir() and any(p for p in out.iterdir()
                              if not p.name.startswith(".") and p.name not in allowed):
        if not (marker and (out / marker).is_file()):
            raise ConfigError(f"--out {out} already holds other files (no {marker}); choose "
                              f"an empty or new directory for the {kind}")
        try:
            meta = json.loads((out / marker).read_text())
            Identity.from_json(meta.get("identity"), str(out)).expect_kind(kind, str(out))
        except (ValueError, AttributeError):
            raise ConfigError(f"--out {out} holds a {marker} that is not a memlens {kind} "
                              "artifact; choose an empty or new directory") from None
    parent = out.parent if not out.exists() else out
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"--out {out}: {parent} is not writable; choose a writable place")
    return out


@contextmanager
def atomic_dir(out: str | Path) -> Iterator[Path]:
    """Write a directory whole or not at all: the block fills a temporary sibling, which
    replaces ``out`` only when the block finishes. Yields the temporary directory."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        with writing(out):
            tmp.mkdir(parents=True)
            yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.with_name(f".{out.name}.old")
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
