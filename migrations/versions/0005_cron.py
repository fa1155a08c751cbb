"""Cron: the last tick enqueued for each cron task

Revision ID: 0005_cron
Revises: 0004_unique_batches
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

revision = "0005_cron"
down_revision = "0004_unique_batches"
branch_labels = None
depends_on = None

TZ = pg.TIMESTAMP(timezone=True)


def upgrade() -> None:
    # A worker claims a tick with `UPDATE ... SET last_tick = tick` under a row lock, in the same
    # transaction as the job it enqueues (dj/cron.py): one row per task, never one per tick.
    op.create_table(
        "cron_runs",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("expr", sa.Text, nullable=False),
        sa.Column("last_tick", TZ, nullable=False),
        sa.Column("last_job_id", sa.BigInteger),
        sa.Column("fired_at", TZ),
    )


def downgrade() -> None:
    op.drop_table("cron_runs")
