"""One writer per output directory: a lock file held with ``flock`` while a build writes.

Two builds into the same directory would interleave their stages (each stage's own
writes are transactions, but a render could read a store that another process is halfway
through rebuilding), so the second is refused. The lock is ``DIR/.atlas.lock``, held with
``fcntl.flock`` on an open descriptor: the kernel releases it when the process ends, however
it ends, so a killed build never leaves a stale lock behind. The file holds the holder's pid,
for the message. Within one process the lock is re-entrant (``build`` holds it across its
stages, and each stage takes it again).
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from atlas.errors import AtlasError

LOCK_NAME = ".atlas.lock"
_held: dict[Path, list[int]] = {}      # lock path -> [fd, depth], for this process


@contextmanager
def output_lock(out: str | Path) -> Iterator[None]:
    """Hold ``out``'s build lock for the ``with`` block, or raise AtlasError if another process has it."""
    path = (Path(out) / LOCK_NAME).resolve()
    if path in _held:
        _held[path][1] += 1
    else:
        _held[path] = [_acquire(path, Path(out)), 1]
    try:
        yield
    finally:
        entry = _held[path]
        entry[1] -= 1
        if entry[1] == 0:
            del _held[path]
            os.close(entry[0])          # closing the descriptor releases the flock


def _acquire(path: Path, out: Path) -> int:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise AtlasError(f"cannot create the lock file {path}: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise AtlasError(f"another atlas build is running in {out} (pid {holder}); "
                         "wait for it to finish or use another --out") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
