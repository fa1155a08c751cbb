"""Unique jobs, batches with callbacks, and job progress

Revision ID: 0004_unique_batches
Revises: 0003_queue_settings
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

revision = "0004_unique_batches"
down_revision = "0003_queue_settings"
branch_labels = None
depends_on = None

TZ = pg.TIMESTAMP(timezone=True)


def upgrade() -> None:
    op.add_column("jobs", sa.Column("unique_key", sa.Text))
    op.add_column("jobs", sa.Column("batch_id", sa.BigInteger))
    op.add_column("jobs", sa.Column("progress", pg.JSONB))
    # A key is held while its job is ready, scheduled or running; a dead job lets go of it, and a
    # finished one is deleted. Enqueue relies on this index with ON CONFLICT DO NOTHING, so two
    # concurrent enqueuers of one key cannot both insert.
    op.create_index("jobs_unique_key_idx", "jobs", ["unique_key"], unique=True,
                    postgresql_where=sa.text("unique_key IS NOT NULL AND failed_at IS NULL"))
    # Counting a queue's running jobs (for its concurrency limit) needs the queue in this index;
    # crash recovery and start-up still find a worker's rows in it, since few rows are locked.
    op.drop_index("jobs_locked_by_idx", table_name="jobs")
    op.create_index("jobs_running_idx", "jobs", ["queue", "locked_by"],
                    postgresql_where=sa.text("locked_by IS NOT NULL"))
    op.create_table(
        "batches",
        sa.Column("id", sa.BigInteger, sa.Identity(always=False), primary_key=True),
        sa.Column("on_complete", sa.Text),
        sa.Column("args", pg.JSONB, nullable=False, server_default=sa.text("'[]'::jsonb")),
        sa.Column("kwargs", pg.JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("queue", sa.Text, nullable=False, server_default="default"),
        sa.Column("description", sa.Text),
        sa.Column("total", sa.Integer),  # NULL while jobs are still being added
        sa.Column("succeeded", sa.Integer, nullable=False, server_default="0"),
        sa.Column("dead", sa.Integer, nullable=False, server_default="0"),
        sa.Column("result", pg.JSONB),
        sa.Column("created_at", TZ, nullable=False, server_default=sa.text("now()")),
        sa.Column("finished_at", TZ),
    )


def downgrade() -> None:
    op.drop_table("batches")
    op.drop_index("jobs_running_idx", table_name="jobs")
    op.create_index("jobs_locked_by_idx", "jobs", ["locked_by"], postgresql_where=sa.text("locked_by IS NOT NULL"))
    op.drop_index("jobs_unique_key_idx", table_name="jobs")
    op.drop_column("jobs", "progress")
    op.drop_column("jobs", "batch_id")
    op.drop_column("jobs", "unique_key")
