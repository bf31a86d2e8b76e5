"""ix_jobs_rerun_of: deleting jobs no longer scans the table per job.

jobs.rerun_of is a foreign key to jobs with ON DELETE SET NULL, so deleting
a job makes the database look for the jobs that rerun it. Nothing indexed
rerun_of: each deleted job cost a scan of the whole table, and removing old
jobs by hand (there is no purge command yet) was quadratic, hours for half
a million jobs in a table of a million. The index holds only the jobs that
are reruns, so other jobs pay nothing for it.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-22
"""
from alembic import op
import sqlalchemy as sa

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

RERUNS = sa.text("rerun_of IS NOT NULL")


def upgrade() -> None:
    op.create_index("ix_jobs_rerun_of", "jobs", ["rerun_of"],
                    postgresql_where=RERUNS, sqlite_where=RERUNS)


def downgrade() -> None:
    op.drop_index("ix_jobs_rerun_of", table_name="jobs")
