"""The host's claim lock: one claiming runner per lock file.

filelock holds the lock itself; who holds it (pid, since when) is written
beside it, because the lock file is truncated by every process that tries it.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

from filelock import FileLock, Timeout

from .files import Access


class CycleLock:
    def __init__(self, path: Path, access: Access | None = None) -> None:
        self.path = path
        self.owner_path = path.with_name(path.name + ".owner")
        self.access = access or Access()
        self._lock: FileLock | None = None

    def acquire(self) -> bool:
        """Take the lock without waiting; False when another process holds it."""
        if not self.path.exists():
            self.access.touch(self.path)
        lock = FileLock(str(self.path), timeout=0, mode=self.access.file_mode)
        try:
            lock.acquire()
        except Timeout:
            return False
        self._lock = lock
        owner = {"pid": os.getpid(),
                 "since": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        fd = self.access.open_file(self.owner_path, os.O_WRONLY | os.O_TRUNC)
        with os.fdopen(fd, "w") as handle:
            json.dump(owner, handle)
        return True

    def holder(self) -> str:
        """Who holds the lock, for a person: 'pid 123 since 2026-...'."""
        try:
            owner = json.loads(self.owner_path.read_text())
            return f"pid {owner['pid']} since {owner['since']}"
        except (OSError, ValueError, KeyError):
            return "another process (no owner record)"

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    @property
    def held(self) -> bool:
        return self._lock is not None
