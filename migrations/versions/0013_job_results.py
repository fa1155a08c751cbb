"""Kept successes: jobs.keep and the job_results table

Revision ID: 0013_job_results
Revises: 0012_rate_limits
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

revision = "0013_job_results"
down_revision = "0012_rate_limits"
branch_labels = None
depends_on = None

TZ = pg.TIMESTAMP(timezone=True)


def upgrade() -> None:
    # NULL for every existing job: a success is deleted, as before. Adding a nullable column
    # without a default rewrites nothing.
    op.add_column("jobs", sa.Column("keep", sa.Float))
    # Kept successes live apart from jobs, so the claim index never sees them (dj/models.py JobResult).
    op.create_table(
        "job_results",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("queue", sa.Text, nullable=False),
        sa.Column("priority", sa.SmallInteger, nullable=False),
        sa.Column("task", sa.Text, nullable=False),
        sa.Column("args", pg.JSONB, nullable=False),
        sa.Column("kwargs", pg.JSONB, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("max_attempts", sa.Integer, nullable=False),
        sa.Column("batch_id", sa.BigInteger),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("run_at", TZ, nullable=False),
        sa.Column("finished_at", TZ, nullable=False),
        sa.Column("expires_at", TZ, nullable=False),
        sa.Column("run_seconds", sa.Float, nullable=False),
        sa.Column("result", pg.JSONB),
        sa.Column("result_error", sa.Text),
    )
    op.create_index("job_results_expires_idx", "job_results", ["expires_at"])
    op.execute("INSERT INTO maintenance (name) VALUES ('prune results') ON CONFLICT (name) DO NOTHING")


def downgrade() -> None:
    op.execute("DELETE FROM maintenance WHERE name = 'prune results'")
    op.drop_table("job_results")
    op.drop_column("jobs", "keep")
