"""jobs.pgid, jobs.pgid_runner: the process group a command job runs in.

A command runs in a process group of its own (its own session). When its
runner dies, that group must not run on beside the job's retry: the runner
records the group's id (the command's pid) and itself, and a rescuer on the
same node and boot kills what is left of the group before the retry may
start (docs/operations.md, Rescue). Jobs that are not commands leave both
NULL. ix_jobs_process_group holds only the rows with a group recorded, so
finding the groups of dead runners reads a handful of rows, and other jobs
pay nothing for it.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""
from alembic import op
import sqlalchemy as sa

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

WITH_GROUP = sa.text("pgid IS NOT NULL")


def upgrade() -> None:
    # Nullable columns without a default: on both databases a change of the
    # table's definition only, no row is rewritten.
    op.add_column("jobs", sa.Column("pgid", sa.Integer))
    op.add_column("jobs", sa.Column("pgid_runner", sa.BigInteger().with_variant(sa.Integer(), "sqlite")))
    op.create_index("ix_jobs_process_group", "jobs", ["pgid_runner"],
                    postgresql_where=WITH_GROUP, sqlite_where=WITH_GROUP)


def downgrade() -> None:
    op.drop_index("ix_jobs_process_group", table_name="jobs")
    op.drop_column("jobs", "pgid_runner")
    op.drop_column("jobs", "pgid")
