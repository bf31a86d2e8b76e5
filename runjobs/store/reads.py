"""Reads for people and for the runner's checks: a job, its timeline,
listings. Each runs in a read transaction (no write lock on SQLite, READ
ONLY on PostgreSQL)."""

from __future__ import annotations

from typing import Sequence

import sqlalchemy as sa

from ..errors import NotFound
from ..models import Event, Job, Status
from ..schema import ACTIVE_STATUSES, job_events, jobs
from .connections import Connections
from .shared import job_of, status_is


class ReadQueries(Connections):
    """What `show`, `list` and the runner's checks read."""

    def job_get(self, job_id: int) -> Job:
        """The job; raises NotFound."""
        with self._read_tx() as conn:
            row = conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).first()
        if row is None:
            raise NotFound(f"job {job_id} does not exist")
        return job_of(row)

    def job_status(self, job_id: int) -> Status:
        with self._read_tx() as conn:
            value = conn.execute(sa.select(jobs.c.status).where(jobs.c.id == job_id)).scalar()
        if value is None:
            raise NotFound(f"job {job_id} does not exist")
        return Status(value)

    def job_events(self, job_id: int) -> list[Event]:
        """The job's timeline, oldest first; empty for an unknown job.

        A submit stores no event (migration 0004): its line is built from
        the job's row, with the status the job's first change started from.
        A job submitted before 0004 has it stored, as the event with no
        previous status."""
        with self._read_tx() as conn:
            job = conn.execute(sa.select(jobs.c.created_at, jobs.c.status)
                               .where(jobs.c.id == job_id)).first()
            rows = conn.execute(
                sa.select(job_events).where(job_events.c.job_id == job_id)
                .order_by(job_events.c.id)
            ).all()
        changes = [Event(r.at, Status(r.status), Status(r.previous) if r.previous else None,
                         r.runner_id, r.attempt, r.note) for r in rows]
        if job is None or (changes and changes[0].previous is None):
            return changes
        first = changes[0].previous if changes else Status(job.status)
        return [Event(job.created_at, first, None, None, 0, None), *changes]

    def jobs_list(self, statuses: Sequence[Status] = (), action: str | None = None,
                  limit: int = 50) -> list[Job]:
        """Jobs, newest first."""
        query = sa.select(jobs).order_by(jobs.c.id.desc()).limit(limit)
        if statuses:
            query = query.where(jobs.c.status.in_([s.value for s in statuses]))
        if action:
            query = query.where(jobs.c.action == action)
        with self._read_tx() as conn:
            return [job_of(r) for r in conn.execute(query)]

    def jobs_count_active(self, node: str) -> int:
        with self._read_tx() as conn:
            return conn.execute(
                sa.select(sa.func.count()).select_from(jobs)
                .where(jobs.c.node == node, status_is(jobs.c.status, ACTIVE_STATUSES))
            ).scalar_one()

