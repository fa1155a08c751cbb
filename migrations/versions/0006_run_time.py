"""Run-time histogram in job_stats

Revision ID: 0006_run_time
Revises: 0005_cron
"""

import sqlalchemy as sa
from alembic import op

revision = "0006_run_time"
down_revision = "0005_cron"
branch_labels = None
depends_on = None

# Cumulative buckets, as Prometheus histograms count them: attempts that took at most N seconds.
BUCKETS = ("run_le_0_01", "run_le_0_1", "run_le_1", "run_le_10", "run_le_60")


def upgrade() -> None:
    op.add_column("job_stats", sa.Column("run_seconds", sa.Float, nullable=False, server_default="0"))
    for column in BUCKETS:
        op.add_column("job_stats", sa.Column(column, sa.BigInteger, nullable=False, server_default="0"))


def downgrade() -> None:
    for column in BUCKETS:
        op.drop_column("job_stats", column)
    op.drop_column("job_stats", "run_seconds")
