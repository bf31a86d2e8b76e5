"""Events without a foreign key, and on PostgreSQL written once per statement.

- job_events.job_id loses its foreign key to jobs. Only the event trigger on
  jobs writes events, always for the row it fires on, so the key could
  never fail; but its check ran for every event (three per job). On
  PostgreSQL each check also locks the job's row, a WAL record per event:
  dropping it bought a runner's drain about 30 %. What the key's ON DELETE
  CASCADE did, a trigger on jobs now does: deleting a job deletes its events.
- PostgreSQL: the row triggers (a plpgsql call per changed job) give way to
  statement triggers that write a statement's events in one INSERT ...
  SELECT from its transition tables; same events, same order. The insert
  trigger also sends the NOTIFY that wakes idle runners, so a submit no
  longer spends a round trip on it. SQLite keeps its row triggers: there a
  trigger is cheap, and SQLite has no statement triggers.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22
"""
import contextlib
import importlib.util
from pathlib import Path

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

PG_FK = "job_events_job_id_fkey"
# Names for the unnamed keys SQLite reflects, so batch mode can drop one.
SQLITE_NAMES = {"fk": "fk_%(table_name)s_%(column_0_name)s"}
SQLITE_FK = "fk_job_events_job_id"

EVENT_COLUMNS = "job_id, at, status, previous, runner_id, attempt, note"

# Events are inserted ordered by job and, for a claim that starts at once,
# QUEUED before RUNNING: a timeline reads in id order.
PG_UPGRADE = f"""
DROP TRIGGER jobs_event_insert ON jobs;
DROP TRIGGER jobs_event_update ON jobs;
DROP FUNCTION runjobs_job_event();

CREATE FUNCTION runjobs_jobs_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO job_events ({EVENT_COLUMNS})
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

CREATE FUNCTION runjobs_jobs_updated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO job_events ({EVENT_COLUMNS})
    SELECT job_id, at, status, previous, runner_id, attempt, note FROM (
        SELECT n.id AS job_id, n.queued_at AS at, 'QUEUED' AS status,
               'PENDING' AS previous, n.runner_id, o.attempt, NULL AS note, 0 AS step
          FROM new_rows n JOIN old_rows o ON o.id = n.id
         WHERE o.status = 'PENDING' AND n.status = 'RUNNING'
        UNION ALL
        SELECT n.id, n.updated_at, n.status,
               CASE WHEN o.status = 'PENDING' AND n.status = 'RUNNING' THEN 'QUEUED'
                    ELSE o.status END,
               n.runner_id, n.attempt,
               CASE WHEN n.error IS DISTINCT FROM o.error THEN n.error END, 1
          FROM new_rows n JOIN old_rows o ON o.id = n.id
         WHERE o.status IS DISTINCT FROM n.status OR o.attempt IS DISTINCT FROM n.attempt
    ) AS changes ORDER BY job_id, step;
    RETURN NULL;
END $$;
CREATE TRIGGER jobs_updated AFTER UPDATE ON jobs
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT
    EXECUTE FUNCTION runjobs_jobs_updated();

CREATE FUNCTION runjobs_jobs_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM job_events WHERE job_id IN (SELECT id FROM gone);
    RETURN NULL;
END $$;
CREATE TRIGGER jobs_deleted AFTER DELETE ON jobs
    REFERENCING OLD TABLE AS gone FOR EACH STATEMENT
    EXECUTE FUNCTION runjobs_jobs_deleted();
"""

PG_DOWNGRADE = """
DROP TRIGGER jobs_inserted ON jobs;
DROP TRIGGER jobs_updated ON jobs;
DROP TRIGGER jobs_deleted ON jobs;
DROP FUNCTION runjobs_jobs_inserted();
DROP FUNCTION runjobs_jobs_updated();
DROP FUNCTION runjobs_jobs_deleted();
"""

SQLITE_DELETE_TRIGGER = """
CREATE TRIGGER jobs_deleted AFTER DELETE ON jobs BEGIN
    DELETE FROM job_events WHERE job_id = OLD.id;
END
"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.drop_constraint(PG_FK, "job_events", type_="foreignkey")
        op.execute(PG_UPGRADE)
        return
    with _sqlite_rebuild(naming_convention=SQLITE_NAMES) as batch:
        batch.drop_constraint(SQLITE_FK, type_="foreignkey")
    op.execute(SQLITE_DELETE_TRIGGER)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(PG_DOWNGRADE)
        # 0002's row triggers, as those migrations wrote them: 0001 creates
        # the function and its triggers, 0002 replaces the function's body.
        op.execute(_migration("0001_initial").PG_TRIGGER)
        op.execute(_migration("0002_claim_indexes").PG_FUNCTION)
        op.create_foreign_key(PG_FK, "job_events", "jobs", ["job_id"], ["id"],
                              ondelete="CASCADE")
        return
    op.execute("DROP TRIGGER jobs_deleted")
    with _sqlite_rebuild() as batch:
        batch.create_foreign_key(SQLITE_FK, "jobs", ["job_id"], ["id"], ondelete="CASCADE")


@contextlib.contextmanager
def _sqlite_rebuild(**options):
    """Batch mode copies job_events to a new table and renames it back.
    SQLite refuses that rename while the triggers on jobs name a
    job_events that is gone for a moment, unless in its legacy mode, which
    leaves triggers alone: they name the table, and it is back after."""
    op.execute("PRAGMA legacy_alter_table = ON")
    try:
        with op.batch_alter_table("job_events", recreate="always", **options) as batch:
            yield batch
    finally:
        op.execute("PRAGMA legacy_alter_table = OFF")


def _migration(name: str):
    """An earlier migration's module, for the SQL it holds."""
    path = Path(__file__).with_name(f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"runjobs_migration_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
