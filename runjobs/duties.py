"""What a runner does now and then besides its round: each duty is due at
its own monotonic time, runs, and says whether it asked the database (an
answer is what tells a runner the database is back).

Not every round: each costs a query, and a drain of short jobs runs
hundreds of rounds a second.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .errors import StoreError

if TYPE_CHECKING:
    from .runner import Runner

log = logging.getLogger("runjobs.runner")


class Duty:
    """Due at `next_at`; once run, due again `interval` seconds later."""

    interval: float

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.next_at = 0.0

    def run_if_due(self, runner: "Runner", now: float) -> bool:
        """Run if due at monotonic `now` and wanted; whether it asked the
        database. A StoreError leaves it due again only after its interval."""
        if now < self.next_at or not self.wanted(runner):
            return False
        self.next_at = now + self.interval
        self.run(runner)
        return True

    def wanted(self, runner: "Runner") -> bool:
        return True

    def run(self, runner: "Runner") -> None:
        raise NotImplementedError


class Expire(Duty):
    """PENDING jobs past their max start -> EXPIRED, while claiming."""

    def wanted(self, runner: "Runner") -> bool:
        return runner.claiming

    def run(self, runner: "Runner") -> None:
        expired = runner.store.jobs_expire()
        if expired:
            log.info("runner %s: %d job(s) expired", runner.runner_id, expired)


class Rescue(Duty):
    """Dead runners' jobs back to PENDING (or an honest end)."""

    def run(self, runner: "Runner") -> None:
        from .rescue import rescue_once

        rescue_once(runner.store, runner.settings, runner.boot_id, runner.runner_id)


class CancelCheck(Duty):
    """Stop the running jobs a person canceled. A NOTIFY of a cancel makes
    it due at once (`hurry`)."""

    def wanted(self, runner: "Runner") -> bool:
        return bool(runner.threads.running)

    def hurry(self) -> None:
        self.next_at = 0.0

    def run(self, runner: "Runner") -> None:
        running = runner.threads.running
        for job_id in runner.store.jobs_canceling(runner.runner_id):
            if job_id in running:
                runner.threads.stop(running[job_id], "canceled")


class Reconcile:
    """After the database came back: a claim or start may have committed
    while its answer was lost. Put back what the database says is this
    runner's but that it does not run. Due once per outage."""

    def __init__(self) -> None:
        self.due = False

    def run_if_due(self, runner: "Runner") -> None:
        if not self.due:
            return
        self.due = False
        try:
            fixed = runner.store.jobs_reconcile(runner.runner_id, list(runner.threads.running))
        except StoreError as exc:
            runner.database_failed(exc)
            return
        if fixed:
            log.warning("runner %s: %d job(s) it had lost track of put back",
                        runner.runner_id, fixed)


def runner_duties(poll_interval: float, heartbeat_interval: float
                  ) -> tuple[CancelCheck, Expire, Rescue]:
    """The periodic duties in the order a round runs them."""
    return (CancelCheck(min(poll_interval, 0.5)), Expire(poll_interval * 5),
            Rescue(heartbeat_interval))
