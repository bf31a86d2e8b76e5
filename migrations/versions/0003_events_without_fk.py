"""Events without a foreign key; on PostgreSQL, the submit's wake-up by trigger.

- job_events.job_id loses its foreign key to jobs. Only the event trigger on
  jobs writes events, always for the row it fires on, so the key could
  never fail; but its check ran for every event (three per job). On
  PostgreSQL each check also locks the job's row, a WAL record per event:
  dropping it bought a runner's drain about 30 %. What the key's ON DELETE
  CASCADE did, a trigger on jobs now does: deleting a job deletes its events.
- PostgreSQL: an AFTER INSERT statement trigger on jobs sends the NOTIFY
  that wakes idle runners, so a submit no longer spends a round trip on it.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22
"""
import contextlib

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

PG_FK = "job_events_job_id_fkey"
# Names for the unnamed keys SQLite reflects, so batch mode can drop one.
SQLITE_NAMES = {"fk": "fk_%(table_name)s_%(column_0_name)s"}
SQLITE_FK = "fk_job_events_job_id"

PG_UPGRADE = """
CREATE FUNCTION runjobs_jobs_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM job_events WHERE job_id IN (SELECT id FROM gone);
    RETURN NULL;
END $$;
CREATE TRIGGER jobs_delete_events AFTER DELETE ON jobs
    REFERENCING OLD TABLE AS gone FOR EACH STATEMENT
    EXECUTE FUNCTION runjobs_jobs_deleted();
CREATE FUNCTION runjobs_jobs_submitted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('runjobs', 'submit');
    RETURN NULL;
END $$;
CREATE TRIGGER jobs_notify_submit AFTER INSERT ON jobs
    FOR EACH STATEMENT EXECUTE FUNCTION runjobs_jobs_submitted();
"""

PG_DOWNGRADE = """
DROP TRIGGER jobs_notify_submit ON jobs;
DROP FUNCTION runjobs_jobs_submitted();
DROP TRIGGER jobs_delete_events ON jobs;
DROP FUNCTION runjobs_jobs_deleted();
"""

SQLITE_DELETE_TRIGGER = """
CREATE TRIGGER jobs_delete_events AFTER DELETE ON jobs BEGIN
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
        op.create_foreign_key(PG_FK, "job_events", "jobs", ["job_id"], ["id"],
                              ondelete="CASCADE")
        return
    op.execute("DROP TRIGGER jobs_delete_events")
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
