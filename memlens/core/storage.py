"""Writing artifacts safely: one writer at a time, outputs checked before any compute,
directories written whole or not at all.

Example:
    >>> out = prepare_output(Path("labels/"), "labels", marker="summary.json")
    >>> with exclusive(out, "memlens label"), atomic_dir(out) as tmp:
    ...     (tmp / "summary.json").write_text(text)   # out appears whole, or not at all
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from memlens.core.errors import ConfigError, UserError
from memlens.core.identity import Identity


class BusyError(UserError):
    """Another process is writing the same output; the message names it."""


def _lock_paths(path: Path) -> tuple[Path, Path]:
    path = Path(path)
    return (path.with_name(f".{path.name}.lock"), path.with_name(f".{path.name}.holder"))


def _holder_text(holder: Path) -> str:
    try:
        info = json.loads(holder.read_text())
        return (f"process {info['pid']} on {info['host']} ({info['command']}, since "
                f"{time.strftime('%H:%M:%S', time.localtime(info['since']))})")
    except (OSError, ValueError, KeyError):
        return "another process"


@contextmanager
def exclusive(path: str | Path, what: str, wait: bool = False) -> Iterator[None]:
    """Hold the write lock of ``path`` (a directory or file) while the block runs.

    Held by another process: with ``wait`` block until it is free (a cache entry being
    built), else refuse with a :class:`BusyError` naming the holder. The lock is an OS file
    lock, so a killed holder releases it and nothing stale remains.
    """
    lock_file, holder = _lock_paths(Path(path))
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(lock_file, timeout=-1 if wait else 0)
    try:
        lock.acquire()
    except Timeout:
        raise BusyError(f"{path} is being written by {_holder_text(holder)}; wait for it to "
                        f"finish or choose another output") from None
    try:
        holder.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
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
    import shutil

    out = Path(out)
    tmp = out.with_name(f".{out.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
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
