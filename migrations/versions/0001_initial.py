"""Initial schema: jobs, their history, runners, crons.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""
from alembic import op
import sqlalchemy as sa

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Time = sa.DateTime(timezone=True)
PENDING = sa.text("status = 'PENDING'")
ACTIVE = sa.text("status IN ('QUEUED', 'RUNNING', 'TO_CANCEL')")
KEY_OPEN = sa.text(
    "key IS NOT NULL AND status IN ('HELD', 'PENDING', 'QUEUED', 'RUNNING', 'TO_CANCEL')")

# Every change of a job's status is written to job_events by the database
# itself, in the same transaction, whoever makes it.
PG_TRIGGER = """
CREATE FUNCTION runjobs_job_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO job_events (job_id, at, status, previous, runner_id, attempt, note)
    VALUES (NEW.id, NEW.updated_at, NEW.status,
            CASE WHEN TG_OP = 'UPDATE' THEN OLD.status END,
            NEW.runner_id, NEW.attempt,
            CASE WHEN TG_OP = 'INSERT' OR NEW.error IS DISTINCT FROM OLD.error
                 THEN NEW.error END);
    RETURN NULL;
END $$;
CREATE TRIGGER jobs_event_insert AFTER INSERT ON jobs
    FOR EACH ROW EXECUTE FUNCTION runjobs_job_event();
CREATE TRIGGER jobs_event_update AFTER UPDATE OF status ON jobs
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status
                       OR OLD.attempt IS DISTINCT FROM NEW.attempt)
    EXECUTE FUNCTION runjobs_job_event();
"""

SQLITE_TRIGGERS = [
    """
    CREATE TRIGGER jobs_event_insert AFTER INSERT ON jobs BEGIN
        INSERT INTO job_events (job_id, at, status, previous, runner_id, attempt, note)
        VALUES (NEW.id, NEW.updated_at, NEW.status, NULL, NEW.runner_id, NEW.attempt,
                NEW.error);
    END
    """,
    """
    CREATE TRIGGER jobs_event_update AFTER UPDATE OF status ON jobs
    WHEN OLD.status IS NOT NEW.status OR OLD.attempt IS NOT NEW.attempt BEGIN
        INSERT INTO job_events (job_id, at, status, previous, runner_id, attempt, note)
        VALUES (NEW.id, NEW.updated_at, NEW.status, OLD.status, NEW.runner_id,
                NEW.attempt, CASE WHEN NEW.error IS NOT OLD.error THEN NEW.error END);
    END
    """,
]


def upgrade() -> None:
    op.create_table(
        "runners",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("node", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("boot_id", sa.String(64)),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("started_at", Time, nullable=False),
        sa.Column("heartbeat_at", Time, nullable=False),
        sa.Column("deadline", Time),
        sa.Column("exited_at", Time),
        sa.Column("version", sa.String(32)),
    )
    op.create_index("ix_runners_state_heartbeat", "runners", ["state", "heartbeat_at"])
    op.create_table(
        "crons",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(200), nullable=False, unique=True),
        sa.Column("schedule", sa.String(200), nullable=False),
        sa.Column("action", sa.String(200), nullable=False),
        sa.Column("params", sa.JSON, nullable=False),
        sa.Column("priority", sa.Integer, nullable=False, server_default="0"),
        sa.Column("timeout", sa.Float),
        sa.Column("retries", sa.Integer),
        sa.Column("needs", sa.JSON),
        sa.Column("missed", sa.String(8), nullable=False, server_default="once"),
        sa.Column("timezone", sa.String(64)),
        sa.Column("paused", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("last_fire_at", Time),
        sa.Column("created_at", Time, nullable=False),
    )
    _create_jobs()
    op.create_table(
        "job_events",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("job_id", Id, sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("at", Time, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("previous", sa.String(16)),
        sa.Column("runner_id", Id),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("note", sa.Text),
    )
    op.create_index("ix_job_events_job", "job_events", ["job_id", "id"])
    _create_triggers()


def _create_jobs() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("action", sa.String(200), nullable=False),
        sa.Column("params", sa.JSON, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("priority", sa.Integer, nullable=False, server_default="0"),
        sa.Column("attempt", sa.Integer, nullable=False, server_default="0"),
        sa.Column("retries", sa.Integer, nullable=False, server_default="0"),
        sa.Column("crashes", sa.Integer, nullable=False, server_default="0"),
        sa.Column("run_at", Time, nullable=False),
        sa.Column("max_start_at", Time),
        sa.Column("timeout", sa.Float),
        sa.Column("needs", sa.JSON),
        sa.Column("key", sa.String(255)),
        sa.Column("rerun_of", Id, sa.ForeignKey("jobs.id", ondelete="SET NULL")),
        sa.Column("cron_id", Id, sa.ForeignKey("crons.id", ondelete="SET NULL")),
        sa.Column("cron_fire_at", Time),
        sa.Column("runner_id", Id, sa.ForeignKey("runners.id", ondelete="SET NULL")),
        sa.Column("node", sa.String(255)),
        sa.Column("progress_done", sa.Float),
        sa.Column("progress_total", sa.Float),
        sa.Column("progress_message", sa.Text),
        sa.Column("output", sa.Text),
        sa.Column("error", sa.Text),
        sa.Column("peak_rss_kb", sa.BigInteger),
        sa.Column("created_at", Time, nullable=False),
        sa.Column("queued_at", Time),
        sa.Column("started_at", Time),
        sa.Column("finished_at", Time),
        sa.Column("updated_at", Time, nullable=False),
        sa.UniqueConstraint("cron_id", "cron_fire_at", name="ux_jobs_cron_fire"),
    )
    op.create_index("ix_jobs_pending", "jobs", [sa.text("priority DESC"), "run_at", "id"],
                    postgresql_where=PENDING, sqlite_where=PENDING)
    op.create_index("ix_jobs_active", "jobs", ["node", "runner_id"],
                    postgresql_where=ACTIVE, sqlite_where=ACTIVE)
    op.create_index("ux_jobs_key_open", "jobs", ["key"], unique=True,
                    postgresql_where=KEY_OPEN, sqlite_where=KEY_OPEN)
    op.create_index("ix_jobs_status_finished", "jobs", ["status", "finished_at"])
    op.create_index("ix_jobs_action", "jobs", ["action"])


def _create_triggers() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(PG_TRIGGER)
    else:
        for statement in SQLITE_TRIGGERS:
            op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS jobs_event_update ON jobs")
        op.execute("DROP TRIGGER IF EXISTS jobs_event_insert ON jobs")
        op.execute("DROP FUNCTION IF EXISTS runjobs_job_event()")
    for table in ("job_events", "jobs", "crons", "runners"):
        op.drop_table(table)
