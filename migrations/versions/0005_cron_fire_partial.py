"""ux_jobs_cron_fire covers jobs of a cron only.

The unique (cron_id, cron_fire_at) held an entry for every job, cron or
not. On PostgreSQL every status change writes a new version of the job's
row, and so a new entry in each index that covers it: with a million
finished jobs in the table this one index cost a drain 5 % (the growth
benchmark). As a unique index over the rows with a cron_id it enforces the
same (NULLs never conflicted) and costs other jobs nothing.

SQLite cannot drop a table's UNIQUE constraint, so jobs is rebuilt: its
CREATE TABLE without the constraint, the rows copied, its indexes and
triggers made again from their own SQL. The old table is renamed first:
its key on itself (rerun_of) follows it, so dropping it, which with
foreign keys on deletes its rows first, sets rerun_of to NULL only in the
old rows, never in the copies. This reads and writes every job once: 8 s
for a million finished jobs on our machine, in the upgrade's transaction.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-22
"""
import re
from typing import Callable

from alembic import op
import sqlalchemy as sa

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

NAME = "ux_jobs_cron_fire"
COLUMNS = ["cron_id", "cron_fire_at"]
CRON_JOBS = sa.text("cron_id IS NOT NULL")
SQLITE_CONSTRAINT = re.compile(r",\s*CONSTRAINT ux_jobs_cron_fire UNIQUE \(cron_id, cron_fire_at\)")


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.drop_constraint(NAME, "jobs", type_="unique")
    else:
        _sqlite_rebuild_jobs(_without_constraint)
    op.create_index(NAME, "jobs", COLUMNS, unique=True,
                    postgresql_where=CRON_JOBS, sqlite_where=CRON_JOBS)


def downgrade() -> None:
    op.drop_index(NAME, table_name="jobs")
    if op.get_bind().dialect.name == "postgresql":
        op.create_unique_constraint(NAME, "jobs", COLUMNS)
    else:
        _sqlite_rebuild_jobs(_with_constraint)


def _without_constraint(create_table: str) -> str:
    edited, found = SQLITE_CONSTRAINT.subn("", create_table)
    if found != 1:
        raise RuntimeError(f"jobs: expected the {NAME} constraint in: {create_table}")
    return edited


def _with_constraint(create_table: str) -> str:
    body = create_table.rstrip().removesuffix(")").rstrip()
    return f"{body}, \n\tCONSTRAINT {NAME} UNIQUE (cron_id, cron_fire_at)\n)"


def _sqlite_rebuild_jobs(edit: Callable[[str], str]) -> None:
    """Make jobs again from `edit` of its CREATE TABLE, keeping its rows,
    indexes and triggers (SQLite's procedure for other schema changes,
    inside the migration's transaction, where foreign keys stay on)."""
    conn = op.get_bind()
    create_table = conn.exec_driver_sql(
        "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'jobs'").scalar_one()
    # Autoindexes of constraints have no SQL: the new table makes its own.
    rest = conn.exec_driver_sql(
        "SELECT type, name, sql FROM sqlite_master WHERE tbl_name = 'jobs' "
        "AND type IN ('index', 'trigger') AND sql IS NOT NULL ORDER BY type, name").all()
    for kind, name, _ in rest:
        if kind == "trigger":
            op.execute(f"DROP TRIGGER {name}")
    op.execute("ALTER TABLE jobs RENAME TO jobs_old")  # its indexes go with it
    op.execute(edit(create_table))
    op.execute("INSERT INTO jobs SELECT * FROM jobs_old")
    # Each row the drop deletes looks for reruns of it in jobs_old itself:
    # without an index, a scan per row (a million jobs took over ten minutes).
    op.execute("CREATE INDEX jobs_old_rerun_of ON jobs_old (rerun_of)")
    op.execute("DROP TABLE jobs_old")
    for _, _, sql in rest:
        op.execute(sql)
