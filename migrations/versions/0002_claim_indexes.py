"""Indexes a drain can afford, and a claim that starts its jobs at once.

- ix_jobs_status_finished (status, finished_at) gives way to ix_jobs_finished
  (finished_at) over final jobs only. With an index that starts with status,
  SQLite's planner (which has no statistics) served the claim and its
  compare-and-set updates by scanning every PENDING row; and every status
  change paid for an entry in it.
- ix_jobs_action is dropped: `list --action` reads newest first by id, and
  every status change paid for an entry in it too.
- ix_jobs_expiry: only PENDING jobs with a max start time, for the expiry
  sweep, which scanned every PENDING job.
- A runner claims and starts a job in one statement (PENDING -> RUNNING);
  the event trigger then records the claim (QUEUED) before the start, so the
  timeline still reads PENDING, QUEUED, RUNNING.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""
from alembic import op
import sqlalchemy as sa

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

FINAL = sa.text(
    "status IN ('CANCELED', 'SUCCESS', 'WARNING', 'FAILURE', 'EXPIRED', 'ABANDONED')")
EXPIRY = sa.text("status = 'PENDING' AND max_start_at IS NOT NULL")

EVENT_COLUMNS = "job_id, at, status, previous, runner_id, attempt, note"

PG_FUNCTION = f"""
CREATE OR REPLACE FUNCTION runjobs_job_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND OLD.status = 'PENDING' AND NEW.status = 'RUNNING' THEN
        INSERT INTO job_events ({EVENT_COLUMNS})
        VALUES (NEW.id, NEW.queued_at, 'QUEUED', 'PENDING', NEW.runner_id, OLD.attempt, NULL);
    END IF;
    INSERT INTO job_events ({EVENT_COLUMNS})
    VALUES (NEW.id, NEW.updated_at, NEW.status,
            CASE WHEN TG_OP = 'INSERT' THEN NULL
                 WHEN OLD.status = 'PENDING' AND NEW.status = 'RUNNING' THEN 'QUEUED'
                 ELSE OLD.status END,
            NEW.runner_id, NEW.attempt,
            CASE WHEN TG_OP = 'INSERT' OR NEW.error IS DISTINCT FROM OLD.error
                 THEN NEW.error END);
    RETURN NULL;
END $$;
"""

PG_FUNCTION_0001 = f"""
CREATE OR REPLACE FUNCTION runjobs_job_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO job_events ({EVENT_COLUMNS})
    VALUES (NEW.id, NEW.updated_at, NEW.status,
            CASE WHEN TG_OP = 'UPDATE' THEN OLD.status END,
            NEW.runner_id, NEW.attempt,
            CASE WHEN TG_OP = 'INSERT' OR NEW.error IS DISTINCT FROM OLD.error
                 THEN NEW.error END);
    RETURN NULL;
END $$;
"""

SQLITE_TRIGGER = f"""
CREATE TRIGGER jobs_event_update AFTER UPDATE OF status ON jobs
WHEN OLD.status IS NOT NEW.status OR OLD.attempt IS NOT NEW.attempt BEGIN
    INSERT INTO job_events ({EVENT_COLUMNS})
    SELECT NEW.id, NEW.queued_at, 'QUEUED', 'PENDING', NEW.runner_id, OLD.attempt, NULL
    WHERE OLD.status = 'PENDING' AND NEW.status = 'RUNNING';
    INSERT INTO job_events ({EVENT_COLUMNS})
    VALUES (NEW.id, NEW.updated_at, NEW.status,
            CASE WHEN OLD.status = 'PENDING' AND NEW.status = 'RUNNING' THEN 'QUEUED'
                 ELSE OLD.status END,
            NEW.runner_id, NEW.attempt,
            CASE WHEN NEW.error IS NOT OLD.error THEN NEW.error END);
END
"""

SQLITE_TRIGGER_0001 = f"""
CREATE TRIGGER jobs_event_update AFTER UPDATE OF status ON jobs
WHEN OLD.status IS NOT NEW.status OR OLD.attempt IS NOT NEW.attempt BEGIN
    INSERT INTO job_events ({EVENT_COLUMNS})
    VALUES (NEW.id, NEW.updated_at, NEW.status, OLD.status, NEW.runner_id,
            NEW.attempt, CASE WHEN NEW.error IS NOT OLD.error THEN NEW.error END);
END
"""


def upgrade() -> None:
    op.drop_index("ix_jobs_status_finished", table_name="jobs")
    op.drop_index("ix_jobs_action", table_name="jobs")
    op.create_index("ix_jobs_finished", "jobs", ["finished_at"],
                    postgresql_where=FINAL, sqlite_where=FINAL)
    op.create_index("ix_jobs_expiry", "jobs", ["max_start_at"],
                    postgresql_where=EXPIRY, sqlite_where=EXPIRY)
    _replace_trigger(PG_FUNCTION, SQLITE_TRIGGER)


def downgrade() -> None:
    _replace_trigger(PG_FUNCTION_0001, SQLITE_TRIGGER_0001)
    op.drop_index("ix_jobs_expiry", table_name="jobs")
    op.drop_index("ix_jobs_finished", table_name="jobs")
    op.create_index("ix_jobs_action", "jobs", ["action"])
    op.create_index("ix_jobs_status_finished", "jobs", ["status", "finished_at"])


def _replace_trigger(pg_function: str, sqlite_trigger: str) -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(pg_function)  # the triggers call it by name
    else:
        op.execute("DROP TRIGGER jobs_event_update")
        op.execute(sqlite_trigger)
