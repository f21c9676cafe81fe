"""An exclusive lock between the processes of one machine: flock on a local file (build dirs, caches)."""

from __future__ import annotations

import fcntl
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# locks this process holds, with their depth: taking one again inside its own block does not wait on itself
_held: dict[Path, int] = {}


@contextmanager
def file_lock(lock: Path, waiting: str | None = None) -> Iterator[None]:
    """Hold an exclusive flock on `lock` (created with its folder when missing) for the duration of the block.

    Reentrant within a process. With `waiting`, a lock another process holds is reported on stderr before the wait."""
    key = lock.resolve() if lock.exists() else lock.absolute()
    if _held.get(key, 0) > 0:
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting:
                print(waiting, file=sys.stderr)
            fcntl.flock(fh, fcntl.LOCK_EX)
        _held[key] = 1
        try:
            yield
        finally:
            _held.pop(key, None)
            fcntl.flock(fh, fcntl.LOCK_UN)
