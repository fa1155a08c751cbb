"""dj core: jobs, workers, job_stats

Revision ID: 0001_core
Revises:
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

revision = "0001_core"
down_revision = None
branch_labels = None
depends_on = None

TZ = pg.TIMESTAMP(timezone=True)


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.BigInteger, sa.Identity(always=False), primary_key=True),
        sa.Column("queue", sa.Text, nullable=False, server_default="default"),
        sa.Column("priority", sa.SmallInteger, nullable=False, server_default="0"),
        sa.Column("task", sa.Text, nullable=False),
        sa.Column("args", pg.JSONB, nullable=False, server_default=sa.text("'[]'::jsonb")),
        sa.Column("kwargs", pg.JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("run_at", TZ, nullable=False, server_default=sa.text("now()")),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("max_attempts", sa.Integer, nullable=False, server_default="25"),
        sa.Column("timeout", sa.Float),
        sa.Column("locked_at", TZ),
        sa.Column("locked_by", sa.Text),
        sa.Column("failed_at", TZ),
        sa.Column("last_error", sa.Text),
        sa.Column("created_at", TZ, nullable=False, server_default=sa.text("now()")),
    )
    op.create_index(
        "jobs_claim_idx", "jobs", ["queue", "priority", "run_at", "id"],
        postgresql_where=sa.text("locked_by IS NULL AND failed_at IS NULL"),
    )
    op.create_index("jobs_locked_by_idx", "jobs", ["locked_by"], postgresql_where=sa.text("locked_by IS NOT NULL"))
    op.create_index("jobs_dead_idx", "jobs", ["queue", "failed_at"], postgresql_where=sa.text("failed_at IS NOT NULL"))
    # Every job is inserted, updated once or twice and deleted within seconds, so the table churns
    # through dead tuples far faster than the default 20% scale factor notices. Vacuum it early and
    # without throttling so the heap and the claim index stay small.
    op.execute(
        "ALTER TABLE jobs SET (autovacuum_vacuum_scale_factor = 0.01, autovacuum_vacuum_threshold = 1000,"
        " autovacuum_vacuum_insert_scale_factor = 0.01, autovacuum_analyze_scale_factor = 0.02,"
        " autovacuum_vacuum_cost_delay = 0, fillfactor = 90)"
    )

    op.create_table(
        "workers",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("host", sa.Text, nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("queues", pg.ARRAY(sa.Text), nullable=False),
        sa.Column("concurrency", sa.Integer, nullable=False),
        sa.Column("running", sa.Integer, nullable=False, server_default="0"),
        sa.Column("started_at", TZ, nullable=False, server_default=sa.text("now()")),
        sa.Column("heartbeat_at", TZ, nullable=False, server_default=sa.text("now()")),
    )
    op.create_table(
        "job_stats",
        sa.Column("bucket", TZ, primary_key=True),
        sa.Column("queue", sa.Text, primary_key=True),
        sa.Column("succeeded", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("failed", sa.BigInteger, nullable=False, server_default="0"),
    )


def downgrade() -> None:
    op.drop_table("job_stats")
    op.drop_table("workers")
    op.drop_table("jobs")
