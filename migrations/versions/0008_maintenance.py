"""Maintenance leases: which worker vacuums jobs, and when it last did

Revision ID: 0008_maintenance
Revises: 0007_jobs_page_room
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

revision = "0008_maintenance"
down_revision = "0007_jobs_page_room"
branch_labels = None
depends_on = None

TZ = pg.TIMESTAMP(timezone=True)


def upgrade() -> None:
    # One row per chore that one worker at a time does for all (dj/vacuum.py). A worker takes the
    # chore with a conditional UPDATE of its row (lease_until < now()), never with a session
    # advisory lock: a transaction pooler would hand that lock to whichever client gets the
    # connection next.
    op.create_table(
        "maintenance",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("holder", sa.Text),
        sa.Column("lease_until", TZ, nullable=False, server_default=sa.text("'-infinity'")),
        sa.Column("started_at", TZ),
        sa.Column("finished_at", TZ),
        sa.Column("seconds", sa.Float),
        sa.Column("dead_after", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("runs", sa.BigInteger, nullable=False, server_default="0"),
    )
    op.execute("INSERT INTO maintenance (name) VALUES ('vacuum jobs')")


def downgrade() -> None:
    op.drop_table("maintenance")
