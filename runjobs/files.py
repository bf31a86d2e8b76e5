"""The files and folders that hold jobs and logs.

Owner only (0600 files, 0700 folders), or owner and the `group` setting's
group (0660, 0770, owned by that group). Modes are set explicitly rather than
left to the umask, which would take a group's write bit away.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class Access:
    file_mode: int = 0o600
    dir_mode: int = 0o700
    gid: int | None = None

    def folder(self, path: Path) -> Path:
        """Create `path` and any missing folder above it, each with our mode."""
        missing = []
        while not path.exists():
            missing.append(path)
            path = path.parent
        for folder in reversed(missing):
            try:
                folder.mkdir(mode=self.dir_mode)
            except FileExistsError:  # made meanwhile by another process
                continue
            self._own(folder, self.dir_mode)
        return path

    def open_file(self, path: Path, flags: int) -> int:
        """A descriptor on `path`; a new file gets our mode and group."""
        self.folder(path.parent)
        try:
            fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, self.file_mode)
        except FileExistsError:
            return os.open(path, flags)
        os.fchmod(fd, self.file_mode)
        if self.gid is not None:
            os.fchown(fd, -1, self.gid)
        return fd

    def touch(self, path: Path) -> None:
        os.close(self.open_file(path, os.O_WRONLY))

    def _own(self, path: Path, mode: int) -> None:
        os.chmod(path, mode)
        if self.gid is not None:
            os.chown(path, -1, self.gid)
