"""Per-queue settings: paused, and a concurrency limit for later.

Revision ID: 0003_queue_settings
Revises: 0002_workload
"""

import sqlalchemy as sa
from alembic import op

revision = "0003_queue_settings"
down_revision = "0002_workload"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A queue without a row is active and unlimited; `dj web` and dj.admin.pause_queue add rows.
    op.create_table(
        "queue_settings",
        sa.Column("queue", sa.Text, primary_key=True),
        sa.Column("paused", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("concurrency_limit", sa.Integer, nullable=True),
    )


def downgrade() -> None:
    op.drop_table("queue_settings")
