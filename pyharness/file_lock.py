"""An exclusive lock between the processes of one machine: flock on a local file (build dirs, caches)."""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def file_lock(lock: Path) -> Iterator[None]:
    """Hold an exclusive flock on `lock` (created with its folder when missing) for the duration of the block."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
