"""SQL pieces the store's query modules share: status conditions written so
SQLite's partial indexes serve them, the claim order, a row made a Job."""

from __future__ import annotations

import sqlalchemy as sa

from ..capacity import needs_of
from ..models import Job, Status
from ..schema import ACTIVE_STATUSES, jobs

PENDING = (Status.PENDING.value,)
RUNNING = (Status.RUNNING.value, Status.TO_CANCEL.value)
TO_CANCEL = (Status.TO_CANCEL.value,)
# The claim order: best priority, then run_at, then id (ix_jobs_pending).
ORDER = (jobs.c.priority.desc(), jobs.c.run_at, jobs.c.id)


def status_is(column: sa.ColumnElement, statuses: tuple[str, ...]) -> sa.ColumnElement:
    """`status = 'X'` or `status IN (...)` with the values written into the
    SQL, not bound, in the given order: SQLite uses a partial index only for
    a query that names the index's own values (see schema.ACTIVE_STATUSES)."""
    values = [sa.literal_column(f"'{status}'") for status in statuses]
    return column == values[0] if len(values) == 1 else column.in_(values)


def held_by(runner_id: int) -> sa.ColumnElement:
    """A runner's QUEUED/RUNNING/TO_CANCEL jobs, in a form ix_jobs_active
    serves on SQLite too."""
    return sa.and_(jobs.c.runner_id == runner_id, status_is(jobs.c.status, ACTIVE_STATUSES))


def default_needs(needs: sa.ColumnElement) -> sa.ColumnElement:
    """SQL for what `needs_of` reads as the default needs: none stored, a
    JSON null or an empty object. Any other spelling counts as other needs,
    which only sends the claim the longer way."""
    return sa.or_(needs.is_(None), sa.cast(needs, sa.Text).in_(("null", "{}")))


def job_of(row: sa.Row) -> Job:
    """A whole row of jobs as a Job."""
    values = row._asdict()
    values["status"] = Status(values["status"])
    values["needs"] = needs_of(values["needs"])
    values["params"] = values["params"] or {}
    for column in ("cron_id", "cron_fire_at", "crashes", "pgid", "pgid_runner"):
        values.pop(column, None)
    return Job(**values)


# The node's QUEUED/RUNNING jobs, beside the candidates in one statement.
active = jobs.alias("active")
# The columns a runner needs of a job it starts (`ClaimQueries._started`).
STARTED = (jobs.c.id, jobs.c.action, jobs.c.params, jobs.c.priority, jobs.c.attempt,
           jobs.c.retries, jobs.c.timeout, jobs.c.needs)
