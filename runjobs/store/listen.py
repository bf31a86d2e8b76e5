"""LISTEN for NOTIFY on PostgreSQL: new jobs and cancels wake idle runners
at once instead of at their next poll."""

from __future__ import annotations

import logging
import select
import threading
from typing import Callable

import sqlalchemy as sa

log = logging.getLogger("runjobs.store")


class Listener(threading.Thread):
    """LISTEN on its own connection; reconnects with backoff when it drops.
    Polling stays the fallback, so a lost notification only costs latency."""

    def __init__(self, engine: sa.engine.Engine, channel: str,
                 on_notify: Callable[[str], None]) -> None:
        super().__init__(name="listener", daemon=True)
        self.engine, self.channel, self.on_notify = engine, channel, on_notify
        self._stopped = threading.Event()

    def run(self) -> None:
        backoff = 0.5
        while not self._stopped.is_set():
            try:
                self._listen()
                backoff = 0.5
            except Exception as exc:  # the database dropped us: retry, quietly
                log.debug("listener: %s; reconnecting in %.1fs", exc, backoff)
                self._stopped.wait(backoff)
                backoff = min(backoff * 2, 10.0)

    def _listen(self) -> None:
        raw = self.engine.raw_connection()
        try:
            driver = raw.driver_connection
            driver.autocommit = True
            with driver.cursor() as cursor:
                cursor.execute(f"LISTEN {self.channel}")
            while not self._stopped.is_set():
                if select.select([driver], [], [], 1.0)[0]:
                    driver.poll()
                    payloads = {n.payload for n in driver.notifies}
                    driver.notifies.clear()
                    for payload in payloads:
                        self.on_notify(payload)
        finally:
            raw.invalidate()  # never hand a LISTENing connection back to the pool

    def stop(self) -> None:
        self._stopped.set()

