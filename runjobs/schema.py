"""The tables, shared by the store and by Alembic's env.py.

Migrations in migrations/versions create exactly this; a test compares them.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa

# The Alembic revision this code expects; a test checks it is migrations' head.
HEAD_REVISION = "0007"

# The statuses the partial indexes cover, in the order their predicates name
# them. SQLite uses a partial index only for a query that names the same
# values in the same order, so the store builds its conditions from these.
ACTIVE_STATUSES = ("QUEUED", "RUNNING", "TO_CANCEL")
NOT_FINAL_STATUSES = ("HELD", "PENDING", "QUEUED", "RUNNING", "TO_CANCEL")
FINAL_STATUSES = ("CANCELED", "SUCCESS", "WARNING", "FAILURE", "EXPIRED", "ABANDONED")


def status_sql(statuses: tuple[str, ...]) -> str:
    """`status = 'A'` or `status IN ('A', 'B')`, values written out."""
    if len(statuses) == 1:
        return f"status = '{statuses[0]}'"
    return "status IN (" + ", ".join(f"'{s}'" for s in statuses) + ")"


_PENDING = sa.text(status_sql(("PENDING",)))
_ACTIVE = sa.text(status_sql(ACTIVE_STATUSES))
_KEY_OPEN = sa.text("key IS NOT NULL AND " + status_sql(NOT_FINAL_STATUSES))
_FINAL = sa.text(status_sql(FINAL_STATUSES))
_CRON = sa.text("cron_id IS NOT NULL")
_RERUNS = sa.text("rerun_of IS NOT NULL")
_WITH_GROUP = sa.text("pgid IS NOT NULL")
_EXPIRY = sa.text(status_sql(("PENDING",)) + " AND max_start_at IS NOT NULL")


class UtcDateTime(sa.TypeDecorator):
    """Aware UTC datetimes in and out, on both databases.

    How the database stores them (PostgreSQL's timestamptz; naive UTC text
    on SQLite, which has no time zone) is the store's dialect seam's
    business: `runjobs.store.dialect`, asked by the SQLAlchemy dialect's name.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: runjobs stores aware UTC times")
        return _seam(dialect).time_to_store(value.astimezone(dt.timezone.utc))

    def bind_processor(self, dialect):
        return _seam(dialect).time_bind_processor(self, dialect) \
            or super().bind_processor(dialect)

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.timezone.utc)
        return value.astimezone(dt.timezone.utc)


def _seam(dialect: sa.Dialect):
    """The store's dialect object for SQLAlchemy's `dialect` (imported here,
    not at the top: the store imports this module)."""
    from .store.dialect import dialect_named

    return dialect_named(dialect.name)


# BIGINT ids on PostgreSQL; SQLite's autoincrement needs INTEGER PRIMARY KEY.
Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

metadata = sa.MetaData()


def _partial(name: str, *columns: Any, where: sa.TextClause, **options: Any) -> sa.Index:
    """An index of the rows `where` selects. The database in use gets the
    WHERE from `use_dialect`, not here: naming postgresql_where at import
    loads SQLAlchemy's PostgreSQL dialect, 60 ms that a cycle or a command
    on the embedded SQLite never needs."""
    index = sa.Index(name, *columns, **options)
    index.info["where"] = where
    return index


def use_dialect(name: str) -> None:
    """Give every partial index its WHERE for dialect `name` ('sqlite' or
    'postgresql'); the store's engine calls it. Calling it again is
    harmless."""
    for table in metadata.tables.values():
        for index in table.indexes:
            if "where" in index.info:
                index.dialect_kwargs[f"{name}_where"] = index.info["where"]

