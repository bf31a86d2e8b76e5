"""A submit writes the job's row only: its first event is read from the row.

The insert trigger wrote a job_events row for every submit: status PENDING
(or HELD), no previous status, no runner, attempt 0, no note, at the job's
created_at. All of it is in the job's row already, and its first status is
the `previous` of its first change (or its status, if it has not changed).
That row cost a single submit on SQLite a quarter of its time: two more
B-tree pages written per commit. The store now builds that first event
when it reads a timeline (Store.job_events); jobs submitted before this
revision keep their stored one.

- SQLite: the insert trigger goes.
- PostgreSQL: the insert trigger only sends the NOTIFY that wakes idle
  runners, and needs no transition table for it.

Downgrade restores 0003's triggers. Jobs submitted while at 0004 then have
no submit event: their timelines start at their first change.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22
"""
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

PG_UPGRADE = """
DROP TRIGGER jobs_inserted ON jobs;
CREATE OR REPLACE FUNCTION runjobs_jobs_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('runjobs', 'submit');
    RETURN NULL;
END $$;
CREATE TRIGGER jobs_inserted AFTER INSERT ON jobs
    FOR EACH STATEMENT EXECUTE FUNCTION runjobs_jobs_inserted();
"""

# 0003's insert function and trigger, as it wrote them.
PG_DOWNGRADE = """
DROP TRIGGER jobs_inserted ON jobs;
CREATE OR REPLACE FUNCTION runjobs_jobs_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO job_events (job_id, at, status, previous, runner_id, attempt, note)
    SELECT id, updated_at, status, NULL, runner_id, attempt, error
      FROM new_rows ORDER BY id;
    IF FOUND THEN
        PERFORM pg_notify('runjobs', 'submit');
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER jobs_inserted AFTER INSERT ON jobs
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT
    EXECUTE FUNCTION runjobs_jobs_inserted();
"""

# 0001's insert trigger, as it wrote it.
SQLITE_DOWNGRADE = """
CREATE TRIGGER jobs_event_insert AFTER INSERT ON jobs BEGIN
    INSERT INTO job_events (job_id, at, status, previous, runner_id, attempt, note)
    VALUES (NEW.id, NEW.updated_at, NEW.status, NULL, NEW.runner_id, NEW.attempt,
            NEW.error);
END
"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(PG_UPGRADE)
    else:
        op.execute("DROP TRIGGER jobs_event_insert")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(PG_DOWNGRADE)
    else:
        op.execute(SQLITE_DOWNGRADE)
