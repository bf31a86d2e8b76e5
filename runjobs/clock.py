"""The runner's two clocks, injectable so a test can drive `Runner.tick`.

The wall clock decides the cycle's deadline (cron fires by it); the
monotonic one measures timeouts, grace periods and the runner's duties,
which a change of the wall clock must not stretch or cut. Job times in the
database (run_at, heartbeats) are the database's clock, not these.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable


@dataclasses.dataclass(frozen=True)
class Clock:
    wall: Callable[[], float] = time.time
    monotonic: Callable[[], float] = time.monotonic


SYSTEM_CLOCK = Clock()
