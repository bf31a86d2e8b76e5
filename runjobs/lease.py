"""A runner's heartbeat, and the lease it buys: how the runner knows its
jobs are still its own.

Another runner declares this one dead only once its last heartbeat is
`heartbeat_timeout` old, so for `heartbeat_timeout - heartbeat_interval`
after a heartbeat was written (the lease) no one can have. After that (a
heartbeat late, or the whole process stopped, e.g. by SIGSTOP) the loop
asks the database before it reaps or writes; a check every round would cost
a drain of short jobs a query per round.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from .clock import Clock
from .errors import StoreError
from .store import Store

log = logging.getLogger("runjobs.runner")


class Lease:
    def __init__(self, heartbeat_timeout: float, heartbeat_interval: float, clock: Clock) -> None:
        self.length = heartbeat_timeout - heartbeat_interval
        self.clock = clock
        self.until = clock.monotonic() + self.length
        self.dead_heard = threading.Event()    # set by the heartbeat thread

    def beat_recorded(self, begun: float) -> None:
        """A heartbeat that started at `begun` (monotonic) was written: no one
        can declare this runner dead for the next lease."""
        self.until = max(self.until, begun + self.length)

    def held(self, now: float) -> bool:
        return now < self.until

    def end(self) -> None:
        """Ask the database at the next round (a write found the job gone)."""
        self.until = 0.0

    def overdue_by(self, now: float) -> float:
        """Seconds since the last recorded heartbeat."""
        return now - self.until + self.length


class Heartbeat(threading.Thread):
    """Beats from its own thread so a busy loop or a long job cannot starve it.
    A beat that finds the runner declared dead says so (`on_dead`) and stops:
    after a SIGSTOP that is the first thing to run, one interval at most."""

    def __init__(self, store: Store, runner_id: int, interval: float, lease: Lease,
                 on_dead: Callable[[], None]) -> None:
        super().__init__(name="heartbeat", daemon=True)
        self.store, self.runner_id, self.interval = store, runner_id, interval
        self.lease, self.on_dead = lease, on_dead
        self._stopped = threading.Event()
        self._failing = False

    def run(self) -> None:
        while not self._stopped.wait(self.interval):
            begun = self.lease.clock.monotonic()
            try:
                alive = self.store.runner_heartbeat(self.runner_id)
            except StoreError as exc:
                if not self._failing:
                    log.error("runner %s: heartbeat failed: %s", self.runner_id, exc)
                self._failing = True
                continue
            if not alive:
                self.lease.dead_heard.set()
                self.on_dead()
                return
            self.lease.beat_recorded(begun)
            if self._failing:
                log.info("runner %s: heartbeat recorded again", self.runner_id)
            self._failing = False

    def stop(self) -> None:
        self._stopped.set()
