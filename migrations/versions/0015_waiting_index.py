"""An index of the jobs waiting for their dependencies, for --burst workers' last question

Revision ID: 0015_waiting_index
Revises: 0014_dead_dependents_notify
"""

import sqlalchemy as sa
from alembic import op

revision = "0015_waiting_index"
down_revision = "0014_dead_dependents_notify"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Partial: only waiting jobs have an entry (see dj/models.py), so it is small and other jobs'
    # writes never touch it.
    op.create_index("jobs_waiting_idx", "jobs", ["queue"],
                    postgresql_where=sa.text("run_at = 'infinity' AND failed_at IS NULL AND locked_by IS NULL"))


def downgrade() -> None:
    op.drop_index("jobs_waiting_idx", table_name="jobs")
