"""Writing artifacts safely: one writer at a time, outputs checked before any compute,
files written whole or not at all, checksums that catch corruption on load.

Example:
    >>> out = prepare_output(Path("labels/"), "labels", marker="summary.json")
    >>> with exclusive(out, "memlens label"):      # a second writer is refused, by name
    ...     atomic_write_text(out / "summary.json", text)
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from memlens.core.errors import ConfigError, DataError, UserError


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
                   is_file: bool = False) -> Path:
    """Check an output path before any compute: not an existing file where a directory is
    wanted (or the reverse), its parent writable, and an existing directory empty or
    holding an artifact of the same ``kind`` (named by its ``marker`` file, resumed or
    replaced). Returns the path; creates nothing."""
    out = Path(out)
    if is_file:
        if out.is_dir():
            raise ConfigError(f"--out {out} is a directory; name a file for the {kind}")
    elif out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; name a directory for the {kind}")
    elif out.is_dir() and any(out.iterdir()) and not (marker and (out / marker).exists()):
        raise ConfigError(f"--out {out} already holds other files (no {marker}); choose an "
                          f"empty or new directory for the {kind}")
    parent = out.parent if not out.exists() else out
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"--out {out}: {parent} is not writable; choose a writable place")
    return out


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``path`` whole or not at all (a temporary file, then a rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def verify_digests(root: Path, digests: dict[str, str], what: str) -> None:
    """Refuse files under ``root`` that are missing or whose bytes changed."""
    for rel, want in digests.items():
        f = root / rel
        if not f.is_file():
            raise DataError(f"{f} is missing; the {what} is incomplete: make it again")
        if file_digest(f) != want:
            raise DataError(f"{f} does not match its checksum (truncated or corrupted); "
                            f"make the {what} again")


def command_line() -> str:
    return " ".join(Path(sys.argv[0]).name if i == 0 else a for i, a in enumerate(sys.argv))
