"""Job control: cancel, expiry, progress. (Hold, release, rerun and
reschedule belong here too.)"""

from __future__ import annotations

import sqlalchemy as sa

from ..errors import Conflict, NotFound
from ..models import Status
from ..schema import jobs
from .connections import Connections
from .shared import PENDING, held_by, status_is


class ControlQueries(Connections):
    """Changes a person (or the runner) asks of one job."""

    def job_progress(self, job_id: int, done: float | None, total: float | None,
                     message: str | None) -> None:
        with self._tx() as conn:
            conn.execute(
                sa.update(jobs).where(jobs.c.id == job_id)
                .values(progress_done=done, progress_total=total, progress_message=message)
            )

    def jobs_expire(self) -> int:
        """PENDING jobs past their max_start_at -> EXPIRED."""
        with self._tx() as conn:
            now = self.dialect.now()
            return conn.execute(
                sa.update(jobs)
                .where(status_is(jobs.c.status, PENDING), jobs.c.max_start_at < now)
                .values(status=Status.EXPIRED.value, finished_at=now, updated_at=now,
                        error="not started before its max start time")
            ).rowcount

    def jobs_canceling(self, runner_id: int) -> list[int]:
        """Ids of this runner's jobs a person asked to cancel."""
        with self._read_tx() as conn:
            return list(conn.execute(
                sa.select(jobs.c.id).where(held_by(runner_id),
                                           jobs.c.status == Status.TO_CANCEL.value)
            ).scalars())

    def job_cancel(self, job_id: int) -> Status:
        """HELD/PENDING -> CANCELED; QUEUED/RUNNING -> TO_CANCEL.

        Returns the new status. Raises NotFound, or Conflict for a final job.
        """
        with self._tx() as conn:
            now = self.dialect.now()
            at_once = conn.execute(
                sa.update(jobs)
                .where(jobs.c.id == job_id,
                       jobs.c.status.in_([Status.HELD.value, Status.PENDING.value]))
                .values(status=Status.CANCELED.value, finished_at=now, updated_at=now,
                        error="canceled before it started")
            ).rowcount
            if at_once:
                return Status.CANCELED
            later = conn.execute(
                sa.update(jobs)
                .where(jobs.c.id == job_id,
                       jobs.c.status.in_([Status.QUEUED.value, Status.RUNNING.value]))
                .values(status=Status.TO_CANCEL.value, updated_at=now)
            ).rowcount
            if later:
                self.dialect.notify(conn, "cancel")
                return Status.TO_CANCEL
            current = conn.execute(sa.select(jobs.c.status).where(jobs.c.id == job_id)).scalar()
        if current is None:
            raise NotFound(f"job {job_id} does not exist")
        if current == Status.TO_CANCEL.value:
            return Status.TO_CANCEL
        raise Conflict(f"job {job_id} is {current}: it cannot be canceled")

