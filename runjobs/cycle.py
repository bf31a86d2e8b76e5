"""`runjobs run`: take the host's lock, run one cycle, exit.

Every cycle is a fresh process, so memory leaked by actions never builds up.
"""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import os
import sys
import time
from pathlib import Path

from .config import Settings
from .lock import CycleLock

log = logging.getLogger("runjobs.runner")


def setup_logging(settings: Settings) -> None:
    """runjobs.log in the log folder; also stderr when a person is watching."""
    path = settings.log_dir / "runjobs.log"
    to_stderr = sys.stderr.isatty() or bool(os.environ.get("RUNJOBS_LOG_STDERR"))
    formatter = logging.Formatter("%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s")
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setFormatter(formatter)
    handlers: list[logging.Handler] = [stderr] if to_stderr else []
    try:
        settings.access.touch(path)
        handlers.append(RunnerLog(path, fallback=None if to_stderr else stderr))
    except OSError as exc:
        # The jobs matter more than their runner's log: run, and say so.
        _say(f"runjobs: cannot open {path} ({exc.strerror}); the runner logs to stderr")
        handlers = [stderr]
    root = logging.getLogger("runjobs")
    root.setLevel(settings.log_level.upper())
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)


class RunnerLog(logging.handlers.WatchedFileHandler):
    """runjobs.log, which may be on a full disk too (the job logs' disk). A
    line it cannot take goes to `fallback` (stderr, which cron mails), with
    one line first that says why, instead of logging's traceback per line;
    with no fallback (stderr has every line already) only that one line.
    The file is tried again for each line, so it takes lines again once
    there is space."""

    def __init__(self, path: Path, fallback: logging.Handler | None) -> None:
        super().__init__(path)
        self._fallback = fallback
        self._said = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            super().emit(record)  # errors in writing go to handleError
        except OSError:  # in reopening the file, after logrotate moved it
            self.handleError(record)

    def handleError(self, record: logging.LogRecord) -> None:
        exc = sys.exc_info()[1]
        if not isinstance(exc, OSError):
            super().handleError(record)
            return
        stream, self.stream = self.stream, None
        if stream is not None:
            # With what it could not write: not retried ahead of the next line.
            with contextlib.suppress(OSError):
                stream.close()
        if not self._said:
            self._said = True
            where = "its lines follow on stderr" if self._fallback else "its lines are on stderr"
            _say(f"runjobs: cannot write {self.baseFilename} ({exc.strerror}); {where}")
        if self._fallback is not None:
            self._fallback.handle(record)


def _say(line: str) -> None:
    with contextlib.suppress(OSError, ValueError):  # stderr closed: nowhere left to say it
        print(line, file=sys.stderr, flush=True)


def run_cycle(settings: Settings, once: bool = False) -> int:
    """Run one cycle; returns the process exit code."""
    lock = CycleLock(settings.lock_file, settings.access)
    if not lock.acquire():
        print(f"runjobs: {settings.lock_file} is held by {lock.holder()}; nothing to do",
              file=sys.stderr)
        return 0
    try:
        return _run_locked(settings, lock, once)
    finally:
        lock.release()


def _run_locked(settings: Settings, lock: CycleLock, once: bool) -> int:
    from .actions import Registry
    from .runner import Runner, cycle_deadline, install_signal_handlers
    from .store import open_store

    setup_logging(settings)
    deadline = None if once else cycle_deadline(time.time(), settings.period, settings.margin)
    store = open_store(settings)
    try:
        runner = Runner(settings, store, Registry(settings))
        install_signal_handlers(runner)
        runner.run(deadline, once=once, on_stop_claiming=lock.release)
    finally:
        store.dispose()
    if runner.abandoned:
        # A thread stuck in C code could hold up the interpreter's exit:
        # leave now, its job is already recorded.
        logging.shutdown()
        os._exit(0)
    return 0
