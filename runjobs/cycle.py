"""`runjobs run`: take the host's lock, run one cycle, exit.

Every cycle is a fresh process, so memory leaked by actions never builds up.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
import time

from .config import Settings
from .lock import CycleLock

log = logging.getLogger("runjobs.runner")


def setup_logging(settings: Settings) -> None:
    """runjobs.log in the log folder; also stderr when a person is watching."""
    path = settings.log_dir / "runjobs.log"
    settings.access.touch(path)
    formatter = logging.Formatter("%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s")
    handlers: list[logging.Handler] = [logging.handlers.WatchedFileHandler(path)]
    if sys.stderr.isatty() or os.environ.get("RUNJOBS_LOG_STDERR"):
        handlers.append(logging.StreamHandler(sys.stderr))
    root = logging.getLogger("runjobs")
    root.setLevel(settings.log_level.upper())
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)


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
