"""Rate limits: a queue's limit in queue_settings, and the sliding log of claims, rate_starts

Revision ID: 0012_rate_limits
Revises: 0011_limit_keys
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

revision = "0012_rate_limits"
down_revision = "0011_limit_keys"
branch_labels = None
depends_on = None

TZ = pg.TIMESTAMP(timezone=True)


def upgrade() -> None:
    op.add_column("queue_settings", sa.Column("rate_limit", sa.Integer, nullable=True))
    op.add_column("queue_settings", sa.Column("rate_period", sa.Float, nullable=True))
    # One row per claim statement and rate-limited key (dj/rates.py); the primary key is the
    # window's index (key, then time).
    op.create_table(
        "rate_starts",
        sa.Column("key", sa.Text, primary_key=True),
        sa.Column("started_at", TZ, primary_key=True),
        sa.Column("n", sa.Integer, nullable=False),
        sa.Column("max_starts", sa.Integer, nullable=False),
        sa.Column("period", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("rate_starts")
    op.drop_column("queue_settings", "rate_period")
    op.drop_column("queue_settings", "rate_limit")