runners = sa.Table(
    "runners", metadata,
    sa.Column("id", Id, primary_key=True, autoincrement=True),
    sa.Column("node", sa.String(255), nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("boot_id", sa.String(64)),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("started_at", UtcDateTime, nullable=False),
    sa.Column("heartbeat_at", UtcDateTime, nullable=False),
    sa.Column("deadline", UtcDateTime),
    sa.Column("exited_at", UtcDateTime),
    sa.Column("version", sa.String(32)),
    sa.Index("ix_runners_state_heartbeat", "state", "heartbeat_at"),
)

crons = sa.Table(
    "crons", metadata,
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
    sa.Column("last_fire_at", UtcDateTime),
    sa.Column("created_at", UtcDateTime, nullable=False),
)

jobs = sa.Table(
    "jobs", metadata,
    sa.Column("id", Id, primary_key=True, autoincrement=True),
    sa.Column("action", sa.String(200), nullable=False),
    sa.Column("params", sa.JSON, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("priority", sa.Integer, nullable=False, server_default="0"),
    # attempt is 1 on the first run; 0 until a runner starts it.
    sa.Column("attempt", sa.Integer, nullable=False, server_default="0"),
    sa.Column("retries", sa.Integer, nullable=False, server_default="0"),
    # Times the job was RUNNING when its runner died, in a row (poison jobs).
    sa.Column("crashes", sa.Integer, nullable=False, server_default="0"),
    sa.Column("run_at", UtcDateTime, nullable=False),
    sa.Column("max_start_at", UtcDateTime),
    sa.Column("timeout", sa.Float),
    sa.Column("needs", sa.JSON),
    sa.Column("key", sa.String(255)),
    sa.Column("rerun_of", Id, sa.ForeignKey("jobs.id", ondelete="SET NULL")),
    sa.Column("cron_id", Id, sa.ForeignKey("crons.id", ondelete="SET NULL")),
    sa.Column("cron_fire_at", UtcDateTime),
    sa.Column("runner_id", Id, sa.ForeignKey("runners.id", ondelete="SET NULL")),
    sa.Column("node", sa.String(255)),
    sa.Column("progress_done", sa.Float),
    sa.Column("progress_total", sa.Float),
    sa.Column("progress_message", sa.Text),
    sa.Column("output", sa.Text),
    sa.Column("error", sa.Text),
    sa.Column("peak_rss_kb", sa.BigInteger),
    # A command's process group (its pid) and the runner that started it
    # (0007): a rescuer on the same node kills what is left of the group
    # before the job's retry may start. NULL for jobs that are not commands.
    sa.Column("pgid", sa.Integer),
    sa.Column("pgid_runner", Id),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Column("queued_at", UtcDateTime),
    sa.Column("started_at", UtcDateTime),
    sa.Column("finished_at", UtcDateTime),
    sa.Column("updated_at", UtcDateTime, nullable=False),
    # The claim's scan: only PENDING rows are indexed, so a million finished
    # jobs cost the claim nothing.
    _partial("ix_jobs_pending", sa.desc("priority"), "run_at", "id", where=_PENDING),
    # A node's used capacity and a runner's own jobs: only active rows.
    _partial("ix_jobs_active", "node", "runner_id", where=_ACTIVE),
    # Idempotent submit: one not-final job per key, enforced by the database.
    _partial("ux_jobs_key_open", "key", unique=True, where=_KEY_OPEN),
    # One job per (cron, scheduled time), whichever runner enqueues it. Over
    # cron jobs only: on PostgreSQL each status change adds an entry to every
    # index that covers the row, and a million finished jobs made this one
    # cost a drain 5 % (migration 0005).
    _partial("ux_jobs_cron_fire", "cron_id", "cron_fire_at", unique=True, where=_CRON),
    # No index starts with status: SQLite's planner, which keeps no
    # statistics, would serve the claim with it and scan every PENDING row.
    # Purge by age reads final jobs only; the expiry sweep the few with a
    # max start time.
    _partial("ix_jobs_finished", "finished_at", where=_FINAL),
    _partial("ix_jobs_expiry", "max_start_at", where=_EXPIRY),
    # Deleting a job looks for the jobs that rerun it (rerun_of's ON DELETE
    # SET NULL); without this, a scan of the table per deleted job (0006).
    _partial("ix_jobs_rerun_of", "rerun_of", where=_RERUNS),
    # The groups of dead runners a rescuer kills: only rows with one (0007).
    _partial("ix_jobs_process_group", "pgid_runner", where=_WITH_GROUP),
)

job_events = sa.Table(
    "job_events", metadata,
    sa.Column("id", Id, primary_key=True, autoincrement=True),
    # No foreign key: only the trigger on jobs writes events, for the row it
    # fires on, and a key's check per event cost a drain a third of its
    # speed on PostgreSQL. Deleting a job deletes its events (a trigger).
    sa.Column("job_id", Id, nullable=False),
    sa.Column("at", UtcDateTime, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("previous", sa.String(16)),
    sa.Column("runner_id", Id),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("note", sa.Text),
    sa.Index("ix_job_events_job", "job_id", "id"),
)
