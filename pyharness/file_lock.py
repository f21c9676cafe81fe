"""An exclusive lock between the processes of one machine: flock on a local file (build dirs, caches)."""

from __future__ import annotations

import fcntl
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# locks this thread holds, with their depth: taking one again inside its own block does not wait on itself (other
# threads open the file anew, and flock keeps them out as it keeps out other processes)
_local = threading.local()


def _held() -> dict[Path, int]:
    if not hasattr(_local, "held"):
        _local.held = {}
    return _local.held


@contextmanager
def file_lock(lock: Path, waiting: str | None = None) -> Iterator[None]:
    """Hold an exclusive flock on `lock` (created with its folder when missing) for the duration of the block.

    Reentrant within a thread; exclusive between threads and processes. With `waiting`, a lock held elsewhere is
    reported on stderr before the wait."""
    held = _held()
    key = lock.absolute()
    if held.get(key, 0) > 0:
        held[key] += 1
        try:
            yield
        finally:
            held[key] -= 1
        return
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting:
                print(waiting, file=sys.stderr)
            fcntl.flock(fh, fcntl.LOCK_EX)
        held[key] = 1
        try:
            yield
        finally:
            held.pop(key, None)
            fcntl.flock(fh, fcntl.LOCK_UN)
